// Downloads of a big session's state by clients that read slowly, or not at all (found by a review: thirty
// slow clients of a 30-million-parameter session took the server from 0.9 GB to 4.3 GB, each download with
// its own copy of the state, and five clients that never read held 1.2 GB for as long as they stayed
// connected). Readers of one version share one copy now, and a client that takes none of an answer for
// ASGD_REQUEST_TIMEOUT_MS is cut.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { test } from 'node:test';
import { startServer } from './processes.ts';

const rssMb = (pid: number) => Number(/^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) / 1024;

/** A GET whose answer is not read (the socket paused once the request is written) until `drain()`: the bytes that came, to the end. */
function stalledGet(port: number, path: string): Promise<{ drain(): Promise<number> }> {
  return new Promise((resolve, reject) => {
    const socket: Socket = connect(port, '127.0.0.1', () => {
      socket.write(`GET ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`);
      socket.pause();
      resolve({
        drain: () => new Promise<number>((done) => {
          let bytes = 0;
          socket.on('data', (chunk: Buffer) => { bytes += chunk.byteLength; });
          socket.once('close', () => done(bytes));
          socket.once('error', () => {});
          socket.resume();
        }),
      });
    });
    socket.once('error', reject);
  });
}

test('ten clients that never read a 40 MB download share one copy of the state, and are cut after ASGD_REQUEST_TIMEOUT_MS', { timeout: 120_000 }, async (t) => {
  const { run, url, port, pid } = await startServer(process.execPath, ['src/server.ts'], { ASGD_DATA_DIR: 'memory://', LOG_LEVEL: 'info', ASGD_REQUEST_TIMEOUT_MS: '2000' });
  t.after(() => { run.child.kill('SIGKILL'); });
  // 5e6 parameters: params and ax 20 MB each, a copy of the state 40 MB.
  const numel = 5_000_000;
  const header = Buffer.from(JSON.stringify({ w: { dtype: 'F32', shape: [numel], data_offsets: [0, numel * 4] } }).padEnd(64, ' '));
  const file = Buffer.concat([Buffer.alloc(8), header, Buffer.alloc(numel * 4)]);
  file.writeBigUInt64LE(BigInt(header.length), 0);
  const created = await fetch(`${url}/v1/sessions?name=big`, { method: 'POST', headers: { 'content-type': 'application/x-safetensors' }, body: file });
  assert.equal(created.status, 201, await created.text());
  const stepped = await fetch(`${url}/v1/sessions/big/step`, { method: 'POST', headers: { 'content-type': 'application/x-safetensors' }, body: file });
  assert.equal(stepped.status, 200, await stepped.text());
  // One download read in full first: what any download allocates besides the copy is there before the measure.
  assert.equal((await (await fetch(`${url}/v1/sessions/big/state_dict?format=pt`)).arrayBuffer()).byteLength > numel * 4, true);
  await new Promise((resolve) => setTimeout(resolve, 500));
  const before = rssMb(pid);
  const clients = await Promise.all(Array.from({ length: 10 }, () => stalledGet(port, '/v1/sessions/big/state_dict?format=pt')));
  await new Promise((resolve) => setTimeout(resolve, 1_500));
  const during = rssMb(pid);
  // Each download copying the state grew it by 134 MB here (ten copies of 40 MB, partly reused); one shared
  // copy (made by the download before, still alive or made again) by less than 1 MB.
  assert.ok(during - before < 70, `RSS grew by ${(during - before).toFixed(0)} MB with ten stalled downloads (before ${before.toFixed(0)} MB)`);
  // None of them reads: each is cut within about two ASGD_REQUEST_TIMEOUT_MS (the server says so), and what
  // they then read ends short of the file; the server serves on.
  const cut = () => run.output().match(/the client took none of the answer for ASGD_REQUEST_TIMEOUT_MS; closing the connection/g)?.length ?? 0;
  for (let i = 0; i < 150 && cut() < 10; i++) await new Promise((resolve) => setTimeout(resolve, 100));
  assert.equal(cut(), 10, run.output().slice(-2000));
  for (const bytes of await Promise.all(clients.map((c) => c.drain()))) assert.ok(bytes < numel * 4, `${bytes} bytes came of a file of more than ${numel * 4}`);
  assert.equal((await fetch(`${url}/v1/sessions/big`)).status, 200);
  // A client that reads, however slowly, is not cut: the whole file arrives.
  const slow = await fetch(`${url}/v1/sessions/big/params?format=safetensors`);
  const reader = slow.body!.getReader();
  let bytes = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    bytes += value.byteLength;
    if (bytes < 1024 * 1024) await new Promise((resolve) => setTimeout(resolve, 100)); // slow for its first megabyte
  }
  assert.equal(bytes, Number(slow.headers.get('content-length')));

  // An answer built whole (JSON parameters, 1e6 of them here: about 20 MB) is cut as well (found by a review:
  // twenty clients that never read a 78 MB JSON answer held 1.9 GB past the timeout).
  const smallHeader = Buffer.from(JSON.stringify({ w: { dtype: 'F32', shape: [1_000_000], data_offsets: [0, 4_000_000] } }).padEnd(72, ' '));
  const small = Buffer.concat([Buffer.alloc(8), smallHeader, Buffer.alloc(4_000_000, 1)]);
  small.writeBigUInt64LE(BigInt(smallHeader.length), 0);
  assert.equal((await fetch(`${url}/v1/sessions?name=json`, { method: 'POST', headers: { 'content-type': 'application/x-safetensors' }, body: small })).status, 201);
  const already = cut();
  const json = await Promise.all(Array.from({ length: 3 }, () => stalledGet(port, '/v1/sessions/json/params?format=json')));
  for (let i = 0; i < 150 && cut() < already + 3; i++) await new Promise((resolve) => setTimeout(resolve, 100));
  assert.equal(cut(), already + 3, run.output().slice(-2000));
  for (const got of await Promise.all(json.map((c) => c.drain()))) assert.ok(got < 10_000_000, `${got} bytes of a JSON answer of about 20 MB`);
});

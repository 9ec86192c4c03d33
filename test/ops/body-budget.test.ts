// Request bodies a process receives and holds at once are bounded (ASGD_BODY_IN_FLIGHT_BYTES), files as well
// as JSON, counted as their bytes arrive; memory settings that could never work are refused at start.
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { test } from 'node:test';
import { buildTestApp, testConfig } from '../helper.ts';
import { streamToBuffer, writeSafetensors } from '../../src/formats/index.ts';

const MiB = 1024 * 1024;

test('bodies received and held at once are bounded: a file or JSON body past ASGD_BODY_IN_FLIGHT_BYTES while others hold theirs is 503 with Retry-After; nothing moves; the share goes with the answer', async (t) => {
  // Found by a review: twenty 200 MB safetensors steps aimed at a 2-element session held 2.6 GB (every body is
  // read whole before its names are checked), past a container's memory.
  const sockets: Socket[] = [];
  t.after(() => sockets.forEach((s) => s.destroy())); // before the app's close, which waits for them
  const { app } = await buildTestApp(t, { env: { ASGD_BODY_IN_FLIGHT_BYTES: String(5 * MiB) } });
  // Its second parameter makes the session large enough for the 3 MiB files below (a file of a session's
  // gradients is bounded by 8 bytes an element, 4 KiB a parameter and 1 MiB: refused with 413 beyond).
  const params = [{ name: 'w', shape: [2], data: [1, 2] }, { name: 'v', shape: [300_000], data: new Array(300_000).fill(0) }];
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'tiny', params } })).statusCode, 201);
  const before = (await app.inject({ url: '/v1/sessions/tiny' })).json();
  const base = await app.listen({ host: '127.0.0.1', port: 0 });
  const port = Number(new URL(base).port);
  /** A POST over its own connection with `part` bytes of its body sent now; `rest()` sends the others. */
  const post = (path: string, type: string, body: Buffer, part = body.length, chunked = false) => {
    const socket = connect(port, '127.0.0.1');
    sockets.push(socket);
    let text = '';
    socket.on('data', (d) => (text += d));
    socket.on('error', () => {});
    const answer = new Promise<string>((resolve) => socket.on('close', () => resolve(text)));
    const framing = chunked ? 'Transfer-Encoding: chunked' : `Content-Length: ${body.length}`;
    socket.write(`POST ${path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: ${type}\r\n${framing}\r\nConnection: close\r\n\r\n`);
    const write = (bytes: Buffer) => socket.write(chunked ? Buffer.concat([Buffer.from(`${bytes.length.toString(16)}\r\n`), bytes, Buffer.from('\r\n')]) : bytes);
    write(body.subarray(0, part));
    return {
      answer,
      rest: () => {
        write(body.subarray(part));
        if (chunked) socket.write('0\r\n\r\n');
      },
    };
  };
  const status = (answer: string) => Number(answer.split(' ')[1]);
  const bodyOf = (answer: string) => JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4));
  // A 3 MiB safetensors file naming a tensor the session does not have (read whole before that is known).
  const file = streamToBuffer(writeSafetensors([['nope', { dtype: 'float32', shape: [768 * 1024], data: new Float32Array(768 * 1024) }]]));
  const safetensors = 'application/x-safetensors';
  const holding = async (bytes: number) => {
    for (let i = 0; i < 100; i++) {
      if (Number(/^asgd_http_request_body_in_flight_bytes (\S+)$/m.exec((await app.inject({ url: '/metrics' })).body)?.[1]) >= bytes) return;
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.fail(`never held ${bytes} bytes`);
  };

  // 2.5 MiB of the first has arrived: it holds that.
  const first = post('/v1/sessions/tiny/step', safetensors, file, 2.5 * MiB);
  await holding(2.5 * MiB);
  // A second announcing 3 MiB would pass the bound: refused before it is read.
  const announced = await post('/v1/sessions/tiny/step', safetensors, file).answer;
  assert.equal(status(announced), 503, announced);
  assert.match(announced, /\r\nretry-after: 1\r\n/i);
  assert.equal(bodyOf(announced).code, 'SERVICE_UNAVAILABLE');
  assert.match(bodyOf(announced).message, /^body: 3\.0 MiB while this process holds 2\.5 MiB of request bodies .*ASGD_BODY_IN_FLIGHT_BYTES 5\.0 MiB.*retry shortly/);
  // Chunked (no length to go by): refused once its bytes pass the bound; JSON too.
  const json = Buffer.from(JSON.stringify({ name: 'big', params: [{ name: 'w', shape: [800_000], data: new Array(800_000).fill(0.5) }] }));
  for (const [path, type, body] of [['/v1/sessions/tiny/step', safetensors, file], ['/v1/sessions', 'application/json', json]] as const) {
    const chunked = post(path, type, body, body.length, true);
    chunked.rest();
    const answer = await chunked.answer;
    assert.equal(status(answer), 503, `${type}: ${answer.slice(0, 300)}`);
    assert.match(bodyOf(answer).message, /ASGD_BODY_IN_FLIGHT_BYTES/);
  }
  // Small bodies are not counted.
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/tiny/step', payload: { grads: { w: [0.5, 0.5] } } })).statusCode, 200);
  // The first arrives whole and is answered (its tensor is unknown): its share goes, and the next is taken.
  first.rest();
  const answered = await first.answer;
  assert.equal(status(answered), 400, answered);
  const next = await post('/v1/sessions/tiny/step', safetensors, file).answer;
  assert.equal(status(next), 400, next);
  assert.equal(bodyOf(next).code, 'UNKNOWN_PARAMETER');
  const after = (await app.inject({ url: '/v1/sessions/tiny' })).json();
  assert.equal(after.version, before.version + 1, 'only the small step moved the session');
  assert.equal((await app.inject({ url: '/v1/sessions/big' })).statusCode, 404, 'nothing created');
});

test('memory settings that could never work are refused at start, naming the variable', () => {
  for (const [key, value, pattern] of [
    ['ASGD_MAX_RSS_BYTES', '1', /ASGD_MAX_RSS_BYTES must be 0 \(off\) or at least 536870912/],
    ['ASGD_MAX_RSS_BYTES', String(100 * MiB), /ASGD_MAX_RSS_BYTES must be 0 \(off\) or at least/],
    // A typo (bytes for MiB, 1 ms) refused every request for good while /healthz said 200.
    ['ASGD_MAX_HEAP_USED_BYTES', '1000', /ASGD_MAX_HEAP_USED_BYTES must be 0 \(off\) or at least 134217728 \(128 MiB\).*got 1000/],
    ['ASGD_MAX_EVENT_LOOP_DELAY_MS', '1', /ASGD_MAX_EVENT_LOOP_DELAY_MS must be 0 \(off\) or at least 100 ms: .*got 1$/],
    ['ASGD_MAX_EVENT_LOOP_DELAY_MS', '9999999999', /ASGD_MAX_EVENT_LOOP_DELAY_MS/],
    ['ASGD_BODY_LIMIT_STEP', '1099511627776', /ASGD_BODY_LIMIT_STEP must be between 1024 and 34359738368/],
    ['ASGD_BODY_LIMIT_CREATE', '1099511627776', /ASGD_BODY_LIMIT_CREATE must be between/],
  ] as const) {
    assert.throws(() => testConfig({ [key]: value }), pattern, `${key}=${value}`);
  }
  assert.equal(testConfig({ ASGD_MAX_RSS_BYTES: '0' }).maxRssBytes, 0);
  assert.equal(testConfig({ ASGD_MAX_RSS_BYTES: String(3 * 1024 * MiB) }).maxRssBytes, 3 * 1024 * MiB);
  assert.equal(testConfig({ ASGD_BODY_IN_FLIGHT_BYTES: '0' }).bodyInFlightBytes, 0);
  assert.equal(testConfig({ ASGD_MAX_HEAP_USED_BYTES: '0', ASGD_MAX_EVENT_LOOP_DELAY_MS: '0' }).maxHeapUsedBytes, 0);
  assert.equal(testConfig({ ASGD_MAX_HEAP_USED_BYTES: String(2048 * MiB) }).maxHeapUsedBytes, 2048 * MiB);
  assert.equal(testConfig({ ASGD_MAX_EVENT_LOOP_DELAY_MS: '500' }).maxEventLoopDelayMs, 500);
});

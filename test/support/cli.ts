// Running the CLI in tests: the real executable in a child process (as a container or a script runs it),
// or main() in this process with its output captured (and a terminal's question answered).
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { Writable } from 'node:stream';
import { main } from '../../src/cli.ts';

export const BIN = 'bin/asgd-serve.mjs';

export interface Run { code: number | null; stdout: string; stderr: string }

/** `node args…` to its end, with a clean environment (PATH) plus `env`; killed after `timeoutMs`. */
export function runProcess(args: string[], env: Record<string, string> = {}, timeoutMs = 60_000): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, args, { env: { PATH: process.env.PATH ?? '', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => { stdout += d; });
    child.stderr.on('data', (d) => { stderr += d; });
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

export interface HereOptions {
  env?: Record<string, string>;
  /** As on a terminal: questions are asked (and answered with `answer`: "y" confirms). */
  interactive?: boolean;
  answer?: string;
  /** Runs while a question is asked, before it is answered (someone else acting meanwhile). */
  whileAsked?: () => Promise<void>;
}

/** main() in this process: its exit code, output, the questions it asked and what it piped to stdout as bytes. */
export async function runMain(args: string[], opts: HereOptions = {}): Promise<Run & { asked: string[]; piped: Buffer }> {
  const out = { stdout: '', stderr: '' };
  const asked: string[] = [];
  const chunks: Buffer[] = [];
  const code = await main(args, opts.env ?? {}, {
    stdout: { write: (s: string) => (out.stdout += s) },
    stderr: { write: (s: string) => (out.stderr += s) },
    interactive: opts.interactive ?? false,
    confirm: async (question) => {
      asked.push(question);
      await opts.whileAsked?.();
      return /^y/i.test(opts.answer ?? 'n');
    },
    stdoutStream: () => new Writable({ write(chunk: Buffer, _e, done) { chunks.push(chunk); done(); } }),
  });
  return { code, ...out, asked, piped: Buffer.concat(chunks) };
}

/** A failure as a user sees it: the exit code, stderr naming the problem with no stack trace, nothing on stdout. */
export function assertFails(r: Run, code: number, message: RegExp, opts: { oneLine?: boolean } = {}): void {
  assert.equal(r.code, code, `exit ${r.code}: ${r.stderr}`);
  assert.match(r.stderr, message);
  assert.doesNotMatch(r.stderr, /\n\s+at |Error:|node:internal/, 'no stack trace');
  if (opts.oneLine) assert.match(r.stderr, /^asgd-serve: [^\n]+\n$/, 'one line');
  assert.equal(r.stdout, '');
}

// Round latency: three workers each send one safetensors gradient of 1e6 parameters at once to a session
// with aggregation {contributions: 3} (one round: the three stored, combined, one step), against three
// workers sending one gradient each at once to a plain session (three steps). Both over HTTP to a server
// process on PostgreSQL, with Idempotency-Keys as clients send them; the figure is the time until the
// last of the three answers, the median over repetitions of the mean within a repetition.
//   node bench/rounds.ts [--repetitions 9] [--rounds 4]
import {
  call, createDatabase, createSession, describe, isMain, median, ms, now, request, SAFETENSORS, safetensorsOf, startServer, type BenchResult, type ServerProcess,
} from './common.ts';
import { STEP_SPEC } from './durable-step.ts';

const WORKERS = 3;

export interface RoundsOptions {
  repetitions?: number;
  rounds?: number;
  log?: (line: string) => void;
}

export async function runRoundsBench(options: RoundsOptions = {}): Promise<BenchResult> {
  const repetitions = options.repetitions ?? 9;
  const k = options.rounds ?? 4;
  const log = options.log ?? console.log;
  const db = await createDatabase();
  let server: ServerProcess | null = null;
  try {
    server = await startServer({ DATABASE_URL: db.url });
    const url = server.url;
    await createSession(url, 'rounds', STEP_SPEC, { aggregation: { contributions: WORKERS } });
    await createSession(url, 'plain', STEP_SPEC);
    const bodies = Array.from({ length: WORKERS }, (_, w) => safetensorsOf(STEP_SPEC, 100 + w, 0.01));
    let version = 1;
    let keys = 0;
    let pending = 0;
    /** One round: every worker's contribution at the current version, all answered. */
    const round = async () => {
      const answers = await Promise.all(bodies.map(async (body, w) => {
        const path = `/v1/sessions/rounds/step?worker=w${w}&base_version=${version}&wait=60`;
        const headers = { ...SAFETENSORS, 'idempotency-key': `r-${keys++}` };
        for (;;) {
          const answer = await request(url, 'POST', path, { headers, body });
          if (answer.status === 200) return answer.json<{ version: number }>();
          // 202: not stepped within ?wait= (not expected here): the same request again
          if (answer.status !== 202) throw new Error(`POST ${path}: ${answer.status} ${answer.body.toString('utf8').slice(0, 500)}`);
          pending++;
        }
      }));
      version = answers[0].version;
    };
    /** Three plain steps, sent at once. */
    const steps = () => Promise.all(bodies.map((body) => call(url, 'POST', '/v1/sessions/plain/step', { headers: { ...SAFETENSORS, 'idempotency-key': `p-${keys++}` }, body })));
    const timed = async (run: () => Promise<unknown>) => {
      const start = now();
      for (let j = 0; j < k; j++) await run();
      return (now() - start) / k;
    };
    await timed(round);
    await timed(steps);
    const roundTimes: number[] = [];
    const stepTimes: number[] = [];
    for (let r = 0; r < repetitions; r++) {
      roundTimes.push(await timed(round));
      stepTimes.push(await timed(steps));
      log(`  repetition ${r + 1}/${repetitions}: round of ${WORKERS} ${ms(roundTimes[r])}, ${WORKERS} plain steps ${ms(stepTimes[r])}`);
    }
    const figure = median(roundTimes);
    const base = median(stepTimes);
    const session = (await call(url, 'GET', '/v1/sessions/rounds')).json<{ step: number }>();
    return {
      key: 'rounds',
      title: `rounds: one round of ${WORKERS} workers at 1e6 parameters (safetensors over HTTP, PostgreSQL)`,
      figure: `${ms(figure)}/round`,
      baseline: `${ms(base)} for ${WORKERS} plain steps sent at once`,
      ratio: figure / base,
      target: null,
      notes: [
        `median of ${repetitions} repetitions of ${k} rounds (three concurrent contributions each, until the last answer), interleaved with ${k} times three concurrent plain steps`,
        `a round stores three 4 MB contributions, reads them back and logs one 4 MB step; three plain steps log three; ${session.step} rounds stepped, ${pending} answers 202`,
      ],
    };
  } finally {
    await server?.stop();
    await db.drop();
  }
}

if (isMain(import.meta.url)) {
  const args = process.argv.slice(2);
  const opt = (name: string) => (args.includes(name) ? Number(args[args.indexOf(name) + 1]) : undefined);
  console.log(describe(await runRoundsBench({ repetitions: opt('--repetitions'), rounds: opt('--rounds') })));
}

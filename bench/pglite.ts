// Embedded database: the durable 1e6-parameter step (safetensors over HTTP) on a server process running
// PGlite in a data directory, against the same step on a server process on PostgreSQL.
//   node bench/pglite.ts [--rounds 7] [--steps 8]
// Both servers run side by side; rounds alternate between them; medians over rounds.
import { createDataDir, createDatabase, describe, isMain, median, ms, startServer, type BenchResult, type ServerProcess } from './common.ts';
import { stepSubject } from './durable-step.ts';

export interface PgliteOptions {
  rounds?: number;
  steps?: number;
  log?: (line: string) => void;
}

export async function runPgliteBench(options: PgliteOptions = {}): Promise<BenchResult> {
  const rounds = options.rounds ?? 7;
  const k = options.steps ?? 8;
  const log = options.log ?? console.log;
  const db = await createDatabase();
  const dir = await createDataDir();
  const servers: ServerProcess[] = [];
  try {
    const postgres = await startServer({ DATABASE_URL: db.url });
    servers.push(postgres);
    const pglite = await startServer({ ASGD_DATA_DIR: dir.dir });
    servers.push(pglite);
    const onPostgres = await stepSubject(postgres, 'embedded');
    const onPglite = await stepSubject(pglite, 'embedded');
    await onPostgres.run(3);
    await onPglite.run(3);
    const pgRounds: number[] = [];
    const liteRounds: number[] = [];
    for (let r = 0; r < rounds; r++) {
      liteRounds.push(await onPglite.run(k));
      pgRounds.push(await onPostgres.run(k));
      log(`  round ${r + 1}/${rounds}: PGlite ${ms(liteRounds[r])}, PostgreSQL ${ms(pgRounds[r])}`);
    }
    const lite = median(liteRounds);
    const base = median(pgRounds);
    return {
      key: 'pglite',
      title: 'embedded database: durable 1e6 step on PGlite (data directory)',
      figure: `${ms(lite)}/step`,
      baseline: `${ms(base)}/step on PostgreSQL`,
      ratio: lite / base,
      target: { op: '<=', value: 1.5 },
      notes: [`median of ${rounds} alternating rounds of ${k} sequential steps on each`],
    };
  } finally {
    await Promise.all(servers.map((s) => s.stop()));
    await db.drop();
    dir.drop();
  }
}

if (isMain(import.meta.url)) {
  const args = process.argv.slice(2);
  const opt = (name: string) => (args.includes(name) ? Number(args[args.indexOf(name) + 1]) : undefined);
  console.log(describe(await runPgliteBench({ rounds: opt('--rounds'), steps: opt('--steps') })));
}

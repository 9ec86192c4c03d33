// Compile-time checks of the client's public types: test/types.test.ts type-checks this file (so does
// `npm run typecheck`); it is never run. Each @ts-expect-error must be an error, everything else must not.
import type { ASGDClient, CheckpointFormat, StateDictFormat } from '../../src/index.ts';

export async function accepted(client: ASGDClient): Promise<void> {
  // Gradients: Float32Array, number[], or {shape, data} with either kind of data (the README's promise).
  await client.step('s', { w: { shape: [1], data: [1] } });
  await client.step('s', { w: { shape: [2], data: new Float32Array([1, 2]) }, b: [1, 2], c: new Float32Array(2) }, { format: 'json' });
  await client.createSessionFromTensors('s', { w: { shape: [1], data: [1] } });
  await client.createSession({ name: 's', params: [{ name: 'w', shape: [1], data: [1] }] });
  // Snapshot files in the formats the service answers in.
  await client.snapshotBytes('s', 1, 'checkpoint');
  await client.snapshotBytes('s', 1, 'checkpoint', 'pt');
  await client.snapshotBytes('s', 1, 'checkpoint', 'json');
  await client.snapshotBytes('s', 1, 'state_dict', 'safetensors');
  const checkpointFormats: CheckpointFormat[] = ['pt', 'json'];
  const stateDictFormats: StateDictFormat[] = ['pt', 'json', 'safetensors'];
  void checkpointFormats;
  void stateDictFormats;
  // The routes' options.
  await client.listSessions({ limit: 10, after: 'a', search: 'mnist', figures: true, storage: true });
  for await (const s of client.sessions({ search: 'mnist', figures: true })) void s.activity?.steps_last_minute;
  for await (const s of client.sessions(50)) void s.name;
  const m = await client.metrics('s', { afterVersion: 1, maxPoints: 100 });
  void m.downsampled;
  const n = await client.norms('s');
  void n.params[0].ax_norm;
  const h = await client.hyperparameterChanges('s', { afterVersion: 1, limit: 10 });
  void h.initial_param_groups;
  const hp = await client.hyperparameterChanges('s', { afterVersion: 1, maxPoints: 100 });
  void [hp.downsampled, hp.total_changes];
  for await (const e of client.events('s')) if (e.event === 'deleted') void (e.replaced === true);
  await client.loadParams('s', { w: [1] }, { ifMatch: 1, signal: AbortSignal.timeout(1000), retryBudgetMs: 1000 });
  await client.getSession('s', { signal: AbortSignal.timeout(1000), retryBudgetMs: 1000 });
  await client.waitForParams('s', 1, 30, { signal: AbortSignal.timeout(1000), retryBudgetMs: 1000 });
  // A change answers `replayed` (a retry of it with its Idempotency-Key); the state_dict is typed as it is read
  // (a JavaScript user's review: both were TS errors).
  const changed = await client.setHyperparameters('s', [{ lr: 0.1 }], { idempotencyKey: 'k' });
  const replays: (boolean | undefined)[] = [changed.replayed, (await client.loadParams('s', { w: [1] })).replayed, (await client.restoreSnapshot('s', 1)).replayed];
  void replays;
  const sd = await client.stateDict('s');
  const lr: number = sd.param_groups[0].lr;
  void [lr, sd.state['0'].ax];
  await client.loadStateDict('s', sd); // what is read can be loaded back
  const t = await client.getOwnToken();
  const scope: 'read' | 'step' | 'admin' = t.scope;
  void scope;
}

export async function rejected(client: ASGDClient): Promise<void> {
  // @ts-expect-error a checkpoint is pt or json: the service answers 400 to safetensors
  await client.snapshotBytes('s', 1, 'checkpoint', 'safetensors');
  // @ts-expect-error not a format of the service
  await client.snapshotBytes('s', 1, 'state_dict', 'npz');
  // @ts-expect-error gradient data are numbers
  await client.step('s', { w: { shape: [1], data: ['1'] } });
  // @ts-expect-error a tensor needs its shape
  await client.step('s', { w: { data: [1] } });
}

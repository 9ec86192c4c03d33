// A connection that PostgreSQL ends in the same packet as it says "ready" (its shutdown sends every backend
// FATAL 57P01, and a backend that has just started gets it right after its ReadyForQuery). pg parses both
// messages in one go: the pool hands the new client out (taking its own 'error' listener off) and, before
// the holder could listen, the client emits 'error' for the FATAL. Unheard, that ended a service process
// at a PostgreSQL restart in CI. Here a fake server does exactly that; the statements fail with a retryable
// error (a 503 to the client) and this process lives on.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, type Socket } from 'node:net';
import { test } from 'node:test';
import { openDatabase } from '../../src/db/database.ts';
import { classifyDbError } from '../../src/db/errors.ts';

/** A PostgreSQL backend message: type byte, length, body. */
const message = (type: string, body: Buffer) => {
  const head = Buffer.alloc(5);
  head.write(type, 0, 'latin1');
  head.writeInt32BE(body.length + 4, 1);
  return Buffer.concat([head, body]);
};
const int32s = (...values: number[]) => {
  const b = Buffer.alloc(4 * values.length);
  values.forEach((v, i) => b.writeInt32BE(v, 4 * i));
  return b;
};
const fields = (entries: [string, string][]) => Buffer.concat([...entries.map(([k, v]) => Buffer.from(`${k}${v}\0`, 'utf8')), Buffer.from([0])]);

/** Answers every connection's start-up with AuthenticationOk, BackendKeyData, ReadyForQuery and FATAL 57P01, in one write. */
async function endingServer(): Promise<{ port: number; connections: () => number; close(): void }> {
  const sockets = new Set<Socket>();
  let connections = 0;
  const server = createServer((socket) => {
    sockets.add(socket);
    connections++;
    socket.on('error', () => {});
    socket.once('data', () => {
      socket.end(Buffer.concat([
        message('R', int32s(0)),
        message('K', int32s(4242, 1234)),
        message('Z', Buffer.from('I')),
        message('E', fields([['S', 'FATAL'], ['V', 'FATAL'], ['C', '57P01'], ['M', 'terminating connection due to administrator command']])),
      ]));
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: (server.address() as { port: number }).port,
    connections: () => connections,
    close() {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

test('a connection ended right after its start-up: statements fail as retryable, nothing is thrown at the process', async (t) => {
  const server = await endingServer();
  t.after(() => server.close());
  const unheard: Error[] = [];
  const db = await openDatabase({ databaseUrl: `postgres://asgd@127.0.0.1:${server.port}/asgd`, dataDir: '', poolSize: 2, onError: (err) => unheard.push(err) });
  t.after(() => db.close());
  const uncaught: unknown[] = [];
  const onUncaught = (err: unknown) => uncaught.push(err);
  process.on('uncaughtException', onUncaught);
  t.after(() => process.off('uncaughtException', onUncaught));

  for (let i = 0; i < 3; i++) {
    await assert.rejects(db.query('SELECT 1'), (err) => classifyDbError(err) === 'retryable', 'a pooled statement');
    await assert.rejects(db.transaction((tx) => tx.query('SELECT 1')), (err) => classifyDbError(err) === 'retryable', 'a transaction');
  }
  await new Promise((resolve) => setTimeout(resolve, 50));
  assert.deepEqual(uncaught, []);
  assert.ok(server.connections() >= 6, `${server.connections()} connections: each try had a new one`);
  assert.ok(unheard.length > 0 && unheard.every((e) => (e as { code?: string }).code === '57P01'), 'the lost connections were reported to the log');
  assert.equal(db.poolStats().total, 0, 'no broken client kept in the pool');
});

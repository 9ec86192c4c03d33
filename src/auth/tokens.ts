// API tokens: `asgd_<id>_<secret>`, shown once, stored only as a sha256 of the whole token.
// The id half lets a request find its row without scanning; the secret half is checked in constant time.
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import type { Database } from '../db/database.ts';
import { drizzleOrm } from '../db/drizzle.ts';
import { tokens, type TokenRow } from '../db/schema.ts';

const { asc, eq } = drizzleOrm;

export const SCOPES = ['read', 'step', 'admin'] as const;
export type Scope = (typeof SCOPES)[number];

/** read < step < admin: a token may do what its scope and every lower scope allow. */
export const SCOPE_RANK: Record<Scope, number> = { read: 1, step: 2, admin: 3 };

/** Who a request acts as, once its token has been checked. */
export interface Principal {
  /** Token id, or "admin" for ASGD_ADMIN_TOKEN, or "anonymous" when auth is off. */
  tokenId: string;
  name: string;
  scope: Scope;
  /** null: every session; otherwise only these. */
  sessions: string[] | null;
}

const TOKEN_PATTERN = /^asgd_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$/;

export function sha256(text: string): Buffer {
  return createHash('sha256').update(text, 'utf8').digest();
}

/** Equal hashes, compared in constant time (both sides are 32-byte digests). */
export function sameHash(a: Buffer, b: Buffer): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}

export function newToken(): { id: string; token: string; hash: string } {
  const id = randomBytes(8).toString('hex');
  const token = `asgd_${id}_${randomBytes(32).toString('base64url')}`;
  return { id, token, hash: sha256(token).toString('hex') };
}

/** The id part of a well-formed token, or null. */
export function tokenIdOf(token: string): string | null {
  return TOKEN_PATTERN.exec(token)?.[1] ?? null;
}

export interface TokenInfo {
  id: string;
  name: string;
  scope: Scope;
  sessions: string[] | null;
  created_at: string;
  revoked_at: string | null;
}

export function tokenJson(row: TokenRow): TokenInfo {
  return {
    id: row.id,
    name: row.name,
    scope: row.scope,
    sessions: row.sessions ?? null,
    created_at: row.createdAt.toISOString(),
    revoked_at: row.revokedAt ? row.revokedAt.toISOString() : null,
  };
}

const DUMMY_HASH = sha256('asgd-serve: no such token');

export function createTokenStore(db: Database) {
  return {
    async create(input: { name: string; scope: Scope; sessions: string[] | null }): Promise<{ row: TokenRow; token: string }> {
      const { id, token, hash } = newToken();
      const [row] = await db.orm
        .insert(tokens)
        .values({ id, name: input.name, scope: input.scope, sessions: input.sessions, secretHash: hash })
        .returning();
      return { row, token };
    },

    async list(): Promise<TokenRow[]> {
      return db.orm.select().from(tokens).orderBy(asc(tokens.createdAt), asc(tokens.id));
    },

    /** Revokes a token; null when there is no token with this id. Revoking twice is not an error. */
    async revoke(id: string): Promise<TokenRow | null> {
      const [row] = await db.orm.select().from(tokens).where(eq(tokens.id, id));
      if (!row) return null;
      if (row.revokedAt) return row;
      const [updated] = await db.orm.update(tokens).set({ revokedAt: new Date() }).where(eq(tokens.id, id)).returning();
      return updated ?? row;
    },

    /** Whether the stored token `id` exists and is not revoked (for what outlives a request: event streams). */
    async isActive(id: string): Promise<boolean> {
      const [row] = await db.orm.select({ revokedAt: tokens.revokedAt }).from(tokens).where(eq(tokens.id, id));
      return row !== undefined && row.revokedAt === null;
    },

    /** The principal a presented token stands for, or null (unknown, malformed, revoked or wrong secret). */
    async verify(presented: string): Promise<Principal | null> {
      const id = tokenIdOf(presented);
      const hash = sha256(presented);
      if (!id) {
        sameHash(hash, DUMMY_HASH); // the same work as a real comparison
        return null;
      }
      const [row] = await db.orm.select().from(tokens).where(eq(tokens.id, id));
      const stored = row ? Buffer.from(row.secretHash, 'hex') : DUMMY_HASH;
      if (!sameHash(hash, stored) || !row || row.revokedAt) return null;
      return { tokenId: row.id, name: row.name, scope: row.scope, sessions: row.sessions ?? null };
    },
  };
}

export type TokenStore = ReturnType<typeof createTokenStore>;

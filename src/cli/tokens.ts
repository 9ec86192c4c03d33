// `asgd-serve tokens ls|create|revoke`: API tokens, over the API (an admin token is needed).
import { positionals, stringOption, type ParsedArgs } from './args.ts';
import { EXIT, usageError } from './http.ts';
import { age, table } from './output.ts';
import type { OpsContext } from './context.ts';

interface Token { id: string; name: string; scope: string; sessions: string[] | null; created_at: string; revoked_at: string | null; token?: string }

export const TOKEN_OPTIONS = {
  scope: { kind: 'value' },
  sessions: { kind: 'value' },
  all: { kind: 'switch' },
} as const;

/** The options each command takes (beside --url, --token, --json, --help): any other is refused naming it. */
export const TOKEN_COMMAND_OPTIONS: Record<string, readonly (keyof typeof TOKEN_OPTIONS)[]> = {
  ls: ['all'],
  list: ['all'],
  create: ['scope', 'sessions'],
  revoke: [],
};

export async function tokensCommand(sub: string | undefined, args: ParsedArgs, ctx: OpsContext): Promise<number> {
  switch (sub) {
    case 'ls':
    case 'list': {
      positionals(args, [], 'tokens ls');
      const { tokens } = await ctx.client.json<{ tokens: Token[] }>('GET', '/v1/tokens');
      // Revoked tokens are kept for the record; --all shows them.
      const shown = args.options.all ? tokens : tokens.filter((t) => t.revoked_at === null);
      if (ctx.json) return ctx.print({ tokens: shown });
      if (shown.length === 0) {
        ctx.out('no tokens\n');
        return EXIT.ok;
      }
      ctx.out(table(
        ['ID', 'NAME', 'SCOPE', 'SESSIONS', 'CREATED', 'REVOKED'],
        shown.map((t) => [t.id, t.name, t.scope, t.sessions ? t.sessions.join(',') : 'all', `${age(t.created_at)} ago`, t.revoked_at ? `${age(t.revoked_at)} ago` : '-']),
      ));
      return EXIT.ok;
    }
    case 'create': {
      const [name] = positionals(args, ['name'], 'tokens create');
      const scope = stringOption(args, 'scope');
      if (!scope || !['read', 'step', 'admin'].includes(scope)) throw usageError('tokens create: --scope must be read, step or admin');
      const list = stringOption(args, 'sessions');
      const sessions = list === undefined ? null : list.split(',').map((s) => s.trim()).filter(Boolean);
      if (sessions?.length === 0) throw usageError('tokens create: --sessions must name at least one session (a,b); leave it out for a token of every session');
      const token = await ctx.client.json<Token>('POST', '/v1/tokens', { name, scope, sessions });
      if (ctx.json) return ctx.print(token);
      // The secret alone on stdout (for `$(asgd-serve tokens create ...)`); the rest is for the person.
      ctx.err(`token ${token.id} (${token.name}): scope ${token.scope}, sessions ${token.sessions ? token.sessions.join(',') : 'all'}; the secret is shown only now:\n`);
      ctx.out(`${token.token}\n`);
      return EXIT.ok;
    }
    case 'revoke': {
      const [id] = positionals(args, ['id'], 'tokens revoke');
      // A whole token (asgd_<id>_<secret>) is accepted too: its id is the part after asgd_.
      const tokenId = /^asgd_([0-9a-f]{16})_/.exec(id)?.[1] ?? id;
      if (!/^[0-9a-f]{16}$/.test(tokenId)) throw usageError(`tokens revoke: ${JSON.stringify(id)} is not a token id (16 hex digits, as tokens ls shows)`);
      await ctx.client.json('DELETE', `/v1/tokens/${tokenId}`);
      if (ctx.json) return ctx.print({ revoked: tokenId });
      ctx.out(`revoked token ${tokenId}\n`);
      return EXIT.ok;
    }
    default:
      throw usageError(sub === undefined ? 'tokens: say what to do (ls, create, revoke)' : `tokens: unknown command ${JSON.stringify(sub)} (ls, create, revoke)`);
  }
}

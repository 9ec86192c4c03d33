// The operator commands against a running service: `asgd-serve sessions ...` and `asgd-serve tokens ...`.
// URL and token come from --url / --token or ASGD_URL / ASGD_TOKEN. Every failure is one line on stderr
// (never a stack trace) and an exit code a script can test: see EXIT in http.ts and the README.
import { createInterface } from 'node:readline/promises';
import type { Writable } from 'node:stream';
import { parseOptions, stringOption, type OptionSpec } from './args.ts';
import type { OpsContext } from './context.ts';
import { CliError, createClient, EXIT, usageError } from './http.ts';
import { printable } from './output.ts';
import { SESSION_COMMAND_OPTIONS, SESSION_OPTIONS, sessionsCommand } from './sessions.ts';
import { TOKEN_COMMAND_OPTIONS, TOKEN_OPTIONS, tokensCommand } from './tokens.ts';

export const OPS_COMMANDS = ['sessions', 'tokens'] as const;

export interface OpsIo {
  stdout: { write(text: string): unknown };
  stderr: { write(text: string): unknown };
  /** Standard input and output are a terminal: questions may be asked (rm), progress drawn. */
  interactive?: boolean;
  /** Asks a yes/no question (tests answer it); default: a line read from standard input. */
  confirm?: (question: string) => Promise<boolean>;
  /** Where `download -o -` writes (default: process.stdout). */
  stdoutStream?: () => Writable;
}


const COMMON: Record<string, OptionSpec> = {
  url: { kind: 'value' },
  token: { kind: 'value' },
  json: { kind: 'switch' },
  help: { kind: 'switch', short: 'h' },
};

export function opsUsage(): string {
  return `Usage: asgd-serve sessions|tokens COMMAND [options]   (against a running service)

  sessions ls [--limit N]                 every session: version, step, parameters, stored bytes, log steps, snapshots, idle time, expiry
  sessions show NAME                      settings, storage and snapshots of one session
  sessions rm NAME [--yes] [--if-match VERSION]
                                          delete it with its snapshots and log (asks on a terminal; only the
                                          version it asked about)
  sessions snapshot NAME [--pin]          take a snapshot now (pinned: kept until unpinned)
  sessions download NAME --format pt|safetensors|json -o FILE [--what checkpoint|state_dict|params]
                    [--snapshot ID | --version V]
                                          checkpoint (default; torch.save), the optimizer's state_dict or the
                                          parameters (default for safetensors); -o - writes to stdout
  sessions import NAME FILE [--what checkpoint|state_dict|params] [--if-match VERSION]
                                          load a torch.save, safetensors or JSON file into the session: a
                                          checkpoint, the optimizer's state_dict or the parameters, as the file
                                          holds (--what to say so); prints the new version
  sessions restore NAME --snapshot ID [--yes] [--if-match VERSION]
                                          roll back to a snapshot, as a new version (asks on a terminal)
  sessions fork NAME NEW_NAME [--snapshot ID] [--snapshot-every N] [--keep-snapshots N]
                    [--max-staleness N|none] [--keep-log-bytes N|none] [--expire-after-idle-s S|none]
                                          a new session from the current state or a snapshot (settings: the
                                          source's unless given)
  tokens ls [--all]                       API tokens (--all: revoked ones too)
  tokens create NAME --scope read|step|admin [--sessions a,b]
                                          prints the secret once, alone on stdout
  tokens revoke ID                        revoke at once on every replica

Options:
  --url URL       the service (default $ASGD_URL, else http://127.0.0.1:8080)
  --token TOKEN   bearer token (default $ASGD_TOKEN, else $ASGD_ADMIN_TOKEN)
  --json          machine-readable output on stdout (import, restore, fork: the session as the API answers it)
  --help          this help

Exit codes: 0 ok, 1 the service refused or failed (5xx, 409, ...), 2 usage (bad arguments, or the
service answered 400), 3 not found (session, snapshot, version, token), 4 authentication (401/403), 5 unreachable.
`;
}

function defaultConfirm(question: string): Promise<boolean> {
  const rl = createInterface({ input: process.stdin, output: process.stderr });
  return rl.question(question).then((answer) => /^y(es)?$/i.test(answer.trim())).finally(() => rl.close());
}

export async function runOps(argv: string[], env: Record<string, string | undefined>, io: OpsIo): Promise<number> {
  const [group, sub, ...rest] = argv;
  try {
    const spec = { ...COMMON, ...(group === 'sessions' ? SESSION_OPTIONS : TOKEN_OPTIONS) } as Record<string, OptionSpec>;
    const args = parseOptions(sub?.startsWith('-') ? [sub, ...rest] : rest, spec);
    if (args.options.help || sub === 'help') {
      io.stdout.write(opsUsage());
      return EXIT.ok;
    }
    // An option the command does not take is refused, not ignored (rm --if-match once deleted any version).
    const takes = (group === 'sessions' ? SESSION_COMMAND_OPTIONS : TOKEN_COMMAND_OPTIONS)[sub ?? ''] as readonly string[] | undefined;
    const foreign = takes && Object.keys(args.options).find((o) => !(o in COMMON) && !takes.includes(o));
    if (foreign) throw usageError(`unknown option --${foreign} for ${group} ${sub}${takes.length ? ` (it takes ${takes.map((o) => `--${o}`).join(', ')})` : ''}`);
    const json = args.options.json === true;
    const client = createClient(stringOption(args, 'url') ?? (env.ASGD_URL?.trim() || 'http://127.0.0.1:8080'), stringOption(args, 'token') ?? (env.ASGD_TOKEN?.trim() || env.ASGD_ADMIN_TOKEN?.trim() || null));
    const interactive = io.interactive ?? false;
    const ctx: OpsContext = {
      client,
      json,
      interactive,
      progress: interactive && !json,
      out: (text) => void io.stdout.write(text),
      err: (text) => void io.stderr.write(text),
      print: (value) => {
        io.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
        return EXIT.ok;
      },
      confirm: io.confirm ?? defaultConfirm,
      stdoutStream: io.stdoutStream ?? (() => process.stdout),
    };
    const command = sub?.startsWith('-') ? undefined : sub;
    return group === 'sessions' ? await sessionsCommand(command, args, ctx) : await tokensCommand(command, args, ctx);
  } catch (err) {
    if (err instanceof CliError) {
      io.stderr.write(`asgd-serve: ${err.message}\n`);
      if (err.showUsage) io.stderr.write(`\n${opsUsage()}`);
      return err.exitCode;
    }
    // An answer of another shape than the service's (a field missing, null): the CLI read a property of
    // nothing. Not an asgd-serve answer, as one that is not JSON (exit 5).
    if (err instanceof TypeError) {
      io.stderr.write(`asgd-serve: ${group} ${sub ?? ''}: the service's answer is not what an asgd-serve sends (${printable(err.message)}): is --url (or ASGD_URL) an asgd-serve of this version?\n`);
      return EXIT.unreachable;
    }
    // Nothing a person can act on is in a stack trace: one line, and exit 1.
    io.stderr.write(`asgd-serve: ${group} ${sub ?? ''} failed: ${printable((err as Error)?.message ?? String(err))}\n`);
    return EXIT.server;
  }
}

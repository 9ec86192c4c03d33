// Options of the operator commands: `--name value`, `--name=value`, `--switch`, short aliases (-o, -y).
import { usageError } from './http.ts';

export interface OptionSpec {
  /** A switch takes no value. */
  kind: 'switch' | 'value';
  short?: string;
}

export interface ParsedArgs {
  positional: string[];
  options: Record<string, string | true>;
}

export function parseOptions(argv: string[], spec: Record<string, OptionSpec>): ParsedArgs {
  const byShort = new Map(Object.entries(spec).filter(([, s]) => s.short).map(([name, s]) => [`-${s.short}`, name]));
  const positional: string[] = [];
  const options: Record<string, string | true> = {};
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--') {
      positional.push(...argv.slice(i + 1));
      break;
    }
    if (!arg.startsWith('-') || arg === '-') {
      positional.push(arg);
      continue;
    }
    const eq = arg.indexOf('=');
    const raw = eq === -1 ? arg : arg.slice(0, eq);
    const name = raw.startsWith('--') ? raw.slice(2) : byShort.get(raw);
    const option = name === undefined ? undefined : spec[name];
    if (name === undefined || !option) throw usageError(`unknown option ${raw}`);
    if (option.kind === 'switch') {
      if (eq !== -1) throw usageError(`${raw} takes no value`);
      options[name] = true;
      continue;
    }
    let value = eq === -1 ? undefined : arg.slice(eq + 1);
    if (value === undefined) {
      if (i + 1 >= argv.length) throw usageError(`${raw} needs a value`);
      value = argv[++i];
    }
    options[name] = value;
  }
  return { positional, options };
}

/** The option's value as a string, or undefined when absent. */
export const stringOption = (args: ParsedArgs, name: string): string | undefined => {
  const v = args.options[name];
  return typeof v === 'string' ? v : undefined;
};

export function wholeOption(args: ParsedArgs, name: string, min = 1): number | undefined {
  const v = stringOption(args, name);
  if (v === undefined) return undefined;
  if (!/^\d{1,15}$/.test(v) || Number(v) < min) throw usageError(`--${name}: must be a whole number >= ${min}, got ${JSON.stringify(v)}`);
  return Number(v);
}

/** Exactly `names.length` positional arguments, named in the message when one is missing. */
export function positionals(args: ParsedArgs, names: string[], command: string): string[] {
  if (args.positional.length < names.length) throw usageError(`${command}: missing ${names.slice(args.positional.length).map((n) => n.toUpperCase()).join(' ')}`);
  if (args.positional.length > names.length) throw usageError(`${command}: unexpected argument ${JSON.stringify(args.positional[names.length])}`);
  return args.positional;
}

// What an operator command gets to work with: the API client and the terminal.
import type { Writable } from 'node:stream';
import type { ApiClient } from './http.ts';

export interface OpsContext {
  client: ApiClient;
  json: boolean;
  interactive: boolean;
  /** Draw download progress (stderr is a terminal and the output is not JSON). */
  progress: boolean;
  out(text: string): void;
  err(text: string): void;
  print(value: unknown): number;
  confirm(question: string): Promise<boolean>;
  stdoutStream(): Writable;
}

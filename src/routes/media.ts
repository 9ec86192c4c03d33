// The media types of the API, in one table: which types each route family accepts as a body and offers
// as an answer. The body parsers (src/plugins/content-types.ts), the 415 check, content negotiation and
// the OpenAPI document are built from it. A new file format is an entry here plus its code in src/formats.
import type { FastifyRequest } from 'fastify';
import { errors, headerText } from '../errors.ts';

/** Each wire format's media types; the first is the one answers carry. */
export const MEDIA = {
  json: ['application/json'],
  pt: ['application/octet-stream', 'application/vnd.pytorch'],
  safetensors: ['application/x-safetensors', 'application/safetensors'],
} as const;
export type WireFormat = keyof typeof MEDIA;

/** The route families: the formats a body may come in (first: the default) and an answer may go out in. */
export const ROUTE_MEDIA = {
  create: { accepts: ['json', 'safetensors', 'pt'] },
  step: { accepts: ['json', 'safetensors', 'pt'] },
  params: { accepts: ['json', 'safetensors', 'pt'], offers: ['json', 'pt', 'safetensors'] },
  stateDict: { accepts: ['json', 'pt', 'safetensors'], offers: ['json', 'pt', 'safetensors'] },
  checkpoint: { accepts: ['json', 'pt'], offers: ['pt', 'json'] },
} as const satisfies Record<string, { accepts?: readonly WireFormat[]; offers?: readonly WireFormat[] }>;

/** Media types a body is read as bytes for: every non-JSON type of the table. */
export const BINARY_MEDIA_TYPES: readonly string[] = [...MEDIA.pt, ...MEDIA.safetensors];

/** The media types of these formats, for a route's `consumes`. */
export const mediaTypes = (formats: readonly WireFormat[]): string[] => formats.flatMap((f) => MEDIA[f]);

/** The wire format of a request body, from its Content-Type (fastify's parsed media type). */
export function contentFormat(request: FastifyRequest): WireFormat {
  const type = request.mediaType ?? '';
  for (const format of ['safetensors', 'pt'] as const) if ((MEDIA[format] as readonly string[]).includes(type)) return format;
  return 'json';
}

/**
 * The format from ?format= or else the Accept header (RFC 9110 section 12.5.1): each offered format takes
 * the quality of the most specific range that names it (its type, then application/*, then *\/*), so
 * `application/json;q=0, *\/*` excludes JSON; the highest quality wins, a tie goes to the range listed first,
 * then to the route's order (its first offer is the default).
 */
/** The ranges of an Accept header (the first 32), lower-cased, each with its quality (0 to 1) and its place. */
function acceptRanges(accept: string): { type: string; q: number; index: number }[] {
  return accept.split(',').slice(0, 32).map((part, index) => {
    const [type, ...params] = part.trim().toLowerCase().split(';');
    const q = params.map((p) => p.trim()).find((p) => p.startsWith('q='));
    const quality = q ? Number(q.slice(2)) : 1;
    return { type: type.trim(), q: Number.isFinite(quality) ? Math.min(Math.max(quality, 0), 1) : 0, index };
  });
}

/**
 * Refuses (406) a request whose Accept excludes `type` (`text/event-stream`) by negotiate's rule: the most
 * specific range naming it (the type, its `text/*`, `*\/*`) decides, and a quality of 0 excludes it. No
 * Accept takes it.
 */
export function requireAccepts(request: FastifyRequest, type: string): void {
  const accept = request.headers.accept;
  if (!accept) return;
  const major = `${type.split('/')[0]}/*`;
  let match: { specificity: number; q: number } | null = null;
  for (const r of acceptRanges(accept)) {
    const specificity = r.type === type ? 2 : r.type === major ? 1 : r.type === '*/*' ? 0 : -1;
    if (specificity < 0) continue;
    if (!match || specificity > match.specificity || (specificity === match.specificity && r.q > match.q)) match = { specificity, q: r.q };
  }
  if (!match || match.q <= 0) throw errors.notAcceptable(headerText(accept).slice(0, 200), type);
}

const jsonOnly = new WeakMap<object, boolean>();

/**
 * Whether a route's answer is JSON and nothing else: its 200 (or 201) is a schema of its own, not a map of
 * media types (the downloads, the step and the event stream choose theirs by Accept).
 */
function answersJsonOnly(schema: { response?: Record<string, unknown> } | undefined): boolean {
  if (!schema?.response) return false;
  let known = jsonOnly.get(schema);
  if (known === undefined) {
    const ok = (schema.response[200] ?? schema.response[201]) as { content?: unknown } | undefined;
    known = ok !== undefined && ok.content === undefined;
    jsonOnly.set(schema, known);
  }
  return known;
}

/**
 * An API route that answers JSON alone refuses an Accept that excludes it (406), as the routes that
 * negotiate do (a review: GET of a session, its metrics, norms or snapshots answered JSON to
 * Accept: application/octet-stream). Before the body and the database.
 */
export function refuseUnacceptableJson(request: FastifyRequest): void {
  // /v1 only: health probes (a load balancer's, a kubelet's) are answered whatever they accept.
  if (request.headers.accept && request.url.startsWith('/v1/') && answersJsonOnly(request.routeOptions.schema as { response?: Record<string, unknown> } | undefined)) requireAccepts(request, 'application/json');
}

export function negotiate(request: FastifyRequest, queryFormat: string | undefined, offered: readonly WireFormat[]): WireFormat {
  if (queryFormat !== undefined) {
    if (!(offered as readonly string[]).includes(queryFormat)) throw errors.invalidQuery('format', `must be one of ${offered.join(', ')}`);
    return queryFormat as WireFormat;
  }
  const accept = request.headers.accept;
  if (!accept) return offered[0];
  const ranges = acceptRanges(accept);
  let best: { format: WireFormat; q: number; index: number } | null = null;
  for (const format of offered) {
    // The most specific range naming this format decides its quality (of two exact ones, the higher).
    let match: { specificity: number; q: number; index: number } | null = null;
    for (const r of ranges) {
      const specificity = (MEDIA[format] as readonly string[]).includes(r.type) ? 2 : r.type === 'application/*' ? 1 : r.type === '*/*' ? 0 : -1;
      if (specificity < 0) continue;
      if (!match || specificity > match.specificity || (specificity === match.specificity && r.q > match.q)) match = { specificity, q: r.q, index: r.index };
    }
    if (match && match.q > 0 && (!best || match.q > best.q || (match.q === best.q && match.index < best.index))) best = { format, q: match.q, index: match.index };
  }
  if (best) return best.format;
  throw errors.notAcceptable(headerText(accept).slice(0, 200), offered.map((f) => MEDIA[f][0]).join(', '));
}

// GET /: where to go from here. API clients (curl, fetch: Accept */* or application/json) get the links as
// JSON; a browser (Accept text/html first) gets the same links as a small page.
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import { SERVICE_VERSION } from '../../banner.ts';
import { errorResponses } from '../schemas.ts';

/** The dashboard's path (served by the UI plugin). */
export const DASHBOARD_PATH = '/ui';

export const LINKS = {
  docs: '/docs',
  openapi: '/docs/json',
  dashboard: DASHBOARD_PATH,
  sessions: '/v1/sessions',
  health: '/healthz',
  ready: '/readyz',
  metrics: '/metrics',
} as const;

const Index = Type.Object({
  name: Type.Literal('asgd-serve'),
  version: Type.String(),
  links: Type.Object(Object.fromEntries(Object.keys(LINKS).map((key) => [key, Type.String()])) as Record<keyof typeof LINKS, ReturnType<typeof Type.String>>),
});

const DESCRIPTIONS: Record<keyof typeof LINKS, string> = {
  docs: 'API documentation (Swagger UI)',
  openapi: 'OpenAPI document',
  dashboard: 'Dashboard',
  sessions: 'Sessions (JSON; needs a token when auth is on)',
  health: 'Liveness',
  ready: 'Readiness',
  metrics: 'Prometheus metrics',
};

const page = () =>
  `<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>asgd-serve</title></head><body>\n` +
  `<h1>asgd-serve ${SERVICE_VERSION}</h1>\n<ul>\n` +
  Object.entries(LINKS).map(([key, href]) => `<li><a href="${href}">${DESCRIPTIONS[key as keyof typeof LINKS]}</a> <code>${href}</code></li>\n`).join('') +
  `</ul>\n</body></html>\n`;

/** The media type an Accept header prefers of JSON and HTML: highest q, then the first listed; JSON when neither. */
export function prefersHtml(accept: string | undefined): boolean {
  let best: { html: boolean; q: number } | null = null;
  for (const part of (accept ?? '').split(',')) {
    const [type, ...params] = part.split(';').map((s) => s.trim().toLowerCase());
    if (type !== 'text/html' && type !== 'application/json') continue;
    const q = Number(params.find((p) => p.startsWith('q='))?.slice(2) ?? 1);
    if (!(q > 0)) continue;
    if (best === null || q > best.q) best = { html: type === 'text/html', q };
  }
  return best?.html ?? false;
}

const rootRoutes: FastifyPluginAsyncTypebox = async (fastify) => {
  fastify.get('/', {
    config: { scope: 'public' },
    schema: {
      operationId: 'index',
      summary: 'Links to the documentation, the dashboard and the API',
      description: 'JSON by default; an HTML page of the same links when the Accept header prefers text/html (a browser).',
      tags: ['operations'],
      response: {
        200: {
          description: 'The links',
          content: {
            'application/json': { schema: Index },
            'text/html': { schema: Type.String() },
          },
        },
        // With auth off, a Host that is not a loopback name is refused on every route (found by a review).
        ...errorResponses(403),
      },
    },
  }, async (request, reply) => {
    reply.header('vary', 'Accept');
    if (prefersHtml(request.headers.accept)) {
      // Links only: no script, no style, and no page may frame it.
      reply.header('content-security-policy', "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'").header('x-frame-options', 'DENY');
      return reply.type('text/html; charset=utf-8').send(page());
    }
    return reply.type('application/json; charset=utf-8').send({ name: 'asgd-serve' as const, version: SERVICE_VERSION, links: { ...LINKS } });
  });
};

export default rootRoutes;

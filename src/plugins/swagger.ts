// The OpenAPI document as a named plugin, generated from the route schemas; Swagger UI at /docs.
// Access and the errors every route can get from the infrastructure (auth, limits, load shedding) are
// added here from the route config, so route schemas only describe their own errors.
import { readFileSync } from 'node:fs';
import fp from 'fastify-plugin';
import type { FastifyInstance } from 'fastify';
import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import { ErrorBody } from '../routes/schemas.ts';
import { finishDocument } from './openapi-document.ts';
import { withAccess } from './auth.ts';

const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string; description: string; license: string };

type Schema = Record<string, unknown> & { response?: Record<string, unknown>; body?: unknown; params?: unknown; querystring?: unknown; headers?: unknown; description?: string };

export default fp(
  async function swaggerPlugin(fastify: FastifyInstance) {
    await fastify.register(swagger, {
      openapi: {
        openapi: '3.0.3',
        info: {
          title: 'asgd-serve',
          description: `${pkg.description}.\n\nEvery error answers JSON {statusCode, code, error, message}; \`code\` is stable. ` +
            'Send `Authorization: Bearer <token>` (ASGD_ADMIN_TOKEN, or a token from POST /v1/tokens). Scopes: read < step < admin; ' +
            'each operation lists the scope it needs as `x-scope`.',
          version: pkg.version,
          license: { name: pkg.license, url: `https://spdx.org/licenses/${pkg.license}.html` },
        },
        // Relative: the document describes the server that serves it (GET /docs/json).
        servers: [{ url: '/', description: 'The server this document was read from' }],
        components: {
          securitySchemes: {
            bearerAuth: { type: 'http', scheme: 'bearer', description: 'ASGD_ADMIN_TOKEN, or asgd_<id>_<secret> from POST /v1/tokens' },
          },
        },
        tags: [
          { name: 'sessions', description: 'Create, list, read, change and delete training sessions' },
          { name: 'training', description: 'Optimizer steps' },
          { name: 'state', description: 'Parameters, optimizer state_dict and checkpoints: JSON, torch.save or safetensors' },
          { name: 'snapshots', description: 'History: snapshots, pinning, restore, fork' },
          { name: 'tokens', description: 'API tokens (admin)' },
          { name: 'operations', description: 'Health, readiness and metrics (no token)' },
        ],
      },
      transform: ({ schema, url, route }) => {
        const s: Schema = { ...((schema ?? {}) as Schema) };
        if (s.hide !== true && typeof s.operationId !== 'string') throw new Error(`route ${route.method} ${url}: its schema needs an operationId`);
        // `consumes` is what the route accepts (src/plugins/content-types.ts enforces it): JSON with the
        // route's body schema, files as binary strings read by their format's parser.
        if (Array.isArray(s.consumes) && s.consumes.length > 0) {
          const json = (s.body as { content?: Record<string, { schema: unknown }> } | undefined)?.content?.['application/json']?.schema ?? s.body ?? { type: 'object' };
          s.body = {
            content: Object.fromEntries((s.consumes as string[]).map((type) => [
              type,
              { schema: type === 'application/json' ? json : { type: 'string', format: 'binary' } },
            ])),
          };
          delete s.consumes;
        }
        const response: Record<string, unknown> = { ...(s.response ?? {}) };
        const scope = route.config?.scope ?? 'admin';
        const statuses: number[] = [];
        // Public routes say so: an empty requirement overrides any global one.
        s.security = [];
        if (scope !== 'public') {
          s.security = [{ bearerAuth: [] }];
          s['x-scope'] = scope;
          if (route.config?.allSessions) s['x-all-sessions'] = true;
          s.description = `${s.description ? `${s.description}\n\n` : ''}Needs a token with scope \`${scope}\`${route.config?.allSessions ? ' that is not limited to a list of sessions' : ''}.`;
          statuses.push(401, 403, 429);
        }
        // Every /v1 route refuses query parameters it does not read (400 INVALID_QUERY).
        if (s.body || s.params || s.querystring || s.headers || url.startsWith('/v1/')) statuses.push(400);
        // A route without a body (DELETE, a restore) refuses one: 415 for another type, 413 for a large one.
        const readsBody = ![route.method].flat().every((m) => m === 'GET' || m === 'HEAD');
        if (s.body || readsBody) statuses.push(413, 415);
        // 503: the database away (/v1, /readyz) or the process under pressure (all but /healthz and /metrics).
        if (url !== '/healthz' && url !== '/metrics') statuses.push(503);
        for (const status of statuses) {
          if (!response[status]) response[status] = ErrorBody;
        }
        s.response = response;
        // '/v1/sessions/' (a prefix's root route) is documented as '/v1/sessions'; fastify answers both.
        return { schema: s as typeof schema, url: url.length > 1 ? url.replace(/\/+$/, '') : url };
      },
      transformObject: (document) => finishDocument(('openapiObject' in document ? document.openapiObject : document.swaggerObject) as Record<string, unknown>),
    });
    // The docs UI and the document it shows are open, like the service's description at GET /.
    // Swagger UI's own Content-Security-Policy, with no framing by any page (it allowed its own origin) and
    // without upgrade-insecure-requests (it made a browser ask for the page's files over https on a plain
    // http service); X-Frame-Options for browsers without frame-ancestors.
    await fastify.register(withAccess({ scope: 'public', allSessions: false }, swaggerUi), {
      routePrefix: '/docs',
      uiConfig: { deepLinking: true },
      staticCSP: true,
      transformStaticCSP: (csp: string) => csp.replace("frame-ancestors 'self'", "frame-ancestors 'none'").replace("style-src 'self'", "style-src 'self' 'unsafe-inline'").replace(/\s*upgrade-insecure-requests;?/, '').trim(),
      uiHooks: { onRequest: (_request, reply, done) => { reply.header('x-frame-options', 'DENY'); done(); } },
    });
  },
  { name: 'swagger', dependencies: ['auth'] },
);

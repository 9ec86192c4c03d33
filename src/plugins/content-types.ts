// The body-parser policy, built from the media table (src/routes/media.ts): JSON read as bytes and bounded
// before it becomes a string, files as one bounded Buffer, and every route held to the types it lists.
import fp from 'fastify-plugin';
import type { FastifyInstance } from 'fastify';
import type { Config } from '../config.ts';
import { errors } from '../errors.ts';
import { BINARY_MEDIA_TYPES } from '../routes/media.ts';
import { acceptedTypes, unsupportedMediaType } from './errors.ts';

export default fp(
  async function contentTypesPlugin(fastify: FastifyInstance, opts: { config: Config }) {
    const limit = opts.config.bodyLimitJson;
    // Bodies are JSON or files; fastify's default text/plain parser would hand routes a string.
    fastify.removeContentTypeParser('text/plain');
    // JSON arrives as bytes and is bounded before it becomes one string: a text beyond V8's string limit
    // (~512 MiB) would otherwise throw inside the body reader and take the process down.
    const parseJson = fastify.getDefaultJsonParser('error', 'error');
    fastify.removeContentTypeParser('application/json');
    fastify.addContentTypeParser('application/json', { parseAs: 'buffer' }, (request, body, done) => {
      const bytes = body as Buffer;
      if (bytes.length > limit) {
        done(errors.jsonBodyTooLarge(limit), undefined);
        return;
      }
      parseJson(request, bytes.toString('utf8'), done);
    });
    fastify.addHook('preParsing', async (request) => {
      // Refuse a JSON body announced as too large before reading it.
      if (request.mediaType === 'application/json' && Number(request.headers['content-length']) > limit) throw errors.jsonBodyTooLarge(limit);
    });
    // Files (torch.save, safetensors) arrive as one Buffer, bounded by the route's bodyLimit; their format's
    // reader in src/formats checks them, not AJV (route schemas key their body schema by media type).
    fastify.addContentTypeParser([...BINARY_MEDIA_TYPES], { parseAs: 'buffer' }, (_request, body, done) => done(null, body));
    // A route accepts the media types its schema lists in `consumes` (JSON only when it lists none); the
    // parsers above are global, so without this a file sent to a JSON route would reach its handler.
    fastify.addHook('preValidation', async (request) => {
      if (request.headers['content-type'] === undefined || request.body === undefined) return;
      if (!acceptedTypes(request).includes(request.mediaType ?? '')) throw unsupportedMediaType(request);
    });
  },
  { name: 'content-types' },
);

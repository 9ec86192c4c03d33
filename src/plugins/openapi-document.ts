// Post-processing of the generated OpenAPI document, so that it says once what routes share and is valid
// OpenAPI 3.0 (which predates JSON Schema's const, null type and patternProperties):
// - schemas with a `title` become components.schemas.<title>, referenced by $ref;
// - every error response is components.responses.Error<status>, whose schema lists the codes that status
//   can carry (from the catalogue in src/errors.ts);
// - JSON Schema forms 3.0 lacks are rewritten (const -> enum, {anyOf: [X, null]} -> X nullable,
//   patternProperties -> additionalProperties, examples -> example).
import { STATUS_CODES } from 'node:http';
import { CODES, codesOfStatus } from '../errors.ts';

type Json = Record<string, unknown>;
const isObject = (v: unknown): v is Json => v !== null && typeof v === 'object' && !Array.isArray(v);

/** JSON Schema (TypeBox output) as OpenAPI 3.0 schema; titled schemas collected into `components`. */
function toOpenApiSchema(schema: unknown, components: Json): unknown {
  if (Array.isArray(schema)) return schema.map((s) => toOpenApiSchema(s, components));
  if (!isObject(schema)) return schema;
  let s: Json = { ...schema };
  if ('const' in s) {
    s.enum = [s.const];
    delete s.const;
  }
  if (Array.isArray(s.anyOf)) {
    const others = (s.anyOf as Json[]).filter((b) => !(isObject(b) && b.type === 'null'));
    if (others.length < s.anyOf.length) {
      const { anyOf: _drop, ...rest } = s;
      s = others.length === 1 ? { ...others[0], ...rest, nullable: true } : { ...rest, anyOf: others, nullable: true };
    }
    // A union of literals is an enum.
    if (Array.isArray(s.anyOf) && s.anyOf.every((b) => isObject(b) && 'const' in b && b.type === (s.anyOf as Json[])[0].type)) {
      const branches = s.anyOf as Json[];
      const { anyOf: _drop, ...rest } = s;
      s = { type: branches[0].type, enum: branches.map((b) => b.const), ...rest };
    }
  }
  if (isObject(s.patternProperties)) {
    const values = Object.values(s.patternProperties);
    if (values.length === 1) s.additionalProperties = values[0];
    delete s.patternProperties;
  }
  if (Array.isArray(s.examples)) {
    if (s.examples.length > 0 && s.example === undefined) s.example = s.examples[0];
    delete s.examples;
  }
  for (const [key, value] of Object.entries(s)) {
    if (key === 'properties' && isObject(value)) {
      s[key] = Object.fromEntries(Object.entries(value).map(([k, v]) => [k, toOpenApiSchema(v, components)]));
    } else if (['items', 'additionalProperties', 'anyOf', 'allOf', 'oneOf', 'not'].includes(key)) {
      s[key] = toOpenApiSchema(value, components);
    }
  }
  const title = typeof s.title === 'string' ? s.title : null;
  if (title === null) return s;
  const existing = components[title];
  if (existing !== undefined && JSON.stringify(existing) !== JSON.stringify(s)) {
    throw new Error(`OpenAPI: two different schemas are titled ${title}; give one another title`);
  }
  components[title] = s;
  return { $ref: `#/components/schemas/${title}` };
}

/** The error response of a status: the codes it can carry, with their meanings. */
function errorResponse(status: number): Json {
  const codes = codesOfStatus(status);
  return {
    description: `${STATUS_CODES[status] ?? 'Error'}. The \`code\` is one of:\n\n${codes.map((c) => `- \`${c}\`: ${CODES[c].meaning}`).join('\n')}`,
    content: { 'application/json': { schema: { $ref: `#/components/schemas/Error${status}` } } },
  };
}

function errorSchema(status: number): Json {
  const codes = codesOfStatus(status);
  return {
    type: 'object',
    description: `An error of status ${status}: a stable code and a message that starts with the field at fault`,
    required: ['statusCode', 'code', 'error', 'message'],
    properties: {
      statusCode: { type: 'integer', enum: [status] },
      code: { type: 'string', enum: codes },
      error: { type: 'string', example: STATUS_CODES[status] },
      message: { type: 'string' },
    },
    additionalProperties: true,
    example: { statusCode: status, code: codes[0], error: STATUS_CODES[status], message: CODES[codes[0]].meaning },
  };
}

const METHODS = ['get', 'put', 'post', 'delete', 'patch', 'head', 'options'];

export function finishDocument(doc: Json): Json {
  const schemas: Json = {};
  const responses: Json = {};
  const errorStatuses = new Set<number>();
  const paths = doc.paths as Record<string, Record<string, Json>>;
  for (const item of Object.values(paths)) {
    for (const [method, op] of Object.entries(item)) {
      if (!METHODS.includes(method)) continue;
      for (const p of (op.parameters ?? []) as Json[]) if (p.schema) p.schema = toOpenApiSchema(p.schema, schemas);
      const body = op.requestBody as Json | undefined;
      if (body) {
        for (const media of Object.values(body.content as Record<string, Json>)) {
          media.schema = toOpenApiSchema(media.schema, schemas);
          // An optional body ({anyOf: [X, null]}): the body may be left out, not sent as null.
          if (isObject(media.schema) && media.schema.nullable === true) {
            delete media.schema.nullable;
            body.required = false;
          }
        }
      }
      const out = op.responses as Record<string, Json>;
      for (const [status, response] of Object.entries(out)) {
        if (Number(status) >= 400) {
          errorStatuses.add(Number(status));
          out[status] = { $ref: `#/components/responses/Error${status}` };
          continue;
        }
        for (const media of Object.values((response.content ?? {}) as Record<string, Json>)) media.schema = toOpenApiSchema(media.schema, schemas);
        if (response.description === 'Default Response') response.description = STATUS_CODES[Number(status)] ?? 'Success';
      }
    }
  }
  for (const status of [...errorStatuses].sort()) {
    schemas[`Error${status}`] = errorSchema(status);
    responses[`Error${status}`] = errorResponse(status);
  }
  const components = (doc.components ?? {}) as Json;
  doc.components = { ...components, schemas: Object.fromEntries(Object.entries(schemas).sort(([a], [b]) => a.localeCompare(b))), responses };
  return doc;
}

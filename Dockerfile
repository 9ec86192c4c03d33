# syntax=docker/dockerfile:1
# asgd-serve: `docker build -t asgd-serve .`, then see docker-compose.yml.
# The image runs the TypeScript sources with Node 24's type stripping, exactly as the tests run
# them: `node bin/asgd-serve.mjs migrate|serve`, and `node bin/healthcheck.mjs` for the HEALTHCHECK.

# 1. Build stage: every dependency, and a type check that fails the build on a type error. Install scripts
#    are skipped: the only ones are the dev package `node`'s (it downloads a Node binary the image never
#    uses, and fails an offline build) and esbuild's (drizzle-kit's). tsc runs on the base image's Node
#    (not through npx, whose PATH would find the `node` package's stub first).
FROM node:24-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund --ignore-scripts
COPY tsconfig.json ./
COPY src ./src
COPY ui ./ui
RUN node node_modules/typescript/bin/tsc --noEmit -p tsconfig.json && node node_modules/typescript/bin/tsc -p ui/tsconfig.json

# 2. Production dependencies only: no TypeScript, no pino-pretty, and not the `node` package (Node 24 for
#    machines whose system Node is older; here the base image's Node runs the service).
FROM node:24-slim AS deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund && npm cache clean --force

# 3. Runtime: node:24-slim, production dependencies, the checked sources, a non-root user.
FROM node:24-slim
WORKDIR /app
# GLIBC_TUNABLES: buffers of up to 32 MiB (a step's body, its statement's parameters) come from malloc's heap
# and stay there when freed (up to 128 MiB), so the next step reuses them instead of faulting fresh pages in
# (README "Configuration"); npm start sets the same. NODE_OPTIONS: V8's young generation at most 2 x 32 MiB
# (its default grows to 2 x 64 MiB, which cost a training step 15-20% more CPU: README "Configuration").
ENV HOST=0.0.0.0 \
    PORT=8080 \
    ASGD_DATA_DIR=/data/pglite \
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=134217728 \
    NODE_OPTIONS=--max-semi-space-size=32
COPY --from=deps /app/node_modules ./node_modules
COPY --from=build /app/src ./src
# The dashboard (/ui): plain ES modules, checked above; its chart library comes with node_modules (uplot).
COPY --from=build /app/ui ./ui
COPY package.json ./
COPY bin ./bin
COPY migrations ./migrations
# /data: the embedded database when DATABASE_URL is unset (mount a volume there to keep it).
RUN mkdir -p /data && chown node:node /data
# Declared, so that `docker run` without -v keeps it in a volume of its own rather than in the container's layer.
VOLUME ["/data"]
USER node
EXPOSE 8080
# Liveness only (no database): a database outage must not get every replica restarted.
# The start period covers a first start on a fresh embedded data directory (no DATABASE_URL): PGlite's
# initdb took 17-49 s before the service listened, and the service says it can take up to a minute.
# A check that passes ends the start period early, so a normal start is not held back by it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 CMD ["node", "bin/healthcheck.mjs"]
# HOST=0.0.0.0 needs ASGD_ADMIN_TOKEN: without it the service refuses to start (exit code 2).
ENTRYPOINT ["node", "bin/asgd-serve.mjs"]
CMD ["serve"]

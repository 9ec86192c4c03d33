#!/bin/sh
# The role the replicas log in as: it may read and write the service's tables, not create, alter or drop
# them (the owner, POSTGRES_USER, does that through `asgd-serve migrate`). The postgres image runs this once,
# when its data volume is new (/docker-entrypoint-initdb.d). On a volume made before, run it once by hand:
#   docker compose exec postgres sh /docker-entrypoint-initdb.d/10-serving-role.sh
# It can run again: the role's password is set anew, and the grants are given on the tables that exist and
# on those a later migration adds (default privileges of the owner).
set -eu
: "${POSTGRES_USER:?the owner role: set by the postgres image}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${ASGD_APP_USER:=asgd_app}"
: "${ASGD_APP_PASSWORD:?set ASGD_APP_PASSWORD in .env}"
if [ "$ASGD_APP_USER" = "$POSTGRES_USER" ]; then
  echo "ASGD_APP_USER must be another role than the owner, $POSTGRES_USER" >&2
  exit 1
fi
psql -v ON_ERROR_STOP=1 -q --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v app="$ASGD_APP_USER" -v password="$ASGD_APP_PASSWORD" -v owner="$POSTGRES_USER" -v db="$POSTGRES_DB" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN', :'app') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'app') \gexec
ALTER ROLE :"app" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password';
GRANT CONNECT ON DATABASE :"db" TO :"app";
-- The tables, and their sequences: read and written, nothing else.
GRANT USAGE ON SCHEMA public TO :"app";
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"app";
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO :"app";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"app";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT USAGE ON SEQUENCES TO :"app";
-- The migrations' journal, which the readiness check reads (made here, as `migrate` would, to grant on it).
CREATE SCHEMA IF NOT EXISTS drizzle AUTHORIZATION :"owner";
GRANT USAGE ON SCHEMA drizzle TO :"app";
GRANT SELECT ON ALL TABLES IN SCHEMA drizzle TO :"app";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA drizzle GRANT SELECT ON TABLES TO :"app";
SQL

CREATE TABLE "initial_groups" (
	"session_id" bigint PRIMARY KEY NOT NULL,
	"groups" jsonb NOT NULL
);
--> statement-breakpoint
ALTER TABLE "initial_groups" ADD CONSTRAINT "initial_groups_session_id_sessions_id_fk" FOREIGN KEY ("session_id") REFERENCES "public"."sessions"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
-- Every way of creating a session (create, fork) records its groups with the row, in its transaction.
CREATE FUNCTION "sessions_initial_groups"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO "initial_groups" ("session_id", "groups") VALUES (NEW.id, NEW.groups);
  RETURN NULL;
END
$$;--> statement-breakpoint
CREATE TRIGGER "sessions_initial_groups" AFTER INSERT ON "sessions" FOR EACH ROW EXECUTE FUNCTION "sessions_initial_groups"();--> statement-breakpoint
-- Sessions made before: from their version-1 snapshot while it is kept; otherwise not known.
INSERT INTO "initial_groups" ("session_id", "groups") SELECT "session_id", "groups" FROM "snapshots" WHERE "version" = 1;

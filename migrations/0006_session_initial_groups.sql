CREATE TABLE "initial_groups" (
	"session_id" bigint PRIMARY KEY NOT NULL,
	"groups" jsonb NOT NULL
);
--> statement-breakpoint
ALTER TABLE "initial_groups" ADD CONSTRAINT "initial_groups_session_id_sessions_id_fk" FOREIGN KEY ("session_id") REFERENCES "public"."sessions"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
-- Sessions made before: from their version-1 snapshot while it is kept; otherwise not known.
INSERT INTO "initial_groups" ("session_id", "groups") SELECT "session_id", "groups" FROM "snapshots" WHERE "version" = 1;

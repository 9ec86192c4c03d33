CREATE TABLE "replaced_versions" (
	"session_id" bigint NOT NULL,
	"version" bigint NOT NULL,
	"step" bigint NOT NULL,
	"groups" jsonb NOT NULL,
	CONSTRAINT "replaced_versions_session_id_version_pk" PRIMARY KEY("session_id","version")
);
--> statement-breakpoint
ALTER TABLE "replaced_versions" ADD CONSTRAINT "replaced_versions_session_id_sessions_id_fk" FOREIGN KEY ("session_id") REFERENCES "public"."sessions"("id") ON DELETE cascade ON UPDATE no action;
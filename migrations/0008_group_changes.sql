CREATE TABLE "group_changes" (
	"session_id" bigint NOT NULL,
	"version" bigint NOT NULL,
	"step" bigint NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"reason" text NOT NULL,
	"hyper" jsonb NOT NULL,
	CONSTRAINT "group_changes_session_id_version_pk" PRIMARY KEY("session_id","version")
);
--> statement-breakpoint
ALTER TABLE "group_changes" ADD CONSTRAINT "group_changes_session_id_sessions_id_fk" FOREIGN KEY ("session_id") REFERENCES "public"."sessions"("id") ON DELETE cascade ON UPDATE no action;
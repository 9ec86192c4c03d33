CREATE TABLE "step_history" (
	"session_id" bigint NOT NULL,
	"version" bigint NOT NULL,
	"step" bigint NOT NULL,
	"staleness" integer NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"metrics" jsonb,
	"hyper" jsonb,
	CONSTRAINT "step_history_session_id_version_pk" PRIMARY KEY("session_id","version")
);
--> statement-breakpoint
ALTER TABLE "step_log" ADD COLUMN "hyper" jsonb;--> statement-breakpoint
ALTER TABLE "step_history" ADD CONSTRAINT "step_history_session_id_sessions_id_fk" FOREIGN KEY ("session_id") REFERENCES "public"."sessions"("id") ON DELETE cascade ON UPDATE no action;
CREATE TABLE "round_contributions" (
	"session_id" bigint NOT NULL,
	"version" bigint NOT NULL,
	"worker" text NOT NULL,
	"samples" integer,
	"present" jsonb NOT NULL,
	"grads" "bytea" NOT NULL,
	"grad_dtype" text,
	"hyper" jsonb,
	"metrics" jsonb,
	"idempotency_key" text,
	"request_hash" text,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "round_contributions_session_id_version_worker_pk" PRIMARY KEY("session_id","version","worker")
);
--> statement-breakpoint
ALTER TABLE "sessions" ADD COLUMN "aggregation" jsonb;--> statement-breakpoint
ALTER TABLE "step_history" ADD COLUMN "round" jsonb;--> statement-breakpoint
ALTER TABLE "round_contributions" ADD CONSTRAINT "round_contributions_session_id_sessions_id_fk" FOREIGN KEY ("session_id") REFERENCES "public"."sessions"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
CREATE UNIQUE INDEX "round_contributions_session_key" ON "round_contributions" USING btree ("session_id","idempotency_key");--> statement-breakpoint
-- Gradients are float32 data that does not compress (as step_log.grads, migration 0001).
ALTER TABLE "round_contributions" ALTER COLUMN "grads" SET STORAGE EXTERNAL;

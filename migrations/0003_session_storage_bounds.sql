ALTER TABLE "sessions" ADD COLUMN "keep_log_bytes" bigint;--> statement-breakpoint
ALTER TABLE "sessions" ADD COLUMN "expire_after_idle_s" integer;
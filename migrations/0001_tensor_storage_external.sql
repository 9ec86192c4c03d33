-- Tensor bytes are float32 data that does not compress: skip TOAST's futile pglz attempt.
ALTER TABLE "snapshot_chunks" ALTER COLUMN "data" SET STORAGE EXTERNAL;--> statement-breakpoint
ALTER TABLE "step_log" ALTER COLUMN "grads" SET STORAGE EXTERNAL;

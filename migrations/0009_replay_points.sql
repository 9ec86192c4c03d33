-- UNLOGGED (written by hand; drizzle-kit has no such table option): no WAL, no fsync; PostgreSQL empties
-- both after a crash of its own, and nothing is lost then (src/sessions/replay-points.ts).
CREATE UNLOGGED TABLE "replay_point_chunks" (
	"point_id" bigint NOT NULL,
	"seq" integer NOT NULL,
	"data" "bytea" NOT NULL,
	CONSTRAINT "replay_point_chunks_point_id_seq_pk" PRIMARY KEY("point_id","seq")
);
--> statement-breakpoint
CREATE UNLOGGED TABLE "replay_points" (
	"id" bigserial PRIMARY KEY NOT NULL,
	"session_id" bigint NOT NULL,
	"version" bigint NOT NULL,
	"step" bigint NOT NULL,
	"groups" jsonb NOT NULL,
	"scalars" jsonb NOT NULL,
	"byte_size" bigint NOT NULL,
	"chunk_count" integer NOT NULL,
	"checksum" text NOT NULL,
	"ax_from_params" boolean NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL
);
--> statement-breakpoint
ALTER TABLE "replay_point_chunks" ADD CONSTRAINT "replay_point_chunks_point_id_replay_points_id_fk" FOREIGN KEY ("point_id") REFERENCES "public"."replay_points"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "replay_points" ADD CONSTRAINT "replay_points_session_id_sessions_id_fk" FOREIGN KEY ("session_id") REFERENCES "public"."sessions"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
CREATE UNIQUE INDEX "replay_points_session_version_key" ON "replay_points" USING btree ("session_id","version");--> statement-breakpoint
-- Float32 data that does not compress (as snapshot_chunks.data, migration 0001).
ALTER TABLE "replay_point_chunks" ALTER COLUMN "data" SET STORAGE EXTERNAL;
CREATE TABLE "retired_names" (
	"name" text PRIMARY KEY NOT NULL,
	"last_version" bigint NOT NULL,
	"retired_at" timestamp with time zone DEFAULT now() NOT NULL
);

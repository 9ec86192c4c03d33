ALTER TABLE "sessions" ADD COLUMN "initial_groups" jsonb;--> statement-breakpoint
-- The groups a session starts with, kept for its lifetime (the version-1 snapshot that also holds them is
-- pruned like any other). Set here at insert so that every way of creating a session (create, fork)
-- records them with the row, in its transaction.
CREATE FUNCTION "sessions_initial_groups"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.initial_groups := coalesce(NEW.initial_groups, NEW.groups);
  RETURN NEW;
END
$$;--> statement-breakpoint
CREATE TRIGGER "sessions_initial_groups" BEFORE INSERT ON "sessions" FOR EACH ROW EXECUTE FUNCTION "sessions_initial_groups"();--> statement-breakpoint
-- Sessions made before: from their version-1 snapshot while it is kept; otherwise unknown (null).
UPDATE "sessions" s SET "initial_groups" = sn."groups" FROM "snapshots" sn WHERE sn."session_id" = s."id" AND sn."version" = 1;

ALTER TABLE "attempts" ADD COLUMN IF NOT EXISTS "session_last_heard_at" timestamp with time zone;--> statement-breakpoint
ALTER TABLE "attempts" ADD COLUMN IF NOT EXISTS "session_deadline" timestamp with time zone;--> statement-breakpoint
ALTER TABLE "attempts" ADD COLUMN IF NOT EXISTS "session_stream_lost_at" timestamp with time zone;--> statement-breakpoint
ALTER TABLE "attempts" ADD COLUMN IF NOT EXISTS "session_ended_at" timestamp with time zone;--> statement-breakpoint
ALTER TABLE "attempts" ADD COLUMN IF NOT EXISTS "session_end_reason" text;--> statement-breakpoint
CREATE INDEX IF NOT EXISTS "attempts_session_idx" ON "attempts" USING btree ("session_id");
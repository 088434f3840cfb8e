DROP INDEX "sessions_live_deadline_idx";--> statement-breakpoint
-- Room on each page for the new version of a renewed row: a HOT update (no index entry) needs it.
ALTER TABLE "sessions" SET (fillfactor = 70);
-- Rows with no run (run_id '') or no worker (every action_submitted event) no longer get an entry:
-- a bulk submit writes two index entries fewer per action. Queries name a run or a worker, which
-- implies the predicates.
DROP INDEX "actions_run_idx";--> statement-breakpoint
DROP INDEX "events_worker_idx";--> statement-breakpoint
CREATE INDEX "actions_run_idx" ON "actions" USING btree ("run_id") WHERE "actions"."run_id" <> '';--> statement-breakpoint
CREATE INDEX "events_worker_idx" ON "events" USING btree ("worker_id","sequence") WHERE "events"."worker_id" is not null;
-- Queued actions are found through actions_claim_idx and succeeded ones in id order: a submit and
-- a success no longer write an entry here. Queries name the state as a literal.
DROP INDEX "actions_state_idx";--> statement-breakpoint
CREATE INDEX "actions_state_idx" ON "actions" USING btree ("state","cluster") WHERE "actions"."state" <> 'QUEUED' and "actions"."state" <> 'SUCCEEDED';
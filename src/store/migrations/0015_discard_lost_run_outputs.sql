-- Files saved as a deployment's outputs name the run that saved them, and a lost run's go with it.
ALTER TABLE "resources" ADD COLUMN "output_action_id" text;--> statement-breakpoint
ALTER TABLE "resources" ADD COLUMN "output_epoch" bigint;--> statement-breakpoint
CREATE INDEX "resources_output_run_idx" ON "resources" USING btree ("output_action_id","output_epoch") WHERE "resources"."output_action_id" is not null;--> statement-breakpoint
-- What a lost run saved goes with it (CreateFileRequest.output_of; CollectOutputs' OUTPUTS_LOST):
-- when an attempt ends LEASE_EXPIRED (its session reaped) or RELEASED (its agent gave the lease
-- back, by report or goodbye), the files it saved as outputs that its lease still owns are
-- deleted, each with a resource_deleted event. A trigger, not a clause in each statement that
-- ends attempts: it is atomic with every one of them, and as a volatile function it reads with a
-- fresh snapshot, so it also sees an upload that committed while the ending statement waited for
-- the action's row (an upload holds it `for share` while it checks the run is still held).
-- Workspace-owned ones (promoted, or kept by a commit) are the workspace's and stay.
CREATE FUNCTION discard_lost_run_outputs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  WITH discarded AS (
    DELETE FROM resources r
    WHERE r.output_action_id = NEW.action_id AND r.output_epoch = NEW.epoch AND r.ownership = 'LEASE'
    RETURNING r.id, r.kind, r.name, r.lease_id
  )
  INSERT INTO events (kind, lease_id, action_id, worker_id, session_id, epoch, cluster, message, details)
  SELECT 'resource_deleted', d.lease_id, NEW.action_id, NEW.worker_id, NEW.session_id, NEW.epoch, l.runtime,
    d.kind || ' ' || d.id || ' discarded: the deployment run that saved it (action ' || NEW.action_id
      || ', epoch ' || NEW.epoch || ') was lost before it ended',
    jsonb_strip_nulls(jsonb_build_object('resource_id', d.id, 'kind', d.kind, 'name', d.name))
  FROM discarded d LEFT JOIN scope_leases l ON l.id = d.lease_id
  ORDER BY d.id;
  RETURN NULL;
END
$$;
--> statement-breakpoint
CREATE TRIGGER attempts_discard_lost_outputs AFTER UPDATE OF outcome ON attempts
  FOR EACH ROW WHEN (NEW.outcome IN ('LEASE_EXPIRED', 'RELEASED') AND OLD.outcome = 'RUNNING')
  EXECUTE FUNCTION discard_lost_run_outputs();

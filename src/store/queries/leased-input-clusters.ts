import { sql } from "drizzle-orm";
import type { Db } from "../database.js";
import { queryRows } from "../rows.js";

/**
 * The clusters of the deployment actions that list file `fileId` among their
 * inputs and are LEASED right now to a live session opened by `principal`:
 * where an agent may download that file without `resource.read`
 * (DownloadFile with `file.download.input`).
 *
 * The deployment is found through the server's own records, never through
 * what a payload claims: the action's payload names its deployment, and the
 * resource must point back at that action (`resources.action_id`), which only
 * CreateDeployment writes; the inputs are read from the resource's stored
 * spec (DeploymentSpec in the proto3 JSON mapping, `inputs[].fileId`).
 *
 * A plain read, no locks: it answers "was this lease held when the download
 * began". A lease that ends during the download does not cut it short, as for
 * any read right checked at the start of a call. It starts from the LEASED
 * actions (`actions_state_idx`, as many as the workers' capacity) and joins
 * sessions and resources by primary key.
 */
export async function leasedInputClusters(db: Db, fileId: string, principal: string): Promise<string[]> {
  const rows = await queryRows<{ cluster: string }>(
    db,
    sql`
      select distinct a.cluster
      from actions a
      join sessions s on s.id = a.session_id
      join resources r on r.id = a.payload -> 'deployment' ->> 'id'
      where a.state = 'LEASED'
        and s.principal = ${principal} and s.ended_at is null
        and r.kind = 'deployment' and r.action_id = a.id
        and r.body -> 'inputs' @> ${JSON.stringify([{ fileId }])}::jsonb`,
  );
  return rows.map((r) => r.cluster);
}

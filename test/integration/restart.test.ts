import { describe, expect, it } from "vitest";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { startTestServer } from "../helpers/server.js";

describe("a restart on the same store", () => {
  it("keeps every action, its state and its request id", async () => {
    let t = await startTestServer();
    try {
      const api = t.client(ActionService);
      const submitted = [];
      for (let i = 0; i < 25; i++) {
        submitted.push(
          (await api.submitAction({ cluster: "keep", requestId: `keep-${i}`, payload: { i } })).action,
        );
      }
      const cancelled = submitted[3]?.id ?? "";
      await api.cancelAction({ actionId: cancelled });

      t = await t.restart();
      const after = t.client(ActionService);
      const listed = await after.listActions({ cluster: "keep", pageSize: 100 });
      expect(listed.actions.map((a) => a.id)).toEqual(submitted.map((a) => a?.id));
      expect(listed.actions.map((a) => a.payload)).toEqual(submitted.map((_, i) => ({ i })));
      expect(listed.actions.find((a) => a.id === cancelled)?.state).toBe(ActionState.CANCELLED);
      // The idempotency keys survive too.
      const retried = await after.submitAction({ cluster: "keep", requestId: "keep-7", payload: { i: 7 } });
      expect(retried).toMatchObject({ created: false, action: { id: submitted[7]?.id } });
    } finally {
      await t.stop();
      await t.store.drop();
    }
  });
});

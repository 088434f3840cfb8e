import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { describe, expect, it } from "vitest";
import { eventLine } from "../../src/cli/event-commands.js";
import { EventKind, EventSchema } from "../../src/gen/leasehold/v1/event_pb.js";

describe("leasehold events' lines", () => {
  it("start every message in one column, whatever the kind (action_cancel_requested included)", () => {
    const kinds = Object.values(EventKind).filter((k): k is EventKind => typeof k === "number");
    const starts = new Set(
      kinds.map((kind) => {
        const line = eventLine(
          create(EventSchema, {
            sequence: 7n,
            kind,
            time: timestampFromDate(new Date(Date.UTC(2026, 11, 7))),
            actor: "alice",
            message: "MESSAGE",
          }),
        );
        return line.indexOf(" MESSAGE");
      }),
    );
    expect(starts.size).toBe(1);
  });

  it("name the action and the worker of each event, so that two alike grants can be told apart", () => {
    const at = timestampFromDate(new Date(Date.UTC(2026, 11, 7, 22, 37, 17)));
    const grant = (sequence: bigint, actionId: string, workerId: string) =>
      eventLine(
        create(EventSchema, {
          sequence,
          kind: EventKind.LEASE_GRANTED,
          time: at,
          actionId,
          workerId,
          epoch: 2n,
          message: `lease granted to worker ${workerId} (epoch 2, attempt 2)`,
        }),
      );
    const a = "01a252a6-e97d-7c22-9669-b9eb611753e7";
    const b = "01a252a6-f328-70dc-8efc-837161399dd2";
    expect(grant(17n, a, "a5")).toBe(
      `2026-12-07T22:37:17.000Z     17 lease_granted            ${a} a5               -                lease granted to worker a5 (epoch 2, attempt 2)`,
    );
    expect(grant(18n, b, "a5")).toContain(` ${b} a5 `);
    // An event about neither (a cluster's partition) shows "-" in both columns.
    const partition = eventLine(
      create(EventSchema, { sequence: 3n, kind: EventKind.CLUSTER_PARTITIONED, time: at, message: "M" }),
    );
    expect(partition).toMatch(/ cluster_partitioned +- {36}- {16}- {16}M$/);
  });
});

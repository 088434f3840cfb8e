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
});

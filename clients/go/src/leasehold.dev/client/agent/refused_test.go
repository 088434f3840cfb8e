package agent

import (
	"context"
	"testing"
	"time"

	leaseholdv1 "leasehold.dev/client/gen/leasehold/v1"

	"google.golang.org/protobuf/types/known/structpb"
)

// A completion the server refuses as INVALID (a server with other limits than
// the ones the agent fitted it to) fails the action with the server's reason,
// instead of dropping a lease the server still holds.
func TestRefusedCompletionFailsTheAction(t *testing.T) {
	script, stop := startScripted(t, longGuarantee)
	defer stop()
	refusal := "completion.succeeded.output: must be at most 1 MiB as JSON"
	script.refuseCompletion.Store(refusal)
	finished := make(chan Finished, 8)
	a, err := Start(Options{
		Addresses: []string{script.address},
		Cluster:   "east",
		WorkerID:  "w1",
		OnEvent: func(e Event) {
			if f, ok := e.(Finished); ok {
				finished <- f
			}
		},
		Handler: func(ctx context.Context, action *Action) (*structpb.Struct, error) {
			return structpb.NewStruct(map[string]any{"rows": 3})
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer closeWithin(a, 5*time.Second)
	select {
	case <-script.acked:
	case <-time.After(30 * time.Second):
		t.Fatal("no heartbeat ack")
	}
	script.send <- grantOf(1)
	next := func() *leaseholdv1.CompletionReport {
		select {
		case c := <-script.completions:
			return c
		case <-time.After(30 * time.Second):
			t.Fatal("no completion")
		}
		return nil
	}
	if first := next(); first.GetSucceeded() == nil {
		t.Fatalf("first completion: %v", first)
	}
	second := next()
	want := "the server refused this action's output: " + refusal
	if second.GetFailed().GetMessage() != want || second.GetFailed().GetRetryable() || second.GetEpoch() != 1 {
		t.Fatalf("second completion: %v", second)
	}
	select {
	case f := <-finished:
		if f.Outcome != Failed || !f.Accepted {
			t.Fatalf("finished: %+v", f)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("never finished")
	}
}

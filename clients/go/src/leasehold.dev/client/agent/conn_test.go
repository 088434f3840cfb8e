package agent

import (
	"testing"

	leaseholdv1 "leasehold.dev/client/gen/leasehold/v1"
)

func grantAck(id string) *leaseholdv1.ConnectRequest {
	return &leaseholdv1.ConnectRequest{Message: &leaseholdv1.ConnectRequest_GrantAck{
		GrantAck: &leaseholdv1.GrantAck{ActionId: id, Epoch: 1}}}
}

func completion(id string) *leaseholdv1.ConnectRequest {
	return &leaseholdv1.ConnectRequest{Message: &leaseholdv1.ConnectRequest_Completion{
		Completion: &leaseholdv1.CompletionReport{ActionId: id, Epoch: 1}}}
}

func TestFramesSendOneByOneWithoutBatches(t *testing.T) {
	got := frames([]*leaseholdv1.ConnectRequest{grantAck("a"), completion("a")}, false)
	if len(got) != 2 || got[0].GetGrantAck() == nil || got[1].GetCompletion() == nil {
		t.Fatalf("want the ack and the completion one by one, got %v", got)
	}
}

func TestFramesBatchAndLeaveOutAcksOfReportedLeases(t *testing.T) {
	got := frames([]*leaseholdv1.ConnectRequest{grantAck("a"), grantAck("b"), completion("a")}, true)
	if len(got) != 1 || got[0].GetBatch() == nil {
		t.Fatalf("want one batch, got %v", got)
	}
	inner := got[0].GetBatch().GetMessages()
	if len(inner) != 2 || inner[0].GetGrantAck().GetActionId() != "b" || inner[1].GetCompletion().GetActionId() != "a" {
		t.Fatalf("want [ack b, completion a], got %v", inner)
	}
}

func TestFramesSplitBatchesAtTheMessageLimit(t *testing.T) {
	messages := make([]*leaseholdv1.ConnectRequest, maxBatchMessages+1)
	for i := range messages {
		messages[i] = grantAck("x")
	}
	got := frames(messages, true)
	if len(got) != 2 || len(got[0].GetBatch().GetMessages()) != maxBatchMessages || got[1].GetGrantAck() == nil {
		t.Fatalf("want a full batch and one message alone, got %d frames", len(got))
	}
}

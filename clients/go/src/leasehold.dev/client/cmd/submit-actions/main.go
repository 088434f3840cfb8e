// Command submit-actions queues actions with ActionService.SubmitActions (all
// of them or none) and prints one JSON line per action. A refused call prints
// its decoded status instead, with the ErrorInfo reason and the BadRequest
// field violations, and exits 1.
//
//	submit-actions -server 127.0.0.1:50051 -cluster east -payload '{"sleep_ms": 100, "n": 21}' -count 10
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	leaseholdv1 "leasehold.dev/client/gen/leasehold/v1"
	"leasehold.dev/client/rpcerr"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/structpb"
)

func main() {
	server := flag.String("server", "127.0.0.1:50051", "server address as host:port")
	cluster := flag.String("cluster", "", "the cluster whose workers run the actions")
	payload := flag.String("payload", "{}", "the payload of every action, as a JSON object")
	count := flag.Int("count", 1, "how many actions to queue (1–1000)")
	timeout := flag.Duration("timeout", 30*time.Second, "deadline of the call")
	flag.Parse()

	var fields map[string]interface{}
	if err := json.Unmarshal([]byte(*payload), &fields); err != nil {
		fail(fmt.Errorf("-payload must be a JSON object: %w", err))
	}
	body, err := structpb.NewStruct(fields)
	if err != nil {
		fail(fmt.Errorf("-payload: %w", err))
	}
	requests := make([]*leaseholdv1.SubmitActionRequest, *count)
	for i := range requests {
		requests[i] = &leaseholdv1.SubmitActionRequest{Cluster: *cluster, Payload: body}
	}

	cc, err := grpc.Dial(*server, grpc.WithInsecure())
	if err != nil {
		fail(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	res, err := leaseholdv1.NewActionServiceClient(cc).SubmitActions(ctx, &leaseholdv1.SubmitActionsRequest{
		Actions: requests,
		View:    leaseholdv1.ActionView_ACTION_VIEW_BASIC,
	})
	if err != nil {
		fail(err)
	}
	for _, r := range res.GetResults() {
		printJSON(map[string]interface{}{"actionId": r.GetAction().GetId(), "created": r.GetCreated()})
	}
}

// fail prints the decoded error as one JSON line and exits 1.
func fail(err error) {
	e := rpcerr.From(err)
	violations := []map[string]string{}
	for _, v := range e.FieldViolations {
		violations = append(violations, map[string]string{"field": v.Field, "description": v.Description})
	}
	printJSON(map[string]interface{}{"error": map[string]interface{}{
		"code":            rpcerr.CodeName(e.Code),
		"message":         e.Message,
		"reason":          e.Reason,
		"fieldViolations": violations,
		"text":            e.Error(),
	}})
	os.Exit(1)
}

func printJSON(v interface{}) {
	b, _ := json.Marshal(v)
	fmt.Println(string(b))
}

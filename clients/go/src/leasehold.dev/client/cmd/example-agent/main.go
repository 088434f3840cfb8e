// Command example-agent is a Leasehold agent written with the Go agent
// library. Its handler reads a payload {"sleep_ms": N, "n": K}, sleeps N ms
// (stopping early when the lease is lost) and returns {"doubled": 2K}.
//
// It prints one JSON line per event on stdout (welcome, grant, started,
// completed, revoked, self_fenced, handler_stopped, drain, disconnected,
// closing, closed), so a script or a test can follow it. SIGTERM or SIGINT
// drains it: the agent asks the server for no more grants, running actions
// get -drain-timeout to finish, then it says goodbye and exits 0 (1 when no
// goodbye went through).
//
//	example-agent -server 127.0.0.1:50051 -cluster east -worker-id go-1 -capacity 4
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"leasehold.dev/client/agent"
	"leasehold.dev/client/rpcerr"

	"google.golang.org/protobuf/types/known/structpb"
)

func main() {
	server := flag.String("server", "127.0.0.1:50051", "server address(es) as host:port, comma-separated")
	cluster := flag.String("cluster", "", "the cluster this worker belongs to (required)")
	workerID := flag.String("worker-id", "", "the worker's stable id (required)")
	capacity := flag.Int("capacity", 1, "actions run at once")
	drainTimeout := flag.Duration("drain-timeout", 30*time.Second, "how long SIGTERM waits for running actions")
	flag.Parse()
	if *cluster == "" || *workerID == "" {
		fmt.Fprintln(os.Stderr, "example-agent: -cluster and -worker-id are required")
		flag.Usage()
		os.Exit(2)
	}

	a, err := agent.Start(agent.Options{
		Addresses:    strings.Split(*server, ","),
		Cluster:      *cluster,
		WorkerID:     *workerID,
		Capacity:     *capacity,
		AgentVersion: "leasehold-go-example-agent",
		Handler:      double,
		OnEvent:      printEvent,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "example-agent:", err)
		os.Exit(2)
	}

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	sig := <-signals
	printLine(map[string]interface{}{"event": "closing", "signal": sig.String()})
	ctx, cancel := context.WithTimeout(context.Background(), *drainTimeout)
	defer cancel()
	if err := a.Close(ctx); err != nil {
		printLine(map[string]interface{}{"event": "closed", "error": err.Error()})
		os.Exit(1)
	}
	printLine(map[string]interface{}{"event": "closed"})
}

// double is the handler: {"sleep_ms": N, "n": K} -> {"doubled": 2K} after N ms.
func double(ctx context.Context, action *agent.Action) (*structpb.Struct, error) {
	fields := action.Payload.GetFields()
	n, ok := fields["n"].GetKind().(*structpb.Value_NumberValue)
	if !ok {
		return nil, &agent.Failure{Message: `payload.n must be a number, e.g. {"sleep_ms": 100, "n": 21}`}
	}
	sleep := time.Duration(fields["sleep_ms"].GetNumberValue() * float64(time.Millisecond))
	printLine(map[string]interface{}{"event": "started", "actionId": action.ID, "epoch": action.Epoch})
	timer := time.NewTimer(sleep)
	defer timer.Stop()
	select {
	case <-timer.C:
	case <-ctx.Done():
		reason := "cancelled"
		if lost := action.Lost(); lost != nil {
			reason = lost.Reason
		}
		printLine(map[string]interface{}{"event": "handler_stopped", "actionId": action.ID, "epoch": action.Epoch, "reason": reason})
		return nil, ctx.Err()
	}
	return structpb.NewStruct(map[string]interface{}{"doubled": 2 * n.NumberValue})
}

func printEvent(e agent.Event) {
	switch e := e.(type) {
	case agent.Connected:
		printLine(map[string]interface{}{"event": "welcome", "sessionId": e.SessionID, "sessionResumed": e.SessionResumed,
			"address": e.Address, "resumed": ids(e.Resumed), "revoked": ids(e.Revoked)})
	case agent.Disconnected:
		printLine(map[string]interface{}{"event": "disconnected", "code": rpcerr.CodeName(e.Err.Code), "error": e.Err.Error(),
			"retryInMs": e.RetryIn.Milliseconds()})
	case agent.Granted:
		printLine(map[string]interface{}{"event": "grant", "actionId": e.ActionID, "epoch": e.Epoch, "attempt": e.Attempt, "waiting": e.Waiting})
	case agent.Finished:
		printLine(map[string]interface{}{"event": "completed", "actionId": e.ActionID, "epoch": e.Epoch, "outcome": e.Outcome,
			"accepted": e.Accepted, "message": e.Message})
	case agent.Revoked:
		printLine(map[string]interface{}{"event": "revoked", "actionId": e.ActionID, "epoch": e.Epoch, "reason": e.Reason})
	case agent.SelfFenced:
		printLine(map[string]interface{}{"event": "self_fenced", "actionIds": e.ActionIDs, "silentMs": e.Silent.Milliseconds()})
	case agent.Draining:
		printLine(map[string]interface{}{"event": "drain", "reason": e.Reason})
	}
}

func ids(leases []agent.Lease) []string {
	out := make([]string, 0, len(leases))
	for _, l := range leases {
		out = append(out, l.ActionID)
	}
	return out
}

var stdout sync.Mutex

// printLine writes one JSON line; handlers print from their own goroutines.
func printLine(line map[string]interface{}) {
	b, err := json.Marshal(line)
	if err != nil {
		b = []byte(fmt.Sprintf(`{"event":"error","error":%q}`, err.Error()))
	}
	stdout.Lock()
	defer stdout.Unlock()
	os.Stdout.Write(append(b, '\n'))
}

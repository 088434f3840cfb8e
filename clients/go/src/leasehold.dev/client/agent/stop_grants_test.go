package agent

import (
	"context"
	"fmt"
	"reflect"
	"testing"
	"time"

	leaseholdv1 "leasehold.dev/client/gen/leasehold/v1"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
)

// stopping is an agent with two slots that runs a grant of a1 on a scripted
// server and has begun to close while that handler still runs.
type stopping struct {
	script *scriptedServer
	// closed receives what Close returned.
	closed chan error
	// letReturn lets a1's handler return.
	letReturn chan struct{}
}

// startStopping starts the agent, waits until a1's handler runs, and calls
// Close with a spent context: Close cancels the handler at once (which holds
// on until letReturn), so its cancellation says Close has begun.
func startStopping(t *testing.T, acceptsStopGrants bool) *stopping {
	script, stop := startScripted(t, longGuarantee)
	t.Cleanup(stop)
	script.acceptsStopGrants.Store(acceptsStopGrants)
	started := make(chan struct{})
	cancelled := make(chan *LeaseLost, 1)
	s := &stopping{script: script, closed: make(chan error, 1), letReturn: make(chan struct{})}
	a, err := Start(Options{
		Addresses: []string{script.address}, Cluster: "east", WorkerID: "w1", Capacity: 2,
		Handler: func(ctx context.Context, action *Action) (*structpb.Struct, error) {
			if action.ID != "a1" {
				t.Errorf("the handler ran %s while the agent closed", action.ID)
				return nil, nil
			}
			close(started)
			<-ctx.Done()
			cancelled <- action.Lost()
			<-s.letReturn
			return nil, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeWithin(a, time.Second) })
	wait := func(what string, ch <-chan struct{}) {
		select {
		case <-ch:
		case <-time.After(30 * time.Second):
			t.Fatalf("never happened: %s", what)
		}
	}
	wait("the first heartbeat ack", script.acked)
	script.send <- grantOfAction("a1")
	wait("a1's handler start", started)
	spent, cancel := context.WithCancel(context.Background())
	cancel()
	go func() { s.closed <- a.Close(spent) }()
	select {
	case lost := <-cancelled:
		if lost == nil || lost.Reason != "closing" {
			t.Fatalf("a1's handler stopped with %v, want closing", lost)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Close never cancelled a1's handler")
	}
	return s
}

// until reads what the server got up to and including want.
func (s *stopping) until(t *testing.T, want string) []string {
	t.Helper()
	var got []string
	for {
		select {
		case line := <-s.script.got:
			got = append(got, line)
			if line == want {
				return got
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("the server never got %q, only %v", want, got)
		}
	}
}

// finish lets a1's handler return and checks that Close said a goodbye the
// server answered; it returns what the server got meanwhile.
func (s *stopping) finish(t *testing.T) []string {
	t.Helper()
	close(s.letReturn)
	got := s.until(t, "goodbye")
	select {
	case err := <-s.closed:
		if err != nil {
			t.Fatalf("Close: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Close never returned")
	}
	return got
}

func grantOfAction(id string) *leaseholdv1.ConnectResponse {
	return &leaseholdv1.ConnectResponse{Message: &leaseholdv1.ConnectResponse_Grant{Grant: &leaseholdv1.Grant{
		ActionId: id, Epoch: 1, Attempt: 1}}}
}

// Close first asks a server that takes StopGrants for no more grants, so the
// slots that free while its handlers finish are not filled again; a server
// that does not take them (an older one) is sent none. Either way a grant
// that arrives while the agent closes (one the server sent before it read
// the StopGrants), with a slot free, is given back at once, while the other
// handler still runs: it runs on another worker now, not after the goodbye.
func TestCloseAsksForNoMoreGrantsAndGivesBackThoseThatArrive(t *testing.T) {
	for _, accepts := range []bool{true, false} {
		t.Run(fmt.Sprintf("accepts_stop_grants=%v", accepts), func(t *testing.T) {
			s := startStopping(t, accepts)
			s.script.send <- grantOfAction("a2")
			got := append(s.until(t, "release a2"), s.finish(t)...)
			want := []string{"hello", "release a2", "release a1", "goodbye"}
			if accepts {
				want = []string{"hello", "stop_grants", "release a2", "release a1", "goodbye"}
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("the server got %v, want %v", got, want)
			}
		})
	}
}

// A stream opened while the agent closes (its stream broke) takes no grants
// from the start: its hello sets stop_grants, and the agent sends no
// StopGrants on it.
func TestAStreamOpenedWhileClosingSaysSoInItsHello(t *testing.T) {
	s := startStopping(t, true)
	s.until(t, "stop_grants")
	s.script.end <- status.Error(codes.Unavailable, "the server restarts")
	got := s.until(t, "hello stop_grants")
	if len(got) != 1 {
		t.Fatalf("before the second hello the server got %v", got)
	}
	got = s.finish(t)
	if want := []string{"release a1", "goodbye"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("after the second hello the server got %v, want %v", got, want)
	}
}

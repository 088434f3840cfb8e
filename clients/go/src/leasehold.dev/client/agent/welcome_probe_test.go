package agent

import (
	"context"
	"net"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
)

// silentListener takes TCP connections and never writes a byte, as a stopped
// (or frozen) server process does: the kernel still accepts them.
type silentListener struct {
	address string
	// connections counts the connections accepted; accepted gets one value per connection
	// (dropped when full).
	connections atomic.Int32
	accepted    chan struct{}
	listener    net.Listener
	mu          sync.Mutex
	conns       []net.Conn
}

func startSilent(t *testing.T) *silentListener {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &silentListener{address: listener.Addr().String(), accepted: make(chan struct{}, 8), listener: listener}
	go func() {
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns = append(s.conns, conn)
			s.mu.Unlock()
			s.connections.Add(1)
			select {
			case s.accepted <- struct{}{}:
			default:
			}
		}
	}()
	t.Cleanup(func() {
		_ = listener.Close()
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, c := range s.conns {
			_ = c.Close()
		}
	})
	return s
}

// eventLog records an agent's events for a test to look at while the agent runs.
type eventLog struct {
	mu     sync.Mutex
	events []Event
}

func (l *eventLog) add(e Event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, e)
}

func (l *eventLog) all() []Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]Event(nil), l.events...)
}

// Before its welcome the rule on unanswered heartbeats does not apply yet, and
// HTTP/2 keepalive (or the 5 s connect timeout) notices a stopped server late:
// an agent whose server went away, and whose only other address is a server
// that accepts connections but never answers, asks that connection's health
// and leaves it when a check goes unanswered for 1.5 heartbeat intervals. It
// comes back to the live server with its lease while the lease is still
// guaranteed.
func TestAnAgentLeavesAServerThatAnswersNoHealthCheckBeforeItsWelcome(t *testing.T) {
	// Acks guarantee 8 s (7.5 s with the margin) from a heartbeat sent up to 1 s before the
	// stream ends; the connect timeout alone would leave the silent server after 5 s.
	good, stop := startScripted(t, scriptTiming{heartbeat: time.Second, grace: 8 * time.Second, remaining: 8 * time.Second})
	t.Cleanup(stop)
	hung := startSilent(t)
	log := &eventLog{}
	started := make(chan struct{})
	stopped := make(chan *LeaseLost, 1)
	finish := make(chan struct{})
	a, err := Start(Options{
		Addresses: []string{good.address, hung.address}, Cluster: "east", WorkerID: "w1", Capacity: 1,
		OnEvent: log.add,
		Handler: func(ctx context.Context, action *Action) (*structpb.Struct, error) {
			close(started)
			select {
			case <-ctx.Done():
				stopped <- action.Lost()
			case <-finish:
			}
			return nil, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		close(finish)
		closeWithin(a, 5*time.Second)
	})
	wait := func(what string, ch <-chan struct{}) {
		t.Helper()
		select {
		case <-ch:
		case <-time.After(30 * time.Second):
			t.Fatalf("never happened: %s", what)
		}
	}
	// Wherever the agent went first, it ends up welcomed here (leaving the silent one).
	select {
	case <-good.hellos:
	case <-time.After(30 * time.Second):
		t.Fatal("no hello to the live server")
	}
	wait("a heartbeat ack", good.acked)
	good.send <- grantOf(1)
	wait("the handler's start", started)
	// This server goes away: the only other address is the silent one.
	before := hung.connections.Load()
	good.end <- status.Error(codes.Unavailable, "going away")
	deadline := time.After(30 * time.Second)
	for hung.connections.Load() == before {
		select {
		case <-hung.accepted:
		case <-deadline:
			t.Fatal("the agent never went to the other address")
		}
	}
	select {
	case held := <-good.hellos:
		if got := leases(held); !reflect.DeepEqual(got, []Lease{{ActionID: "a1", Epoch: 1}}) {
			t.Fatalf("the hello back to the live server lists %v, want the running lease", got)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the agent never came back to the live server")
	}
	// Its first heartbeat there is acknowledged: the guarantee is renewed, the lease kept.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if !a.waitFor(ctx, func() bool { return a.current != nil && a.current.welcomed && a.current.lastAcked > 0 }) {
		t.Fatal("no heartbeat ack on the stream back to the live server")
	}
	select {
	case lost := <-stopped:
		t.Fatalf("the handler was stopped: %v", lost)
	default:
	}
	// The stream that leaves the silent server, after the live one went away, leaves it on a
	// health check (the first stream may have gone there too, and left the same way).
	goneAway, probed := false, false
	for _, e := range log.all() {
		switch e := e.(type) {
		case SelfFenced:
			t.Fatalf("self-fenced %v after %v without an ack", e.ActionIDs, e.Silent)
		case Disconnected:
			_, after, found := strings.Cut(e.Err.Error(), "the server answered no health check for ")
			switch {
			case strings.Contains(e.Err.Error(), "going away"):
				goneAway = true
			case goneAway && found && strings.HasSuffix(after, "ms before welcoming the agent"):
				probed = true
			}
		}
	}
	if !probed {
		t.Fatalf("left the silent server otherwise than on an unanswered health check: %v", disconnects(log.all()))
	}
}

func disconnects(events []Event) []string {
	var out []string
	for _, e := range events {
		if d, ok := e.(Disconnected); ok {
			out = append(out, d.Err.Error())
		}
	}
	return out
}

// With one distinct address there is nowhere else to go: no health checks
// before the welcome. With several, they go out every heartbeat interval of
// the last welcome, 2 s before any.
func TestHealthChecksBeforeTheWelcomeOnlyWithSeveralAddresses(t *testing.T) {
	for _, tc := range []struct {
		addresses []string
		heartbeat time.Duration
		want      time.Duration
	}{
		{[]string{"a:1"}, 0, 0},
		{[]string{"a:1", "a:1"}, time.Second, 0},
		{[]string{"a:1", "b:1"}, 0, 2 * time.Second},
		{[]string{"a:1", "a:1", "b:1"}, 300 * time.Millisecond, 300 * time.Millisecond},
	} {
		a := &Agent{opts: Options{Addresses: tc.addresses}, heartbeatInterval: tc.heartbeat}
		if got := a.probeEvery(); got != tc.want {
			t.Errorf("%v after a welcome saying %v: checks every %v, want %v", tc.addresses, tc.heartbeat, got, tc.want)
		}
	}
}

// A server that holds the hello (starting, or waiting for its database) but
// answers the health checks is alive, whatever it answers: NOT_SERVING, or an
// error status (a server without the health service). The agent keeps
// waiting for its welcome, past 1.5 heartbeat intervals, instead of leaving.
func TestAnAgentWaitsForTheWelcomeOfAServerThatAnswersItsHealthChecks(t *testing.T) {
	for _, failing := range []bool{false, true} {
		name := "NOT_SERVING"
		if failing {
			name = "UNIMPLEMENTED"
		}
		t.Run(name, func(t *testing.T) { waitsForTheWelcome(t, failing) })
	}
}

func waitsForTheWelcome(t *testing.T, failing bool) {
	one, stopOne := startScripted(t, longGuarantee)
	t.Cleanup(stopOne)
	two, stopTwo := startScripted(t, longGuarantee)
	t.Cleanup(stopTwo)
	for _, s := range []*scriptedServer{one, two} {
		s.holdWelcome.Store(true)
		s.health.set(grpc_health_v1.HealthCheckResponse_NOT_SERVING)
		s.health.failing.Store(failing)
	}
	log := &eventLog{}
	a, err := Start(Options{
		Addresses: []string{one.address, two.address}, Cluster: "east", WorkerID: "w1",
		OnEvent: log.add,
		Handler: func(ctx context.Context, action *Action) (*structpb.Struct, error) { return nil, nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeWithin(a, 5*time.Second) })
	current, other := firstHello(t, one, two)
	// Three checks, a heartbeat interval (2 s before any welcome) apart: the stream has waited
	// past the 1.5 intervals that an unanswered check is given.
	for i := 1; i <= 3; i++ {
		select {
		case <-current.health.checks:
		case <-time.After(30 * time.Second):
			t.Fatalf("no health check %d on the stream waiting for its welcome (disconnects %v)", i, disconnects(log.all()))
		}
	}
	select {
	case current.releaseWelcome <- struct{}{}:
	case <-time.After(30 * time.Second):
		t.Fatal("the stream waiting for its welcome ended")
	}
	select {
	case <-current.acked:
	case <-time.After(30 * time.Second):
		t.Fatal("no heartbeat after the welcome")
	}
	if got := disconnects(log.all()); len(got) != 0 {
		t.Fatalf("left a server that answers its health checks: %v", got)
	}
	if n, m := current.streams.Load(), other.streams.Load(); n != 1 || m != 0 {
		t.Fatalf("opened %d streams to the server holding the hello and %d to the other, want 1 and 0", n, m)
	}
}

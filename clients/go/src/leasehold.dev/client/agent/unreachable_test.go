package agent

import (
	"context"
	"reflect"
	"strings"
	"testing"
	"time"

	leaseholdv1 "leasehold.dev/client/gen/leasehold/v1"

	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
)

// unreachableHeartbeat is the scripted servers' heartbeat interval: after a
// round of health checks in which no other address served, the agent asks
// again no sooner than 4 of them later.
const unreachableHeartbeat = 300 * time.Millisecond

// unreachable is an agent given two addresses that runs a lease on the server
// it connected to (current), whose acks say it cannot reach its database.
type unreachable struct {
	current, other *scriptedServer
	// stopped receives why the handler's context ended, if it does.
	stopped chan *LeaseLost
	events  chan Event
}

// onUnreachableServer starts two scripted servers whose health says
// NOT_SERVING but other's says otherHealth, starts an agent given both
// addresses, waits until it runs a grant of the server it connected to, then
// makes that server's acks say database_unreachable, as a server that cannot
// reach its database does. The guarantee still lasts a minute: no self-fence
// during the test.
func onUnreachableServer(t *testing.T, otherHealth grpc_health_v1.HealthCheckResponse_ServingStatus) *unreachable {
	timing := scriptTiming{heartbeat: unreachableHeartbeat, grace: time.Minute, remaining: time.Minute}
	one, stopOne := startScripted(t, timing)
	t.Cleanup(stopOne)
	two, stopTwo := startScripted(t, timing)
	t.Cleanup(stopTwo)
	one.health.set(grpc_health_v1.HealthCheckResponse_NOT_SERVING)
	two.health.set(grpc_health_v1.HealthCheckResponse_NOT_SERVING)
	s := &unreachable{stopped: make(chan *LeaseLost, 1), events: make(chan Event, 64)}
	started := make(chan struct{})
	finish := make(chan struct{})
	a, err := Start(Options{
		Addresses: []string{one.address, two.address}, Cluster: "east", WorkerID: "w1", Capacity: 1,
		OnEvent: func(e Event) {
			select {
			case s.events <- e:
			default: // the test no longer reads: never block the agent's loop
			}
		},
		Handler: func(ctx context.Context, action *Action) (*structpb.Struct, error) {
			close(started)
			select {
			case <-ctx.Done():
				s.stopped <- action.Lost()
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
	// The agent starts at a random address: the one it says hello to is the unreachable one.
	s.current, s.other = firstHello(t, one, two)
	s.other.health.set(otherHealth)
	select {
	case <-s.current.acked:
	case <-time.After(30 * time.Second):
		t.Fatal("no heartbeat ack")
	}
	s.current.send <- grantOf(1)
	select {
	case <-started:
	case <-time.After(30 * time.Second):
		t.Fatal("the grant never started")
	}
	s.current.unreachable.Store(true)
	return s
}

// handlerRuns fails the test if the handler's context ended.
func (s *unreachable) handlerRuns(t *testing.T) {
	t.Helper()
	select {
	case lost := <-s.stopped:
		t.Fatalf("the handler was stopped: %v", lost)
	default:
	}
}

// A server whose acks say it cannot reach its database (for a heartbeat
// interval) is left for another address whose health says SERVING: the
// session and its lease go there, and the handler keeps running.
func TestDatabaseUnreachableMovesTheAgentToAnAddressThatServes(t *testing.T) {
	s := onUnreachableServer(t, grpc_health_v1.HealthCheckResponse_SERVING)
	select {
	case held := <-s.other.hellos:
		if got := leases(held); !reflect.DeepEqual(got, []Lease{{ActionID: "a1", Epoch: 1}}) {
			t.Fatalf("the hello to the serving address lists %v, want the running lease", got)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the agent stayed on a server whose acks say it cannot reach its database")
	}
	select {
	case <-s.other.acked:
	case <-time.After(30 * time.Second):
		t.Fatal("no heartbeat ack from the serving address")
	}
	s.handlerRuns(t)
	for e := range s.events {
		switch e := e.(type) {
		case SelfFenced:
			t.Fatalf("self-fenced %v", e.ActionIDs)
		case Disconnected:
			if want := "the server cannot reach its database; " + s.other.address + " serves"; !strings.Contains(e.Err.Error(), want) {
				t.Fatalf("left the stream with %v", e.Err)
			}
			return
		}
	}
}

// When no other address serves either (the database is down for every
// server), the agent stays where it is, and asks again no sooner than 4
// heartbeat intervals after it last asked (the first round comes once the
// acks have said so for an interval).
func TestDatabaseUnreachableStaysWhenNoOtherAddressServes(t *testing.T) {
	s := onUnreachableServer(t, grpc_health_v1.HealthCheckResponse_NOT_SERVING)
	check := func(which string) time.Time {
		select {
		case at := <-s.other.health.checks:
			return at
		case <-time.After(30 * time.Second):
			t.Fatalf("the agent never asked the other address's health (%s round)", which)
		}
		return time.Time{}
	}
	first := check("first")
	// A second round on the same address: the agent stayed through the first one's answer
	// (after a move it would ask the address it left, not this one).
	second := check("second")
	// worker.proto: ask again no sooner than 4 intervals later. Measured where the checks
	// arrive, so less the time between starting a round and its check reaching the server
	// (a quarter interval of slack; asking on every ack would be a gap of one interval).
	if gap := second.Sub(first); gap < 4*unreachableHeartbeat-unreachableHeartbeat/4 {
		t.Fatalf("asked again after %v, want at least 4 heartbeat intervals", gap)
	}
	if n := s.other.streams.Load(); n != 0 {
		t.Fatalf("opened %d streams to the address that does not serve", n)
	}
	if n := s.current.streams.Load(); n != 1 {
		t.Fatalf("opened %d streams to the unreachable server, want the one it stayed on", n)
	}
	s.handlerRuns(t)
}

// The agent asks only once the acks of a stream have said database_unreachable
// for a heartbeat interval: an ack that does not say so restarts the wait. And
// it asks no sooner than 4 intervals after its last round, even on another
// stream. No round starts here (one would need a live stream): the test only
// looks at the state the acks leave and at the checks that hold a round back.
func TestDatabaseUnreachableWaitsAnIntervalPerStreamAndFourPerAgent(t *testing.T) {
	const interval = time.Hour // nothing here waits for it
	a := &Agent{opts: Options{Addresses: []string{"one:1", "two:2"}}, heartbeatInterval: interval}
	c := &conn{address: "one:1", welcomed: true}
	flagged := &leaseholdv1.HeartbeatAck{Sequence: 1, DatabaseUnreachable: true}
	a.heartbeatAck(c, flagged)
	since := c.unreachableSince
	if since.IsZero() {
		t.Fatal("a flagged ack did not start the wait")
	}
	if c.asking || !a.askedAt.IsZero() {
		t.Fatal("asked on the first flagged ack")
	}
	a.heartbeatAck(c, flagged)
	if !c.unreachableSince.Equal(since) {
		t.Fatal("a second flagged ack restarted the wait")
	}
	if c.asking || !a.askedAt.IsZero() {
		t.Fatal("asked before the flag held for an interval")
	}
	// Half an interval in: an ack without the flag clears the wait, and the next
	// flagged one starts it again from its own arrival.
	halfway := time.Now().Add(-interval / 2)
	c.unreachableSince = halfway
	a.heartbeatAck(c, &leaseholdv1.HeartbeatAck{Sequence: 2})
	if !c.unreachableSince.IsZero() {
		t.Fatal("an ack without the flag did not clear the wait")
	}
	a.heartbeatAck(c, flagged)
	if !c.unreachableSince.After(halfway) {
		t.Fatal("the flagged ack after an unflagged one did not restart the wait")
	}
	if c.asking || !a.askedAt.IsZero() {
		t.Fatal("asked before the restarted wait was over")
	}
	// The flag has held for an interval on a new stream, but the agent's last round
	// (on the stream it left) started a moment ago: no round.
	a.askedAt = time.Now()
	moved := &conn{address: "two:2", welcomed: true, unreachableSince: time.Now().Add(-2 * interval)}
	a.leaveIfUnreachable(moved)
	if moved.asking {
		t.Fatal("a new stream started a round right after the agent's last one")
	}
}

// An ack that says the database is back while the agent waits for the other
// addresses' answers keeps the agent where it is, even when another address
// then answers SERVING: leaving would move the session for nothing.
func TestDatabaseBackWhileAskingKeepsTheStream(t *testing.T) {
	// Long enough that each step below fits in an interval with a margin of over a second.
	const interval = 2 * time.Second
	timing := scriptTiming{heartbeat: interval, grace: time.Minute, remaining: time.Minute}
	one, stopOne := startScripted(t, timing)
	t.Cleanup(stopOne)
	two, stopTwo := startScripted(t, timing)
	t.Cleanup(stopTwo)
	events := make(chan Event, 64)
	a, err := Start(Options{
		Addresses: []string{one.address, two.address}, Cluster: "east", WorkerID: "w1",
		OnEvent: func(e Event) {
			select {
			case events <- e:
			default: // the test no longer reads: never block the agent's loop
			}
		},
		Handler: func(ctx context.Context, action *Action) (*structpb.Struct, error) { return nil, nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeWithin(a, 5*time.Second) })
	// The agent starts at a random address: the other one is asked, and holds its answer.
	current, other := firstHello(t, one, two)
	other.health.holding.Store(true)
	select {
	case <-current.acked:
	case <-time.After(30 * time.Second):
		t.Fatal("no heartbeat ack")
	}
	// onLoop waits until cond holds on the agent's loop, between two of its steps.
	onLoop := func(what string, cond func() bool) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if !a.waitFor(ctx, cond) {
			t.Fatalf("never happened: %s", what)
		}
	}
	var c *conn
	onLoop("a stream", func() bool { c = a.current; return c != nil })
	heldHeartbeat := func(which string) {
		t.Helper()
		select {
		case <-current.held:
		case <-time.After(30 * time.Second):
			t.Fatalf("no %s heartbeat", which)
		}
	}

	// From here on every ack is written by the test.
	current.holding.Store(true)
	heldHeartbeat("first held")
	current.unreachable.Store(true)
	current.answerOldest(t)
	// The next ack, the one that sends the agent asking, comes late: after the heartbeat that
	// follows it (the agent leaves a stream only when a heartbeat is due and the oldest is
	// unanswered for 1.5 intervals). That following heartbeat is then answered while the agent
	// waits, up to an interval, for the other server.
	heldHeartbeat("second held")
	heldHeartbeat("third held")
	current.answerOldest(t)
	select {
	case <-other.health.checks:
	case <-time.After(30 * time.Second):
		t.Fatal("the agent never asked the other address's health")
	}
	// The database is back before the other server answers.
	current.unreachable.Store(false)
	current.answerOldest(t)
	// Set since the first ack that said unreachable (the agent asked), cleared by this one alone.
	onLoop("the ack saying the database is back", func() bool { return c.unreachableSince.IsZero() })
	other.health.answerHeld()
	select {
	case waited := <-other.health.answered:
		if !waited {
			t.Fatal("the agent no longer waited for the other server's answer: it had no choice to make")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the other server never answered")
	}
	var left bool
	onLoop("the answer handled", func() bool { left = c.ended; return !c.asking })
	if left {
		t.Fatal("the agent left the stream whose acks say the database is back")
	}
	// The stream goes on: its next heartbeat, and no hello anywhere.
	heldHeartbeat("next")
	if n := current.streams.Load(); n != 1 {
		t.Fatalf("opened %d streams to the server whose database is back, want the one it stayed on", n)
	}
	if n := other.streams.Load(); n != 0 {
		t.Fatalf("opened %d streams to the other address", n)
	}
	for len(events) > 0 {
		if e, ok := (<-events).(Disconnected); ok {
			t.Fatalf("disconnected: %v", e.Err)
		}
	}
}

// A server whose renewal was late (a database outage) answers the last
// heartbeat again with the deadline it stored: the agent takes it from that
// heartbeat's send time, and still ignores an ack of a heartbeat it never sent.
func TestASecondAckOfTheLastHeartbeatMovesTheDeadline(t *testing.T) {
	a := &Agent{stopped: true} // no fence timer
	sentAt := time.Now().Add(-time.Second)
	c := &conn{address: "one:1", welcomed: true, sent: map[uint64]time.Time{1: sentAt}}
	a.heartbeatAck(c, &leaseholdv1.HeartbeatAck{Sequence: 1, Remaining: durationpb.New(2 * time.Second)})
	if want := sentAt.Add(2 * time.Second); !a.deadline.Equal(want) {
		t.Fatalf("deadline after the first ack: %v, want %v", a.deadline, want)
	}
	a.heartbeatAck(c, &leaseholdv1.HeartbeatAck{Sequence: 7, Remaining: durationpb.New(time.Hour)})
	a.heartbeatAck(c, &leaseholdv1.HeartbeatAck{Sequence: 1, Remaining: durationpb.New(time.Minute)})
	if want := sentAt.Add(time.Minute); !a.deadline.Equal(want) {
		t.Fatalf("deadline after the second ack: %v, want %v", a.deadline, want)
	}
}

// firstHello waits for the agent's first hello, to one or two (it starts at a random address),
// and returns the server that got it, then the other.
func firstHello(t *testing.T, one, two *scriptedServer) (current, other *scriptedServer) {
	t.Helper()
	select {
	case <-one.hellos:
		return one, two
	case <-two.hellos:
		return two, one
	case <-time.After(30 * time.Second):
		t.Fatal("no hello")
	}
	return nil, nil
}

// A self-fence while the acks said the server could not reach its database
// says so, in the event and in the reason the handler (and the release) gets,
// rather than that no ack came.
func TestSelfFenceWhileTheDatabaseIsUnreachableSaysSo(t *testing.T) {
	fs, stop := startScripted(t, scriptTiming{heartbeat: time.Second, grace: 200 * time.Millisecond,
		remaining: 1500 * time.Millisecond})
	defer stop()
	// Every ack says so, the first included; with no other address, the agent stays.
	fs.unreachable.Store(true)
	started := make(chan struct{})
	lost := make(chan *LeaseLost, 1)
	events := make(chan Event, 64)
	a, err := Start(Options{
		Addresses: []string{fs.address}, Cluster: "east", WorkerID: "w1", Capacity: 1,
		SelfFenceMargin: 200 * time.Millisecond,
		OnEvent: func(e Event) {
			select {
			case events <- e:
			default:
			}
		},
		Handler: func(ctx context.Context, action *Action) (*structpb.Struct, error) {
			close(started)
			<-ctx.Done()
			lost <- action.Lost()
			return nil, ctx.Err()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer closeWithin(a, 5*time.Second)
	<-fs.hellos
	waitAcked(t, fs)
	fs.send <- grantOf(1)
	select {
	case <-started:
	case <-time.After(30 * time.Second):
		t.Fatal("the grant never started")
	}
	fs.acking.Store(false)
	select {
	case l := <-lost:
		if l == nil || l.Reason != "self_fenced" || !strings.Contains(l.Message, "could not reach its database") {
			t.Fatalf("the handler was stopped with %v", l)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no self-fence")
	}
	for e := range events {
		if f, ok := e.(SelfFenced); ok {
			if !f.DatabaseUnreachable {
				t.Fatalf("the self-fence event does not say the database was unreachable: %+v", f)
			}
			return
		}
	}
}

package agent

import (
	"context"
	"fmt"
	"net"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	leaseholdv1 "leasehold.dev/client/gen/leasehold/v1"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
)

// scriptedServer welcomes the agent, acks its heartbeats (while acking is on)
// with the guarantee of its timing, accepts every report, passes each hello's
// held leases on hellos, and writes what the test puts on send. Its welcome
// sets accepts_stop_grants while acceptsStopGrants is on, and got receives,
// in order, a line for each hello, StopGrants, report and goodbye (see
// described). While silent is on, grant acks and reports go unanswered. One goroutine
// per stream writes everything, so a grant sent after acked follows that
// first ack. While holding is on, it keeps the heartbeats unanswered, as a
// slow server does, and answers the oldest of them on answerOldest. It serves
// grpc.health.v1 too (see scriptedHealth).
type scriptedServer struct {
	leaseholdv1.UnimplementedWorkerServiceServer
	timing scriptTiming
	acking atomic.Bool
	// silent: grant acks and reports go unanswered.
	silent atomic.Bool
	send   chan *leaseholdv1.ConnectResponse
	hellos chan []*leaseholdv1.HeldLease
	acked  chan struct{}
	once   sync.Once
	// end ends the stream with an error status.
	end     chan error
	address string
	// instance is the last hello's instance_id.
	instance atomic.Value
	// streams counts the Connect streams opened.
	streams atomic.Int32
	// unreachable: the acks carry database_unreachable, as those of a server
	// that cannot reach its database do.
	unreachable atomic.Bool
	// holding: heartbeats from now on wait for answerOldest; held gets the
	// sequence of each as it arrives (dropped when full).
	holding atomic.Bool
	held    chan uint64
	oldest  chan struct{}
	health  *scriptedHealth
	// acceptsStopGrants: the welcome sets accepts_stop_grants.
	acceptsStopGrants atomic.Bool
	got               chan string
	// holdWelcome: the welcome waits for a value on releaseWelcome, as that
	// of a server starting, or waiting for its database, does.
	holdWelcome    atomic.Bool
	releaseWelcome chan struct{}
	// refuseCompletion: when set (a string), the next completion is answered
	// INVALID with it, as a server with other limits would.
	refuseCompletion atomic.Value
	// completions gets every completion as it arrives (dropped when full).
	completions chan *leaseholdv1.CompletionReport
}

// described is a line for got: "hello" (with " stop_grants" when it sets
// that), "stop_grants", "release <action id>", "completion <action id>" or
// "goodbye"; "" for the messages got leaves out.
func described(req *leaseholdv1.ConnectRequest) string {
	switch m := req.GetMessage().(type) {
	case *leaseholdv1.ConnectRequest_Hello:
		if m.Hello.GetStopGrants() {
			return "hello stop_grants"
		}
		return "hello"
	case *leaseholdv1.ConnectRequest_StopGrants:
		return "stop_grants"
	case *leaseholdv1.ConnectRequest_Release:
		return "release " + m.Release.GetActionId()
	case *leaseholdv1.ConnectRequest_Completion:
		return "completion " + m.Completion.GetActionId()
	case *leaseholdv1.ConnectRequest_Goodbye:
		return "goodbye"
	}
	return ""
}

// answerOldest has the stream answer the oldest heartbeat it holds, if any,
// before it writes anything sent after this returns. The ack says what the
// acks say now (unreachable).
func (s *scriptedServer) answerOldest(t *testing.T) {
	t.Helper()
	select {
	case s.oldest <- struct{}{}:
	case <-time.After(30 * time.Second):
		t.Fatal("no stream to answer a held heartbeat")
	}
}

// scriptedHealth answers grpc.health.v1 Check with status, whatever the
// service, and sends the time of each check on checks (dropped when full).
// While holding is on, a check waits for answerHeld (or for its caller to stop
// waiting) before it answers, and then sends on answered whether the caller
// still waited: its call was neither cancelled nor past its deadline.
type scriptedHealth struct {
	grpc_health_v1.UnimplementedHealthServer
	status atomic.Int32
	// failing: checks answer with an error status instead (UNIMPLEMENTED, as a
	// server without the health service does).
	failing  atomic.Bool
	checks   chan time.Time
	holding  atomic.Bool
	release  chan struct{}
	answered chan bool
}

// answerHeld lets the held checks answer, and those to come at once; once only.
func (h *scriptedHealth) answerHeld() { close(h.release) }

func (h *scriptedHealth) set(status grpc_health_v1.HealthCheckResponse_ServingStatus) {
	h.status.Store(int32(status))
}

func (h *scriptedHealth) Check(ctx context.Context, req *grpc_health_v1.HealthCheckRequest) (*grpc_health_v1.HealthCheckResponse, error) {
	select {
	case h.checks <- time.Now():
	default:
	}
	if h.holding.Load() {
		select {
		case <-h.release:
		case <-ctx.Done():
		}
		select {
		case h.answered <- ctx.Err() == nil:
		default:
		}
	}
	if h.failing.Load() {
		return nil, status.Error(codes.Unimplemented, "no health service here")
	}
	return &grpc_health_v1.HealthCheckResponse{Status: grpc_health_v1.HealthCheckResponse_ServingStatus(h.status.Load())}, nil
}

// scriptTiming is what the welcome and the acks say.
type scriptTiming struct {
	heartbeat, grace, remaining time.Duration
}

// longGuarantee: acks that keep the agent's guarantee for a minute.
var longGuarantee = scriptTiming{heartbeat: time.Second, grace: time.Minute, remaining: time.Minute}

func (s *scriptedServer) Connect(stream leaseholdv1.WorkerService_ConnectServer) error {
	s.streams.Add(1)
	send := func(m *leaseholdv1.ConnectResponse) { _ = stream.Send(m) }
	ack := func(sequence uint64) {
		send(&leaseholdv1.ConnectResponse{Message: &leaseholdv1.ConnectResponse_HeartbeatAck{HeartbeatAck: &leaseholdv1.HeartbeatAck{
			Sequence: sequence, Remaining: durationpb.New(s.timing.remaining),
			DatabaseUnreachable: s.unreachable.Load()}}})
		s.once.Do(func() { close(s.acked) })
	}
	// The heartbeats held back, oldest first.
	var held []uint64
	// The welcome held back (holdWelcome), until releaseWelcome.
	var heldWelcome *leaseholdv1.ConnectResponse
	var answer func(*leaseholdv1.ConnectRequest)
	answer = func(req *leaseholdv1.ConnectRequest) {
		if line := described(req); line != "" {
			select {
			case s.got <- line:
			default: // the test does not read them
			}
		}
		switch req.GetMessage().(type) {
		case *leaseholdv1.ConnectRequest_GrantAck, *leaseholdv1.ConnectRequest_Completion, *leaseholdv1.ConnectRequest_Release:
			if s.silent.Load() {
				return
			}
		}
		switch m := req.GetMessage().(type) {
		case *leaseholdv1.ConnectRequest_Batch:
			for _, inner := range m.Batch.GetMessages() {
				answer(inner)
			}
		case *leaseholdv1.ConnectRequest_Hello:
			s.instance.Store(m.Hello.GetInstanceId())
			s.hellos <- m.Hello.GetHeldLeases()
			welcome := &leaseholdv1.ConnectResponse{Message: &leaseholdv1.ConnectResponse_Welcome{Welcome: &leaseholdv1.Welcome{
				SessionId: "s1", HeartbeatInterval: durationpb.New(s.timing.heartbeat),
				GracePeriod: durationpb.New(s.timing.grace), AcceptsBatches: true,
				AcceptsStopGrants: s.acceptsStopGrants.Load()}}}
			if s.holdWelcome.Load() {
				heldWelcome = welcome
			} else {
				send(welcome)
			}
		case *leaseholdv1.ConnectRequest_Heartbeat:
			switch {
			case !s.acking.Load():
			case s.holding.Load():
				held = append(held, m.Heartbeat.GetSequence())
				select {
				case s.held <- m.Heartbeat.GetSequence():
				default:
				}
			default:
				ack(m.Heartbeat.GetSequence())
			}
		case *leaseholdv1.ConnectRequest_GrantAck:
			send(reportResult(m.GrantAck.GetReportId(), m.GrantAck.GetActionId(), m.GrantAck.GetEpoch()))
		case *leaseholdv1.ConnectRequest_Completion:
			select {
			case s.completions <- m.Completion:
			default:
			}
			if refusal, _ := s.refuseCompletion.Swap("").(string); refusal != "" {
				send(&leaseholdv1.ConnectResponse{Message: &leaseholdv1.ConnectResponse_ReportResult{ReportResult: &leaseholdv1.ReportResult{
					ReportId: m.Completion.GetReportId(), ActionId: m.Completion.GetActionId(), Epoch: m.Completion.GetEpoch(),
					RejectReason: leaseholdv1.RejectReason_REJECT_REASON_INVALID, Message: refusal}}})
				break
			}
			send(reportResult(m.Completion.GetReportId(), m.Completion.GetActionId(), m.Completion.GetEpoch()))
		case *leaseholdv1.ConnectRequest_Release:
			send(reportResult(m.Release.GetReportId(), m.Release.GetActionId(), m.Release.GetEpoch()))
		}
	}
	requests := make(chan *leaseholdv1.ConnectRequest)
	go func() {
		defer close(requests)
		for {
			req, err := stream.Recv()
			if err != nil {
				return
			}
			requests <- req
		}
	}()
	for {
		select {
		case req, ok := <-requests:
			if !ok {
				return nil
			}
			answer(req)
		case m := <-s.send:
			send(m)
		case <-s.oldest:
			if len(held) > 0 {
				ack(held[0])
				held = held[1:]
			}
		case <-s.releaseWelcome:
			if heldWelcome != nil {
				send(heldWelcome)
				heldWelcome = nil
			}
		case err := <-s.end:
			return err
		}
	}
}

func reportResult(reportID uint64, actionID string, epoch uint64) *leaseholdv1.ConnectResponse {
	return &leaseholdv1.ConnectResponse{Message: &leaseholdv1.ConnectResponse_ReportResult{ReportResult: &leaseholdv1.ReportResult{
		ReportId: reportID, ActionId: actionID, Epoch: epoch, Accepted: true}}}
}

// startScripted serves a scriptedServer on a free loopback port.
func startScripted(t *testing.T, timing scriptTiming) (*scriptedServer, func()) {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	script := &scriptedServer{timing: timing, send: make(chan *leaseholdv1.ConnectResponse, 8),
		hellos: make(chan []*leaseholdv1.HeldLease, 8), acked: make(chan struct{}),
		end: make(chan error, 1), address: listener.Addr().String(),
		held: make(chan uint64, 8), oldest: make(chan struct{}), got: make(chan string, 64),
		releaseWelcome: make(chan struct{}), completions: make(chan *leaseholdv1.CompletionReport, 8),
		health: &scriptedHealth{checks: make(chan time.Time, 8), release: make(chan struct{}), answered: make(chan bool, 8)}}
	script.acking.Store(true)
	script.health.set(grpc_health_v1.HealthCheckResponse_SERVING)
	leaseholdv1.RegisterWorkerServiceServer(server, script)
	grpc_health_v1.RegisterHealthServer(server, script.health)
	go func() { _ = server.Serve(listener) }()
	return script, server.Stop
}

func grantOf(epoch uint64) *leaseholdv1.ConnectResponse {
	return &leaseholdv1.ConnectResponse{Message: &leaseholdv1.ConnectResponse_Grant{Grant: &leaseholdv1.Grant{
		ActionId: "a1", Epoch: epoch, Attempt: uint32(epoch)}}}
}

// A grant of an action the server ended while its handler still stops waits
// for that handler: the two never run at once, on the same action, whatever
// slots are free.
func TestRegrantOfTheSameActionWaitsForItsStoppingHandler(t *testing.T) {
	for _, capacity := range []int{1, 2} {
		t.Run(fmt.Sprintf("%d slots", capacity), func(t *testing.T) { regrantWaits(t, capacity) })
	}
}

func regrantWaits(t *testing.T, capacity int) {
	script, stop := startScripted(t, longGuarantee)
	defer stop()

	var mu sync.Mutex
	var log []string
	record := func(s string) {
		mu.Lock()
		defer mu.Unlock()
		log = append(log, s)
	}
	logged := func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), log...)
	}
	granted := make(chan Granted, 8)
	firstStarted := make(chan struct{})
	firstStopping := make(chan struct{})
	letFirstReturn := make(chan struct{})
	secondStarted := make(chan struct{})
	a, err := Start(Options{
		Addresses: []string{script.address},
		Cluster:   "east",
		WorkerID:  "w1",
		Capacity:  capacity,
		OnEvent: func(e Event) {
			if g, ok := e.(Granted); ok {
				granted <- g
			}
		},
		Handler: func(ctx context.Context, action *Action) (*structpb.Struct, error) {
			record("start " + map[uint64]string{1: "1", 2: "2"}[action.Epoch])
			if action.Epoch == 2 {
				close(secondStarted)
				return nil, nil
			}
			close(firstStarted)
			// It honours the cancel, but takes a while to tear down (a container's stop).
			<-ctx.Done()
			close(firstStopping)
			<-letFirstReturn
			record("end 1")
			return nil, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer closeWithin(a, 5*time.Second)
	wait := func(what string, ch <-chan struct{}) {
		select {
		case <-ch:
		case <-time.After(30 * time.Second):
			t.Fatalf("never happened: %s", what)
		}
	}
	waitGrant := func(epoch uint64) Granted {
		for {
			select {
			case g := <-granted:
				if g.Epoch == epoch {
					return g
				}
			case <-time.After(30 * time.Second):
				t.Fatalf("never granted: epoch %d", epoch)
			}
		}
	}
	wait("the first heartbeat ack", script.acked)
	script.send <- grantOf(1)
	waitGrant(1)
	// Started, not only granted: this server may send the grant before the ack that gives it a
	// guarantee (two channels, one select), and a revoke would then take back a grant never run.
	wait("the first handler's start", firstStarted)
	// The server ends the lease (the session expired while its stream was down, say) and, the
	// slot being free on its side, grants the action again at once.
	script.send <- &leaseholdv1.ConnectResponse{Message: &leaseholdv1.ConnectResponse_Revoke{Revoke: &leaseholdv1.Revoke{
		ActionId: "a1", Epoch: 1, Reason: leaseholdv1.RevokeReason_REVOKE_REASON_EXPIRED}}}
	wait("the first handler stopping", firstStopping)
	script.send <- grantOf(2)
	// The guarantee is fresh (a minute), so only the stopping handler can make it wait.
	if g := waitGrant(2); !g.Waiting {
		t.Fatalf("the second grant started beside the stopping handler (log %v)", logged())
	}
	close(letFirstReturn)
	wait("the second handler", secondStarted)
	if got := logged(); !reflect.DeepEqual(got, []string{"start 1", "end 1", "start 2"}) {
		t.Fatalf("order: %v", got)
	}
}

// Another process connecting with the same worker id takes the session over:
// the agent cancels every handler at once and stays away a grace period.
func TestTakenOverStopsEveryHandlerAndWaitsAGracePeriod(t *testing.T) {
	// The welcome's grace period is a minute: it stays away at least that long.
	takenOver(t, codes.Aborted, "a newer stream of this worker took the session over", "SESSION_TAKEN_OVER",
		time.Minute, 2*time.Minute)
}

// A hello refused because another process holds the session stops every
// handler too (that process owns the session, its leases and their grants),
// but the refusal disturbed nothing: the agent tries again in 1-2 s.
func TestWorkerIDInUseStopsEveryHandlerAndTriesAgainSoon(t *testing.T) {
	takenOver(t, codes.AlreadyExists, "worker is connected from another process", "WORKER_ID_IN_USE",
		time.Second, 2*time.Second)
}

func takenOver(t *testing.T, code codes.Code, message, reason string, least, most time.Duration) {
	script, stop := startScripted(t, longGuarantee)
	defer stop()
	events := make(chan Event, 16)
	cancelled := make(chan *LeaseLost, 1)
	started := make(chan struct{})
	a, err := Start(Options{
		Addresses: []string{script.address},
		Cluster:   "east",
		WorkerID:  "twin",
		Capacity:  1,
		OnEvent: func(e Event) {
			select {
			case events <- e:
			default: // the test no longer reads: never block the agent's loop
			}
		},
		Handler: func(ctx context.Context, action *Action) (*structpb.Struct, error) {
			close(started)
			<-ctx.Done()
			cancelled <- action.Lost()
			return nil, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer closeWithin(a, time.Second)
	select {
	case <-script.acked:
	case <-time.After(30 * time.Second):
		t.Fatal("no heartbeat ack")
	}
	script.send <- grantOf(1)
	// Started, not only granted (see regrantWaits).
	select {
	case <-started:
	case <-time.After(30 * time.Second):
		t.Fatal("the grant never started")
	}
	// Every hello names this process by a random instance id.
	if id, _ := script.instance.Load().(string); len(id) != 32 {
		t.Fatalf("instance_id %q, want 32 hex digits", id)
	}
	st, err := status.New(code, message).WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: "leasehold.dev"})
	if err != nil {
		t.Fatal(err)
	}
	script.end <- st.Err()
	select {
	case lost := <-cancelled:
		if lost == nil || lost.Reason != "superseded" {
			t.Fatalf("handler stopped with %v, want superseded", lost)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the handler was never cancelled")
	}
	for e := range events {
		if o, ok := e.(TakenOver); ok {
			if o.RetryIn < least || o.RetryIn > most {
				t.Fatalf("reconnects after %v, want %v to %v", o.RetryIn, least, most)
			}
			return
		}
	}
}

// A handler that self-fenced and still stops when another process takes the
// session: the agent's next hello leaves its lease out (the server ended it),
// so the server sends it again instead of resuming it with nobody running it.
func TestSelfFencedLeaseIsNotListedAfterATakeover(t *testing.T) {
	// Heartbeats every second: the self-fence (1.3 s after the last acked one was sent) comes well
	// before the agent leaves the unanswering stream (its oldest heartbeat unanswered for 1.5 s).
	fs, stop := startScripted(t, scriptTiming{heartbeat: time.Second, grace: 200 * time.Millisecond,
		remaining: 1500 * time.Millisecond})
	defer stop()
	started := make(chan struct{})
	stopping := make(chan struct{})
	letReturn := make(chan struct{})
	a, err := Start(Options{
		Addresses: []string{fs.address}, Cluster: "east", WorkerID: "w1", Capacity: 1,
		SelfFenceMargin: 200 * time.Millisecond,
		Handler: func(ctx context.Context, action *Action) (*structpb.Struct, error) {
			close(started)
			<-ctx.Done()
			close(stopping)
			<-letReturn
			return nil, ctx.Err()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer closeWithin(a, 2*time.Second)
	defer close(letReturn)
	wait := func(what string, ch <-chan struct{}) {
		select {
		case <-ch:
		case <-time.After(30 * time.Second):
			t.Fatalf("never happened: %s", what)
		}
	}
	<-fs.hellos
	wait("a heartbeat ack", fs.acked)
	fs.send <- grantOf(1)
	wait("the handler's start", started)
	fs.acking.Store(false) // acks stop: the agent self-fences
	wait("the self-fence", stopping)
	st, err := status.New(codes.Aborted, "a newer stream of this worker took the session over").
		WithDetails(&errdetails.ErrorInfo{Reason: "SESSION_TAKEN_OVER", Domain: "leasehold.dev"})
	if err != nil {
		t.Fatal(err)
	}
	fs.end <- st.Err()
	nextHelloListsNothing(t, fs, "the takeover")
}

// waitAcked waits for the first heartbeat ack.
func waitAcked(t *testing.T, fs *scriptedServer) {
	t.Helper()
	select {
	case <-fs.acked:
	case <-time.After(30 * time.Second):
		t.Fatal("no heartbeat ack")
	}
}

// nextHelloListsNothing waits for the next hello and fails unless it lists no
// lease; after says what came before it.
func nextHelloListsNothing(t *testing.T, fs *scriptedServer, after string) {
	t.Helper()
	select {
	case held := <-fs.hellos:
		if len(held) != 0 {
			t.Fatalf("the hello after %s lists %v", after, held)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("no hello after %s", after)
	}
}

// twinEnding ends a stream as the server does when another process uses the
// worker id: taking the session over (ABORTED, SESSION_TAKEN_OVER), or
// refusing a hello while that process holds it (ALREADY_EXISTS,
// WORKER_ID_IN_USE).
func twinEnding(t *testing.T, code codes.Code, reason string) error {
	st, err := status.New(code, "another process uses this worker id").
		WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: "leasehold.dev"})
	if err != nil {
		t.Fatal(err)
	}
	return st.Err()
}

func grantFor(actionID string, epoch uint64) *leaseholdv1.ConnectResponse {
	return &leaseholdv1.ConnectResponse{Message: &leaseholdv1.ConnectResponse_Grant{Grant: &leaseholdv1.Grant{
		ActionId: actionID, Epoch: epoch, Attempt: uint32(epoch)}}}
}

// After a takeover the leases are the other process's (worker.proto): the
// agent drops them all. A completion sent and not answered is not sent again,
// and a handler still stopping is neither listed in the next hello nor
// reported on when it returns.
func TestTakenOverDropsEveryLease(t *testing.T) {
	droppedAfter(t, codes.Aborted, "SESSION_TAKEN_OVER")
}

// A hello refused as in use drops every lease the same way.
func TestWorkerIDInUseDropsEveryLease(t *testing.T) {
	droppedAfter(t, codes.AlreadyExists, "WORKER_ID_IN_USE")
}

func droppedAfter(t *testing.T, code codes.Code, reason string) {
	// A grace period of a second: the agent comes back 1 to 2 s after a takeover.
	fs, stop := startScripted(t, scriptTiming{heartbeat: time.Second, grace: time.Second, remaining: time.Minute})
	defer stop()
	started := make(chan struct{})
	stopping := make(chan *LeaseLost, 1)
	letReturn := make(chan struct{})
	a, err := Start(Options{
		Addresses: []string{fs.address}, Cluster: "east", WorkerID: "twin", Capacity: 2,
		Handler: func(ctx context.Context, action *Action) (*structpb.Struct, error) {
			if action.ID == "done" {
				return structpb.NewStruct(map[string]any{"ok": true})
			}
			close(started)
			<-ctx.Done()
			stopping <- action.Lost()
			// Still stopping (a command waiting for its process group), then returning a result.
			<-letReturn
			return structpb.NewStruct(map[string]any{"finished": true})
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer closeWithin(a, 2*time.Second)
	returned := false
	defer func() {
		if !returned {
			close(letReturn)
		}
	}()
	<-fs.hellos
	waitAcked(t, fs)
	// The completion goes out and is not answered before the other process takes the session.
	fs.silent.Store(true)
	fs.send <- grantFor("running", 1)
	fs.send <- grantFor("done", 1)
	<-started
	linesUntil(t, fs.got, "completion done")
	fs.silent.Store(false)
	fs.end <- twinEnding(t, code, reason)
	select {
	case lost := <-stopping:
		if lost == nil || lost.Reason != "superseded" {
			t.Fatalf("handler stopped with %v, want superseded", lost)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the handler was never cancelled")
	}
	// The handler of "running" is still stopping: its lease is the other process's all the same.
	nextHelloListsNothing(t, fs, "the other process took the session")
	returned = true
	close(letReturn)
	// Reports waiting go out right after the welcome, and the handler's result once it returns:
	// both before the goodbye.
	closeWithin(a, 2*time.Second)
	linesUntil(t, fs.got, "goodbye", "completion done", "completion running", "release running", "release done")
}

// A handler that ignores its context after a takeover: Close gives up on it,
// but does not release its lease, which is the other process's.
func TestCloseDoesNotReleaseALeaseDroppedAfterATakeover(t *testing.T) {
	fs, stop := startScripted(t, scriptTiming{heartbeat: time.Second, grace: time.Second, remaining: time.Minute})
	defer stop()
	started := make(chan struct{})
	letReturn := make(chan struct{})
	defer close(letReturn)
	a, err := Start(Options{
		Addresses: []string{fs.address}, Cluster: "east", WorkerID: "twin", Capacity: 1,
		Handler: func(ctx context.Context, action *Action) (*structpb.Struct, error) {
			close(started)
			<-letReturn // ignores its context
			return nil, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	<-fs.hellos
	waitAcked(t, fs)
	fs.send <- grantFor("stubborn", 1)
	<-started
	fs.end <- twinEnding(t, codes.Aborted, "SESSION_TAKEN_OVER")
	nextHelloListsNothing(t, fs, "the takeover")
	// Close waits 5 s for the handler, which never returns, and then says goodbye.
	closeWithin(a, 100*time.Millisecond)
	linesUntil(t, fs.got, "goodbye", "release stubborn")
}

// reaped ends a stream as the server does when its session passed its deadline.
func reaped(t *testing.T) error {
	st, err := status.New(codes.Aborted, "this session passed its deadline and was reaped").
		WithDetails(&errdetails.ErrorInfo{Reason: "SESSION_REAPED", Domain: "leasehold.dev"})
	if err != nil {
		t.Fatal(err)
	}
	return st.Err()
}

// linesUntil reads got until want, failing on any line in refused before it.
func linesUntil(t *testing.T, got <-chan string, want string, refused ...string) {
	for {
		select {
		case line := <-got:
			if line == want {
				return
			}
			for _, r := range refused {
				if line == r {
					t.Fatalf("the agent sent %q before %q", line, want)
				}
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("never got %q", want)
		}
	}
}

// A process paused past its deadline wakes to a self-fence and a stream the
// server ended SESSION_REAPED: the release the fence queued is not sent again,
// and the next hello lists nothing (worker.proto: report nothing more of those
// leases and do not list them again).
func TestAReapedSessionsSelfFencedLeaseIsNeitherListedNorReleased(t *testing.T) {
	fs, stop := startScripted(t, scriptTiming{heartbeat: time.Second, grace: 200 * time.Millisecond,
		remaining: 1500 * time.Millisecond})
	defer stop()
	started := make(chan struct{})
	a, err := Start(Options{
		Addresses: []string{fs.address}, Cluster: "east", WorkerID: "w1", Capacity: 1,
		SelfFenceMargin: 200 * time.Millisecond,
		Handler: func(ctx context.Context, action *Action) (*structpb.Struct, error) {
			close(started)
			<-ctx.Done()
			return nil, ctx.Err()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer closeWithin(a, 2*time.Second)
	<-fs.hellos
	waitAcked(t, fs)
	fs.silent.Store(true)
	fs.send <- grantOf(1)
	<-started
	fs.acking.Store(false) // acks stop: the agent self-fences and releases the lease
	linesUntil(t, fs.got, "release a1")
	fs.acking.Store(true)
	fs.silent.Store(false)
	fs.end <- reaped(t)
	nextHelloListsNothing(t, fs, "the reap")
	// Reports waiting go out right after the welcome, before the goodbye.
	closeWithin(a, 2*time.Second)
	linesUntil(t, fs.got, "goodbye", "release a1", "completion a1")
}

// A handler still running when the server reaps its session is cancelled
// (expired) and reports nothing.
func TestAReapedSessionsRunningHandlerStopsAndReportsNothing(t *testing.T) {
	fs, stop := startScripted(t, longGuarantee)
	defer stop()
	started := make(chan struct{})
	reasons := make(chan string, 1)
	revoked := make(chan Revoked, 4)
	a, err := Start(Options{
		Addresses: []string{fs.address}, Cluster: "east", WorkerID: "w1", Capacity: 1,
		OnEvent: func(e Event) {
			if r, ok := e.(Revoked); ok {
				select {
				case revoked <- r:
				default: // never block the agent's loop
				}
			}
		},
		Handler: func(ctx context.Context, action *Action) (*structpb.Struct, error) {
			close(started)
			<-ctx.Done()
			if lost := action.Lost(); lost != nil {
				reasons <- lost.Reason
			} else {
				reasons <- "not lost"
			}
			return nil, ctx.Err()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer closeWithin(a, 2*time.Second)
	<-fs.hellos
	<-fs.acked
	fs.send <- grantOf(1)
	<-started
	fs.end <- reaped(t)
	select {
	case reason := <-reasons:
		if reason != "expired" {
			t.Fatalf("the handler stopped for %q, not expired", reason)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the handler never stopped")
	}
	if r := <-revoked; r.Reason != "expired" || r.ActionID != "a1" {
		t.Fatalf("revoked event %+v", r)
	}
	if held := <-fs.hellos; len(held) != 0 {
		t.Fatalf("the hello after the reap lists %v, a lease that expired", held)
	}
	closeWithin(a, 2*time.Second)
	linesUntil(t, fs.got, "goodbye", "release a1", "completion a1")
}

// A server that stops answering heartbeats (hung) never ends the stream: the
// agent leaves it once the oldest heartbeat has waited 1.5 intervals (and the
// look again 0.2 s later), not at the next beat after that (2 intervals), and
// says hello again.
func TestUnansweredHeartbeatsMakeTheAgentLeaveTheStream(t *testing.T) {
	fs, stop := startScripted(t, scriptTiming{heartbeat: 3 * time.Second, grace: time.Minute, remaining: time.Minute})
	defer stop()
	events := make(chan Event, 64)
	a, err := Start(Options{
		Addresses: []string{fs.address}, Cluster: "east", WorkerID: "w1", Capacity: 1,
		OnEvent: func(e Event) {
			select {
			case events <- e:
			default:
			}
		},
		Handler: func(ctx context.Context, action *Action) (*structpb.Struct, error) { return nil, nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	defer closeWithin(a, time.Second)
	<-fs.hellos
	waitAcked(t, fs)
	fs.acking.Store(false)
	for e := range events {
		if d, ok := e.(Disconnected); ok {
			_, after, found := strings.Cut(d.Err.Error(), "the server answered no heartbeat for ")
			silent, err := time.ParseDuration(after)
			if !found || err != nil {
				t.Fatalf("left the stream with %v", d.Err)
			}
			if silent <= 4500*time.Millisecond || silent >= 5800*time.Millisecond {
				t.Fatalf("left after %v without an answer; want 4.5 s and a little", silent)
			}
			select {
			case <-fs.hellos:
			case <-time.After(30 * time.Second):
				t.Fatal("the agent stayed on a server that answers no heartbeat")
			}
			return
		}
	}
}

// closeWithin closes a, waiting at most d for its handlers and goodbye.
func closeWithin(a *Agent, d time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	_ = a.Close(ctx)
}

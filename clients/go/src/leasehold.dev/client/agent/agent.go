// Package agent runs Leasehold work on a cluster machine: it holds one
// WorkerService.Connect stream to the server, heartbeats, runs every granted
// action in its own goroutine with a Handler, reports the result fenced by
// (action_id, epoch), and follows the rest of the wire contract written in
// proto/leasehold/v1/worker.proto: reconnection with bounded, jittered
// backoff to another of the server's addresses, picked at random, with a
// hello that lists the held leases so they resume; leaving a server that
// answers no heartbeat, or, before the welcome, no health check; revokes,
// drains, self-fencing, and a goodbye on Close.
//
// It is a port of the TypeScript agent SDK (src/agent/agent.ts), which stays
// the reference: the two behave the same on the wire.
package agent

import (
	"context"
	cryptorand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand"
	"sync"
	"time"

	leaseholdv1 "leasehold.dev/client/gen/leasehold/v1"
	"leasehold.dev/client/rpcerr"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/structpb"
)

// Handler runs one granted action and returns its output (nil for none), or
// an error: a *Failure to choose whether it is retried, any other error to
// fail it retryably.
//
// ctx ends when the lease is lost (revoked, superseded, self-fenced) or the
// agent closes without waiting; Action.Lost says why. A handler must stop
// soon after: whatever it returns then is not reported as a result.
type Handler func(ctx context.Context, action *Action) (*structpb.Struct, error)

// Options configure an Agent. Cluster, WorkerID, Addresses and Handler are required.
type Options struct {
	// Addresses of the server as host:port. The agent starts at a random one
	// and, whenever its stream ends, moves to another picked at random among
	// the others (entries naming the same address are one; with a single
	// address it stays). It ends a stream itself when the server answers no
	// heartbeat for 1.5 heartbeat intervals, and, with several addresses:
	// before the welcome, when a grpc.health.v1 Check on the stream's own
	// connection, sent right after the hello and then every heartbeat
	// interval (2 s before any welcome), goes unanswered for 1.5 intervals
	// (any answer, NOT_SERVING too, means the server is alive); and when the
	// acks have said for a heartbeat interval that the server cannot reach
	// its database and another address's Check says SERVING: the next stream
	// then goes to the first such address after the current one.
	Addresses []string
	// Cluster the worker belongs to.
	Cluster string
	// WorkerID is the worker's stable id, unique across all clusters.
	WorkerID string
	// Capacity is the number of actions run at once (slots). Default 1.
	Capacity int
	// Labels are matched against actions' label selectors.
	Labels map[string]string
	// AgentVersion is sent in the hello, for operators. Default "leasehold-go-agent".
	AgentVersion string
	// Handler runs each granted action.
	Handler Handler
	// DialOptions are used for every connection, e.g. TLS credentials and a
	// per-RPC bearer token. Default: plaintext (grpc.WithInsecure), for loopback.
	DialOptions []grpc.DialOption
	// SelfFenceMargin is subtracted from the server's guarantee when computing
	// the local deadline, so the work stops before the server may hand it to
	// another worker: the time the work needs to stop. Default 500 ms.
	SelfFenceMargin time.Duration
	// InitialBackoff is the ceiling of the first reconnect delay; it doubles
	// after every attempt that got no welcome. Default 200 ms.
	InitialBackoff time.Duration
	// MaxBackoff bounds the reconnect delay. Whatever it is, the delay never
	// exceeds an eighth of the grace period of the last welcome (1 s before
	// any welcome). Default: that bound.
	MaxBackoff time.Duration
	// OnEvent observes what the agent does (see Event). It runs on the
	// agent's own goroutine, in order: it must return quickly and must not
	// call Close.
	OnEvent func(Event)
}

// Action is one granted action, as its Handler sees it.
type Action struct {
	// ID is the action's id.
	ID string
	// Epoch is the fencing epoch of this grant.
	Epoch uint64
	// Attempt is 1 for the first attempt, then increasing.
	Attempt uint32
	// Payload says what to run; never nil.
	Payload *structpb.Struct
	// RunID is the run the action belongs to, if any.
	RunID string
	// Checkpoint is the last checkpoint an earlier attempt reported, or nil.
	Checkpoint *structpb.Struct

	agent *Agent
	run   *run
}

// Lost says why the handler's context ended: nil while the lease holds.
func (a *Action) Lost() *LeaseLost { return a.run.lostReason() }

// StopRequested is closed when the server asks the action to stop gracefully
// and keep what it made (a revoke with reason COLLECT_OUTPUTS). The lease
// stays valid: save the outputs, then return normally; the result is
// reported as usual.
func (a *Action) StopRequested() <-chan struct{} { return a.run.stop }

// Progress reports a phase, optional details and optionally a checkpoint
// handed to the next attempt if this one is lost. It returns an error, and
// sends nothing, when the report breaks a server limit (which would end the
// stream); a report made while the agent is disconnected is dropped, like
// one after the lease is lost.
func (a *Action) Progress(phase string, details, checkpoint *structpb.Struct) error {
	details, err := cleanStruct(details)
	if err != nil {
		return fmt.Errorf("progress details break a server limit: %w", err)
	}
	checkpoint, err = cleanStruct(checkpoint)
	if err != nil {
		return fmt.Errorf("progress checkpoint breaks a server limit: %w", err)
	}
	phase = cleanText(phase, maxPhaseRunes)
	r := a.run
	a.agent.post(func() { a.agent.progress(r, phase, details, checkpoint) })
	return nil
}

// Failure is an error a Handler returns to fail its action with control
// over retries and structured details.
type Failure struct {
	// Message says what went wrong.
	Message string
	// Retryable lets the server retry the action under its retry policy.
	Retryable bool
	// Details are optional structured details (exit code, stderr tail, ...).
	Details *structpb.Struct
}

func (f *Failure) Error() string { return f.Message }

// LeaseLost says why a handler's context ended.
type LeaseLost struct {
	// Reason is one of expired, cancelled, superseded, rolled_back,
	// collect_outputs, drained (the server's revoke reasons), self_fenced or
	// closing.
	Reason string
	// Message says more, for people.
	Message string
}

func (l *LeaseLost) Error() string { return fmt.Sprintf("lease lost (%s): %s", l.Reason, l.Message) }

// gone says whether the lease is no longer the worker's to report on: after
// EXPIRED, SUPERSEDED or ROLLED_BACK it stops, reports nothing more about it
// and stops listing it (worker.proto, Revoke).
func (l *LeaseLost) gone() bool {
	return l != nil && (l.Reason == "expired" || l.Reason == "superseded" || l.Reason == "rolled_back")
}

// Lease is one (action, epoch): the fencing token of a grant.
type Lease struct {
	ActionID string
	Epoch    uint64
}

// Event is something the agent did, for logs and tests: one of Connected,
// Disconnected, Granted, Finished, Revoked, SelfFenced, Draining, TakenOver.
type Event interface{ isEvent() }

// Connected: a welcome answered the hello.
type Connected struct {
	SessionID string
	// SessionResumed is true when an existing session was resumed.
	SessionResumed bool
	// Address is the server address the stream went to.
	Address string
	// Resumed are held leases that continue with the same epoch.
	Resumed []Lease
	// Revoked are held leases that are no longer valid (their handlers stop).
	Revoked           []Lease
	HeartbeatInterval time.Duration
	GracePeriod       time.Duration
}

// Disconnected: the stream ended; the agent reconnects after RetryIn.
type Disconnected struct {
	Err     *rpcerr.Error
	RetryIn time.Duration
}

// Granted: the server granted an action. Waiting is true when the guarantee
// of the last heartbeat ack runs out too soon to start it (it starts once an
// ack brings a fresh one), or when every slot is taken by a handler still
// stopping after its lease ended (it starts once one returns).
type Granted struct {
	ActionID string
	Epoch    uint64
	Attempt  uint32
	Waiting  bool
}

// Outcome is how a lease ended from the worker's side.
type Outcome string

// Outcomes the agent reports.
const (
	Succeeded Outcome = "succeeded"
	Failed    Outcome = "failed"
	Released  Outcome = "released"
)

// Finished: the server answered the report that ended a lease. Accepted is
// false when it was fenced (another epoch owns the action), invalid or about
// an unknown action.
type Finished struct {
	ActionID string
	Epoch    uint64
	Outcome  Outcome
	Accepted bool
	Message  string
}

// Revoked: the server took an action away (Reason as in LeaseLost).
type Revoked struct {
	ActionID string
	Epoch    uint64
	Reason   string
	Message  string
}

// SelfFenced: the local deadline passed without a fresh heartbeat ack, so the
// handlers of ActionIDs were cancelled before the server could hand their
// work to another worker. They are reported released, never done. Silent is
// the time since the last ack arrived; DatabaseUnreachable, that this ack said
// its server could not reach its database (acks came, but could not extend
// the leases).
type SelfFenced struct {
	ActionIDs           []string
	Silent              time.Duration
	DatabaseUnreachable bool
}

// Draining: the server asks the worker to finish what it holds and take no
// more work (it stops granting); Deadline is zero when it waits forever. The
// agent stays connected and takes grants again if an operator ends the drain
// (ClusterService.UndrainWorker); no event says so: the next Granted does.
type Draining struct {
	Reason   string
	Deadline time.Time
}

// TakenOver: another process connected with this worker id and took the
// session over, or holds it and the server refused this agent's hello
// (WORKER_ID_IN_USE; worker ids must be unique). Every handler was cancelled
// (superseded) and every lease dropped (none is reported on or listed again:
// they are the other process's), and the agent connects again after RetryIn:
// at least a grace period after a takeover, leaving the session to the other
// process meanwhile; 1–2 s after a first refusal, doubling to 15–30 s.
type TakenOver struct {
	RetryIn time.Duration
}

func (Connected) isEvent()    {}
func (TakenOver) isEvent()    {}
func (Disconnected) isEvent() {}
func (Granted) isEvent()      {}
func (Finished) isEvent()     {}
func (Revoked) isEvent()      {}
func (SelfFenced) isEvent()   {}
func (Draining) isEvent()     {}

// Agent is a running agent. Close it to drain and say goodbye.
//
// Everything the agent knows is owned by one goroutine (the loop), which
// runs the functions posted to it one at a time: stream readers, handler
// goroutines and timers post, never touch state directly. Writes to the
// stream go through a per-stream writer goroutine, so the loop never blocks
// on the network.
type Agent struct {
	opts  Options
	inbox chan func()
	// loopDone is closed when the loop has stopped.
	loopDone chan struct{}
	// root is cancelled when the agent shuts down: the parent of every handler's context.
	root       context.Context
	cancelRoot context.CancelFunc
	closeOnce  sync.Once
	closeErr   error

	// Loop-owned from here on.
	rng     *rand.Rand
	running map[string]*run
	// superseded: handlers replaced in running by a newer grant of the same
	// action while they still stop. They take a slot until they return.
	superseded map[*run]struct{}
	// instanceID is Hello.instance_id: this agent's own random id, so that
	// a second process with the same worker id is refused.
	instanceID string
	current    *conn
	waiters    []waiter
	// closing: Close was called (no new work: StopGrants, and grants are given back).
	closing bool
	// goodbyeDue: handlers are done; say goodbye once every report is answered.
	goodbyeDue bool
	// goodbyeDone: a goodbye was sent and the server ended that stream.
	goodbyeDone bool
	stopped     bool

	addressIndex           int
	attemptsWithoutWelcome int
	refusals               int
	sessionID              string
	// grace of the last welcome (zero before any): bounds the reconnect backoff.
	grace time.Duration
	// heartbeatInterval of the last welcome: when the next ack is due.
	heartbeatInterval time.Duration
	// askedAt: when the last round of health checks started, on whichever
	// stream (see unreachable.go).
	askedAt time.Time
	// deadline is the local time after which held leases are no longer
	// guaranteed: the latest (send time of an acknowledged heartbeat +
	// its remaining - margin). Every ack is a lower bound of the session's
	// persisted deadline, which only grows, so the latest bound holds and a
	// stale ack processed late never shortens it. Kept across reconnections:
	// a new stream does not extend it. Zero until the first ack: a grant that
	// arrives before any guarantee waits for one instead of running unfenced.
	deadline time.Time
	lastAck  time.Time
	// lastAckUnreachable: the last heartbeat ack said its server could not
	// reach its database.
	lastAckUnreachable bool
	fenceTimer         *time.Timer
	reconnectTimer     *time.Timer
	nextReportID       uint64
}

type waiter struct {
	ctx  context.Context
	cond func() bool
	done chan struct{}
}

// Start validates opts and starts the agent; it connects in the background.
func Start(opts Options) (*Agent, error) {
	if len(opts.Addresses) == 0 {
		return nil, errors.New("agent: Addresses must name at least one server")
	}
	if opts.Cluster == "" || opts.WorkerID == "" {
		return nil, errors.New("agent: Cluster and WorkerID are required")
	}
	if opts.Handler == nil {
		return nil, errors.New("agent: Handler is required")
	}
	if opts.Capacity <= 0 {
		opts.Capacity = 1
	}
	if problem := helloProblem(opts); problem != "" {
		return nil, errors.New("agent: " + problem)
	}
	if opts.AgentVersion == "" {
		opts.AgentVersion = "leasehold-go-agent"
	}
	if opts.SelfFenceMargin <= 0 {
		opts.SelfFenceMargin = 500 * time.Millisecond
	}
	if opts.InitialBackoff <= 0 {
		opts.InitialBackoff = 200 * time.Millisecond
	}
	if opts.DialOptions == nil {
		opts.DialOptions = []grpc.DialOption{grpc.WithInsecure()}
	}
	root, cancel := context.WithCancel(context.Background())
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	a := &Agent{
		opts:         opts,
		inbox:        make(chan func(), 256),
		loopDone:     make(chan struct{}),
		root:         root,
		cancelRoot:   cancel,
		rng:          rng,
		running:      map[string]*run{},
		superseded:   map[*run]struct{}{},
		instanceID:   newInstanceID(),
		addressIndex: rng.Intn(len(opts.Addresses)),
		lastAck:      time.Now(),
	}
	go a.loop()
	a.post(a.connect)
	return a, nil
}

// newInstanceID returns 128 random bits in hex, from crypto/rand.
func newInstanceID() string {
	var b [16]byte
	if _, err := cryptorand.Read(b[:]); err != nil {
		// No system randomness: a time-seeded id still tells two processes apart.
		return fmt.Sprintf("t%x", time.Now().UnixNano())
	}
	return hex.EncodeToString(b[:])
}

func (a *Agent) loop() {
	defer close(a.loopDone)
	for !a.stopped {
		f := <-a.inbox
		f()
		a.tryGoodbye()
		a.checkWaiters()
	}
}

// post runs f on the loop; it is dropped once the loop has stopped.
func (a *Agent) post(f func()) {
	select {
	case a.inbox <- f:
	case <-a.loopDone:
	}
}

// waitFor blocks until cond (evaluated on the loop after every step) holds,
// ctx ends or the loop stops; it reports whether cond held.
func (a *Agent) waitFor(ctx context.Context, cond func() bool) bool {
	done := make(chan struct{})
	a.post(func() {
		if cond() {
			close(done)
			return
		}
		a.waiters = append(a.waiters, waiter{ctx: ctx, cond: cond, done: done})
	})
	select {
	case <-done:
		return true
	case <-ctx.Done():
		return false
	case <-a.loopDone:
		return false
	}
}

func (a *Agent) checkWaiters() {
	keep := a.waiters[:0]
	for _, w := range a.waiters {
		switch {
		case w.ctx.Err() != nil:
		case w.cond():
			close(w.done)
		default:
			keep = append(keep, w)
		}
	}
	a.waiters = keep
}

func (a *Agent) emit(e Event) {
	if a.opts.OnEvent != nil {
		a.opts.OnEvent(e)
	}
}

// Close drains the agent: it takes no more work, waits until ctx ends for
// the running handlers and reports their results, cancels the handlers still
// running then (and releases their leases, even if a handler ignores its
// context for 5 s more), waits up to 5 s for the server's answers, says
// goodbye (which releases whatever is left at once) and closes the stream.
//
// No more work: Close first asks the server for no more grants (StopGrants,
// if the welcome said the server takes it), and gives back at once the grants
// that wait for a guarantee and any that arrive after, so that they run on
// other workers while the handlers finish.
//
// It returns an error when the server could not be told (no goodbye went
// through): the leases still held then expire after the grace period.
// Calling Close again returns the first call's result.
func (a *Agent) Close(ctx context.Context) error {
	a.closeOnce.Do(func() { a.closeErr = a.close(ctx) })
	return a.closeErr
}

func (a *Agent) close(ctx context.Context) error {
	a.post(func() {
		a.closing = true
		// StopGrants first: a report the server read before it would have the slot it frees
		// filled again.
		if a.current != nil {
			a.stopGrants(a.current)
		}
		// Grants still waiting for a guarantee are given back without running.
		for _, r := range a.running {
			if r.waiting {
				a.abort(r, &LeaseLost{Reason: "closing", Message: "the agent is shutting down"})
			}
		}
	})
	a.waitFor(ctx, a.handlersDone)
	a.post(func() {
		for _, r := range a.running {
			if r.active && r.report == nil {
				a.abort(r, &LeaseLost{Reason: "closing", Message: "the agent is shutting down"})
			}
		}
	})
	bounded(5*time.Second, func(c context.Context) { a.waitFor(c, a.handlersDone) })
	a.post(func() {
		// Handlers that ignore their context do not hold the agent hostage.
		for _, r := range a.running {
			if r.report == nil {
				r.abandoned = true
				if r.gone {
					// A lease the server ended, or another process holds, is not this agent's to release.
					a.forget(r)
					continue
				}
				a.settle(r, &report{outcome: Released, reason: "the agent shut down while the handler ignored its context"})
			}
		}
		a.goodbyeDue = true
	})
	said := false
	bounded(5*time.Second, func(c context.Context) { said = a.waitFor(c, func() bool { return a.goodbyeDone }) })
	a.post(a.shutdown)
	<-a.loopDone
	if !said {
		return errors.New("agent: closed without a goodbye the server answered; leases still held expire after the grace period")
	}
	return nil
}

// stopGrants asks the server, once, for no more grants on c while the agent
// closes (StopGrants): the slots that free while the running handlers finish
// are not filled again, so the work queued meanwhile goes to other workers
// instead of being granted here and given back. Only to a server whose
// welcome set accepts_stop_grants (an older one answers it INVALID and keeps
// granting); a stream whose hello set stop_grants needs none. The grants that
// do not run are given back at once either way (see close and grant).
func (a *Agent) stopGrants(c *conn) {
	if !a.closing || c.ended || !c.welcomed || c.saidGoodbye || c.grantsStopped || !c.takesStopGrants {
		return
	}
	c.out.push(&leaseholdv1.ConnectRequest{Message: &leaseholdv1.ConnectRequest_StopGrants{
		StopGrants: &leaseholdv1.StopGrants{Reason: "agent shutting down"}}})
	c.grantsStopped = true
}

func bounded(d time.Duration, f func(context.Context)) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	f(ctx)
}

// handlersDone: no handler is running (abandoned ones aside).
func (a *Agent) handlersDone() bool {
	for _, r := range a.running {
		if r.active && r.report == nil {
			return false
		}
	}
	// Handlers a newer grant of their action superseded are still this agent's work.
	return a.activeSuperseded() == 0
}

// tryGoodbye says goodbye once Close is past its handlers and nothing is
// left to report: reports queued before it go first, and the goodbye
// releases whatever is left.
func (a *Agent) tryGoodbye() {
	c := a.current
	if !a.goodbyeDue || c == nil || !c.welcomed || c.ended || c.saidGoodbye || len(a.running) > 0 {
		return
	}
	c.out.push(&leaseholdv1.ConnectRequest{Message: &leaseholdv1.ConnectRequest_Goodbye{
		Goodbye: &leaseholdv1.Goodbye{Reason: "agent shutting down"}}})
	c.out.closeSend()
	c.saidGoodbye = true
}

func (a *Agent) shutdown() {
	a.stopped = true
	if a.reconnectTimer != nil {
		a.reconnectTimer.Stop()
	}
	if a.fenceTimer != nil {
		a.fenceTimer.Stop()
	}
	if a.current != nil {
		a.current.cancel()
	}
	a.cancelRoot()
}

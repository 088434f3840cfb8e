package agent

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"sync"
	"time"

	leaseholdv1 "leasehold.dev/client/gen/leasehold/v1"
	"leasehold.dev/client/rpcerr"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/structpb"
)

// run is one grant the worker holds: from the grant until the server
// answers its final report (or the lease is gone). Loop-owned, except lost.
type run struct {
	lease   Lease
	action  *Action
	ctx     context.Context
	cancel  context.CancelFunc
	stop    chan struct{}
	stopped bool
	// waiting: granted, not started until an ack brings a fresh guarantee.
	waiting bool
	// active: the handler goroutine runs (until its result reaches the loop).
	active bool
	// report is what to (re)send until the server answers; set when the handler settles.
	report *report
	// abandoned: released at Close while the handler ignored its context; its result is ignored.
	abandoned bool
	// gone: the server ended this lease (EXPIRED, SUPERSEDED, ROLLED_BACK, or revoked in a
	// welcome), whatever stopped the handler first: its slot is free there, its outcome not ours.
	gone bool

	mu   sync.Mutex
	lost *LeaseLost
}

func (r *run) lostReason() *LeaseLost {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lost
}

// report is how a grant ended, as the worker tells the server.
type report struct {
	outcome   Outcome
	output    *structpb.Struct
	message   string
	retryable bool
	details   *structpb.Struct
	reason    string
	// refused: sent in place of a completion the server refused as INVALID
	// (never replaced again).
	refused bool
	// selfFenced: a release made on the self-fence (ReleaseReport.self_fenced).
	selfFenced bool
}

var revokeReasons = map[leaseholdv1.RevokeReason]string{
	leaseholdv1.RevokeReason_REVOKE_REASON_EXPIRED:         "expired",
	leaseholdv1.RevokeReason_REVOKE_REASON_CANCELLED:       "cancelled",
	leaseholdv1.RevokeReason_REVOKE_REASON_SUPERSEDED:      "superseded",
	leaseholdv1.RevokeReason_REVOKE_REASON_ROLLED_BACK:     "rolled_back",
	leaseholdv1.RevokeReason_REVOKE_REASON_COLLECT_OUTPUTS: "collect_outputs",
	leaseholdv1.RevokeReason_REVOKE_REASON_DRAINED:         "drained",
}

// connect opens a stream to the address chosen when the last one ended (a
// random one at the start) with a hello that lists every lease still held,
// so that they resume.
func (a *Agent) connect() {
	if a.stopped {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	index := a.addressIndex % len(a.opts.Addresses)
	c := &conn{
		address: a.opts.Addresses[index],
		index:   index,
		ctx:     ctx,
		cancel:  cancel,
		out:     newOutbox(),
		sent:    map[uint64]time.Time{},
		pending: map[uint64]*run{},
		// A stream opened while closing takes no work from its start (worker.proto, Hello).
		helloStoppedGrants: a.closing,
		probeEvery:         a.probeEvery(),
	}
	a.current = c
	c.out.push(&leaseholdv1.ConnectRequest{Message: &leaseholdv1.ConnectRequest_Hello{Hello: &leaseholdv1.Hello{
		WorkerId:       a.opts.WorkerID,
		Cluster:        a.opts.Cluster,
		Capacity:       uint32(a.opts.Capacity),
		Labels:         a.opts.Labels,
		HeldLeases:     a.heldLeases(),
		AgentVersion:   a.opts.AgentVersion,
		InstanceId:     a.instanceID,
		AcceptsBatches: true,
		StopGrants:     c.helloStoppedGrants,
	}}})
	go a.dial(c)
}

// heldLeases lists what the worker still holds: running, finished but not
// answered, granted and waiting. Not the leases the server took back.
func (a *Agent) heldLeases() []*leaseholdv1.HeldLease {
	held := make([]*leaseholdv1.HeldLease, 0, len(a.running))
	for _, r := range a.running {
		// r.gone: the server ended it, whatever stopped the handler first (a self-fence, then a
		// takeover): listed, it would be resumed with nobody to report on it.
		if !r.gone && !r.lostReason().gone() {
			held = append(held, &leaseholdv1.HeldLease{ActionId: r.lease.ActionID, Epoch: r.lease.Epoch})
		}
	}
	return held
}

// ended handles the end of a stream: reconnect after a jittered delay to
// another address, picked at random (see anotherAddress), unless it ended on
// our goodbye or the agent stopped.
func (a *Agent) ended(c *conn, err error) {
	if c.ended {
		return
	}
	c.ended = true
	c.cancel()
	if !c.welcomed {
		a.attemptsWithoutWelcome++
	}
	if c.saidGoodbye {
		a.goodbyeDone = true
	}
	if a.stopped || c.saidGoodbye {
		return
	}
	// The fence timer keeps running: the deadline from the last ack still applies.
	a.addressIndex = anotherAddress(a.opts.Addresses, c.index, a.rng.Intn)
	e := rpcerr.From(err)
	if e == nil {
		e = rpcerr.From(fmt.Errorf("the server ended the stream"))
	}
	takenOver := e.Code == codes.Aborted && e.Reason == "SESSION_TAKEN_OVER"
	// A hello refused because another process holds the session changed nothing there: try
	// again at the pace of refused credentials, soon at first (the other may be a predecessor
	// whose lost stream the server has not yet marked), then less and less often.
	inUse := e.Code == codes.AlreadyExists && e.Reason == "WORKER_ID_IN_USE"
	var delay time.Duration
	if e.Code == codes.Unauthenticated || e.Code == codes.PermissionDenied || inUse {
		a.refusals++
		delay = refusedDelay(a.rng, a.refusals)
	} else {
		a.refusals = 0
		delay = jitter(a.rng, reconnectCeiling(a.attemptsWithoutWelcome, a.opts.InitialBackoff, a.opts.MaxBackoff, a.grace))
	}
	if takenOver || inUse {
		// This agent never opens a second stream, so another process connected with this
		// worker id and took the session, its leases and its grants (or holds it, and this
		// agent's hello was refused): stop every handler at once and drop every lease, reports
		// included (worker.proto). After a takeover, let that process keep the session for a
		// grace period before trying again.
		grace := a.grace
		if grace <= 0 {
			grace = 10 * time.Second
		}
		if least := grace + time.Duration(a.rng.Int63n(int64(grace))); takenOver && delay < least {
			delay = least
		}
		a.dropAll(LeaseLost{Reason: "superseded",
			Message: "another process connected as worker " + a.opts.WorkerID + " and took over"}, false)
		a.emit(TakenOver{RetryIn: delay})
	}
	if e.Code == codes.Aborted && e.Reason == "SESSION_REAPED" {
		a.dropAll(LeaseLost{Reason: "expired",
			Message: "the server reaped this agent's session: its deadline passed unheard"}, true)
	}
	a.emit(Disconnected{Err: e, RetryIn: delay})
	a.reconnectTimer = time.AfterFunc(delay, func() { a.post(a.connect) })
}

// dropAll drops every lease at once, as worker.proto asks of a worker whose
// stream ended ABORTED, reason SESSION_REAPED (its leases expired and may run
// elsewhere already), or that another process holds the session of
// (SESSION_TAKEN_OVER, WORKER_ID_IN_USE: the leases are that process's).
// Running handlers are cancelled with lost (each keeps its slot here until it
// returns, as after a revoke, and reports nothing when it does), and reports
// not answered yet (a self-fence's release, a completion) are dropped: sent
// on the next stream, they could only be fenced, or would end the other
// process's lease. None of them is listed in a later hello or heartbeat. With
// revokedEvents, a Revoked event tells of each handler cancelled here that the
// server had not ended already (a takeover has its own event, TakenOver).
func (a *Agent) dropAll(lost LeaseLost, revokedEvents bool) {
	for _, r := range a.running {
		wasGone := r.gone
		r.gone = true
		if r.report != nil {
			a.forget(r)
			continue
		}
		if revokedEvents && !wasGone {
			a.emit(Revoked{ActionID: r.lease.ActionID, Epoch: r.lease.Epoch, Reason: lost.Reason, Message: lost.Message})
		}
		l := lost
		a.abort(r, &l)
	}
}

// receive handles one server message; the messages of a batch one by one, in order.
func (a *Agent) receive(c *conn, m *leaseholdv1.ConnectResponse) {
	if c.ended {
		return
	}
	if b := m.GetBatch(); b != nil {
		for _, inner := range b.GetMessages() {
			if inner.GetBatch() == nil && inner.GetWelcome() == nil {
				a.receive(c, inner)
			}
		}
		return
	}
	switch {
	case m.GetWelcome() != nil:
		a.welcome(c, m.GetWelcome())
	case m.GetHeartbeatAck() != nil:
		a.heartbeatAck(c, m.GetHeartbeatAck())
	case m.GetGrant() != nil:
		a.grant(c, m.GetGrant())
	case m.GetRevoke() != nil:
		a.revoke(m.GetRevoke())
	case m.GetReportResult() != nil:
		a.reportResult(c, m.GetReportResult())
	case m.GetDrain() != nil:
		d := m.GetDrain()
		var deadline time.Time
		if d.GetDeadline() != nil {
			deadline = d.GetDeadline().AsTime()
		}
		a.emit(Draining{Reason: d.GetReason(), Deadline: deadline})
	}
}

func (a *Agent) welcome(c *conn, w *leaseholdv1.Welcome) {
	c.welcomed = true
	c.out.allowBatches(w.GetAcceptsBatches())
	c.takesStopGrants = w.GetAcceptsStopGrants()
	// A server that ignores Hello.stop_grants (an older one) leaves it false: it keeps granting.
	c.grantsStopped = c.helloStoppedGrants && c.takesStopGrants
	// Closing since the hello went out: asked now, ahead of the reports sent again below.
	a.stopGrants(c)
	a.attemptsWithoutWelcome = 0
	if w.GetGracePeriod() != nil {
		a.grace = w.GetGracePeriod().AsDuration()
	}
	a.sessionID = w.GetSessionId()
	for _, l := range w.GetRevoked() {
		r := a.running[l.GetActionId()]
		if r == nil || r.lease.Epoch != l.GetEpoch() {
			continue
		}
		// Finished here already: the report is sent again below. If the server
		// applied it before the old stream broke, it accepts the repeat;
		// otherwise it is fenced. Either way the agent learns which.
		if r.report != nil {
			continue
		}
		r.gone = true
		a.abort(r, &LeaseLost{Reason: "superseded", Message: "the server revoked this lease when the agent reconnected"})
	}
	a.heartbeatInterval = defaultHeartbeat
	if w.GetHeartbeatInterval() != nil {
		a.heartbeatInterval = w.GetHeartbeatInterval().AsDuration()
	}
	a.emit(Connected{
		SessionID:         w.GetSessionId(),
		SessionResumed:    w.GetSessionResumed(),
		Address:           c.address,
		Resumed:           leases(w.GetResumed()),
		Revoked:           leases(w.GetRevoked()),
		HeartbeatInterval: a.heartbeatInterval,
		GracePeriod:       a.grace,
	})
	// The first heartbeat goes out at once: its ack renews the guarantee that
	// may have run low while the stream was down.
	a.beat(c)
	go func(every time.Duration) {
		ticker := time.NewTicker(every)
		defer ticker.Stop()
		for {
			select {
			case <-ticker.C:
				a.post(func() { a.beat(c) })
			case <-c.ctx.Done():
				return
			}
		}
	}(a.heartbeatInterval)
	// Reports the previous stream could not get answered.
	for _, r := range a.running {
		if r.report != nil {
			a.sendReport(c, r)
		}
	}
}

func leases(held []*leaseholdv1.HeldLease) []Lease {
	out := make([]Lease, 0, len(held))
	for _, l := range held {
		out = append(out, Lease{l.GetActionId(), l.GetEpoch()})
	}
	return out
}

// beat sends a heartbeat listing every held lease, and notes when it left.
func (a *Agent) beat(c *conn) {
	if c.ended || !c.welcomed || c.saidGoodbye {
		return
	}
	if a.unanswered(c) > 0 {
		a.leaveIfUnanswered(c)
		return
	}
	c.sequence++
	c.sent[c.sequence] = time.Now()
	c.out.push(&leaseholdv1.ConnectRequest{Message: &leaseholdv1.ConnectRequest_Heartbeat{Heartbeat: &leaseholdv1.Heartbeat{
		Sequence:   c.sequence,
		HeldLeases: a.heldLeases(),
	}}})
	// Looked at when this heartbeat has waited the bound, not at the next beat: that came half
	// an interval late, and with a grace of three intervals the leases with it.
	time.AfterFunc(a.heartbeatInterval*3/2+time.Millisecond, func() {
		a.post(func() { a.leaveIfUnanswered(c) })
	})
}

// leaveIfUnanswered leaves c once its oldest heartbeat is unanswered for 1.5
// intervals. A server that stopped answering (hung, frozen, or a connection
// dead one way) never ends the stream; leaving it while the session and its
// leases can still be resumed through the next address saves them. Looked at
// again a moment later: after a pause of this process, the answer may be
// waiting to be read.
func (a *Agent) leaveIfUnanswered(c *conn) {
	if c.ended || a.unanswered(c) == 0 {
		return
	}
	time.AfterFunc(200*time.Millisecond, func() {
		a.post(func() {
			if silent := a.unanswered(c); silent > 0 && !c.ended {
				a.ended(c, fmt.Errorf("the server answered no heartbeat for %v", silent.Round(time.Millisecond)))
			}
		})
	})
}

// unanswered is how long the oldest heartbeat of c has gone unanswered, when
// that is over 1.5 heartbeat intervals; zero otherwise.
func (a *Agent) unanswered(c *conn) time.Duration {
	var oldest time.Time
	for _, at := range c.sent {
		if oldest.IsZero() || at.Before(oldest) {
			oldest = at
		}
	}
	if silent := time.Since(oldest); !oldest.IsZero() && silent > a.heartbeatInterval*3/2 {
		return silent
	}
	return 0
}

// heartbeatAck moves the self-fence deadline: local send time of the
// acknowledged heartbeat + remaining - margin, never earlier than before. An
// ack that says the server cannot reach its database may send the agent to
// another address once the acks of c have said so for a heartbeat interval
// (see unreachable.go).
func (a *Agent) heartbeatAck(c *conn, ack *leaseholdv1.HeartbeatAck) {
	if ack.GetDatabaseUnreachable() {
		if c.unreachableSince.IsZero() {
			c.unreachableSince = time.Now()
		}
		defer a.leaveIfUnreachable(c)
	} else {
		c.unreachableSince = time.Time{}
	}
	sentAt, ok := c.sent[ack.GetSequence()]
	if !ok && !c.lastAckedAt.IsZero() && c.lastAcked == ack.GetSequence() {
		sentAt, ok = c.lastAckedAt, true
	}
	if !ok {
		return
	}
	for seq := range c.sent {
		if seq <= ack.GetSequence() {
			delete(c.sent, seq)
		}
	}
	c.lastAcked, c.lastAckedAt = ack.GetSequence(), sentAt
	a.lastAck = time.Now()
	a.lastAckUnreachable = ack.GetDatabaseUnreachable()
	candidate := sentAt.Add(ack.GetRemaining().AsDuration() - a.opts.SelfFenceMargin)
	if candidate.After(a.deadline) {
		a.deadline = candidate
	}
	a.armFence()
	a.startWaiting()
}

// guaranteed: the held leases are guaranteed now.
func (a *Agent) guaranteed() bool { return !a.deadline.IsZero() && time.Now().Before(a.deadline) }

// mayStart: the guarantee outlasts the next heartbeat, so a healthy stream
// renews it before the fence could stop new work. Right after a server
// thaws or restarts, acks can carry a guarantee that is nearly spent;
// starting then would only fence the work a moment later.
func (a *Agent) mayStart() bool {
	return !a.deadline.IsZero() && time.Now().Add(a.heartbeatInterval).Before(a.deadline)
}

func (a *Agent) armFence() {
	if a.fenceTimer != nil {
		a.fenceTimer.Stop()
	}
	if a.deadline.IsZero() || a.stopped {
		return
	}
	a.fenceTimer = time.AfterFunc(time.Until(a.deadline), func() { a.post(a.selfFence) })
}

// selfFence runs when the local deadline passes: it cancels every handler
// still running. It is not a state the agent stays in: the next ack re-arms
// it, and grants that come before that wait for one.
func (a *Agent) selfFence() {
	if a.stopped {
		return
	}
	if a.guaranteed() {
		a.armFence()
		return
	}
	// Acks that kept coming but counted down: the server was heard, its database was not.
	why := "no heartbeat ack from the server"
	if a.lastAckUnreachable {
		why = "the server could not reach its database to extend the lease"
	}
	var ids []string
	for _, r := range a.running {
		if r.active && r.report == nil && r.lostReason() == nil {
			a.abort(r, &LeaseLost{Reason: "self_fenced", Message: why + " before the lease's guaranteed time ran out; " +
				"stopping so the server can hand the action to another worker"})
			ids = append(ids, r.lease.ActionID)
		}
	}
	if len(ids) > 0 {
		a.emit(SelfFenced{ActionIDs: ids, Silent: time.Since(a.lastAck), DatabaseUnreachable: a.lastAckUnreachable})
	}
}

func (a *Agent) grant(c *conn, g *leaseholdv1.Grant) {
	lease := Lease{g.GetActionId(), g.GetEpoch()}
	if existing := a.running[lease.ActionID]; existing != nil {
		// A grant sent again after a reconnect; unless the agent stopped it for a takeover and
		// left it out of its hello: then it runs anew, once the old handler has stopped.
		if existing.lease.Epoch == lease.Epoch && !existing.gone {
			return
		}
		a.abort(existing, &LeaseLost{Reason: "superseded", Message: "a newer grant of this action arrived"})
		if existing.active {
			// Still stopping: the new grant must not run beside it, on the same action.
			a.superseded[existing] = struct{}{}
		}
	}
	ctx, cancel := context.WithCancel(a.root)
	r := &run{lease: lease, ctx: ctx, cancel: cancel, stop: make(chan struct{})}
	payload := g.GetPayload()
	if payload == nil {
		payload = &structpb.Struct{Fields: map[string]*structpb.Value{}}
	}
	r.action = &Action{ID: lease.ActionID, Epoch: lease.Epoch, Attempt: g.GetAttempt(), Payload: payload,
		RunID: g.GetRunId(), Checkpoint: g.GetCheckpoint(), agent: a, run: r}
	// held: the grants the server counts against this worker. A run whose lease the server
	// ended (gone) is not one: the server freed its slot at once, and may grant it again while
	// the handler still stops. That grant waits for the handler (active counts it) instead of
	// going back, which would bring it straight back, over and over (worker.proto, Revoke).
	held, active := 0, a.activeSuperseded()
	for _, other := range a.running {
		if other.lease.ActionID == lease.ActionID {
			continue
		}
		if other.report == nil && !other.gone {
			held++
		}
		if other.active {
			active++
		}
	}
	a.running[lease.ActionID] = r
	a.nextReportID++
	c.out.push(&leaseholdv1.ConnectRequest{Message: &leaseholdv1.ConnectRequest_GrantAck{GrantAck: &leaseholdv1.GrantAck{
		ReportId: a.nextReportID, ActionId: lease.ActionID, Epoch: lease.Epoch}}})
	waiting := !a.closing && held < a.opts.Capacity &&
		(!a.mayStart() || active >= a.opts.Capacity || a.stillStopping(lease.ActionID))
	a.emit(Granted{ActionID: lease.ActionID, Epoch: lease.Epoch, Attempt: g.GetAttempt(), Waiting: waiting})
	switch {
	case a.closing || held >= a.opts.Capacity:
		// Closing (a grant the server sent before it read StopGrants, or any grant from a
		// server that does not take it), or more grants than slots (the server should never
		// do that): give it back, so that it runs elsewhere now.
		reason := "no free slot on this agent"
		if a.closing {
			reason = "the agent is shutting down"
		}
		a.settle(r, &report{outcome: Released, reason: reason})
	case waiting:
		// The guarantee of the last ack has run out or is about to (or none came
		// yet): the server may already count this session as silent. Running now
		// would run unfenced or only until the fence; giving it back would drop a
		// grant the server may still stand behind. So it waits, listed in
		// heartbeats, for an ack with a fresh guarantee, asked for right away. Or every
		// slot is taken by a handler still stopping after its lease ended: it waits for one.
		r.waiting = true
		if !a.mayStart() {
			a.beat(c)
		}
	default:
		a.start(r)
	}
}

// startWaiting starts the grants that waited for a guarantee, once there is one, or for a slot
// that a handler still stopping after its lease ended held, as long as slots are free.
func (a *Agent) startWaiting() {
	if !a.mayStart() || a.closing {
		return
	}
	active := a.activeSuperseded()
	for _, r := range a.running {
		if r.active {
			active++
		}
	}
	for _, r := range a.running {
		if active >= a.opts.Capacity {
			return
		}
		if r.waiting && r.lostReason() == nil && !a.stillStopping(r.lease.ActionID) {
			a.start(r)
			active++
		}
	}
}

// stillStopping says whether an earlier grant's handler of this action has not returned: a new
// grant of the same action never runs beside it, whatever slots are free.
func (a *Agent) stillStopping(actionID string) bool {
	for r := range a.superseded {
		if r.lease.ActionID == actionID && r.active {
			return true
		}
	}
	return false
}

// activeSuperseded counts the handlers a newer grant of their action replaced that have not
// returned yet: each still takes a slot.
func (a *Agent) activeSuperseded() int {
	n := 0
	for r := range a.superseded {
		if r.active {
			n++
		}
	}
	return n
}

func (a *Agent) start(r *run) {
	r.waiting = false
	r.active = true
	// The handler always starts under a live guarantee, covered by the fence timer.
	a.armFence()
	go func() {
		output, err := invoke(a.opts.Handler, r)
		a.post(func() { a.handlerReturned(r, output, err) })
	}()
}

// invoke runs the handler; a panic fails the action (retryably) instead of the process.
func invoke(h Handler, r *run) (output *structpb.Struct, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("handler panicked: %v\n%s", p, debug.Stack())
		}
	}()
	return h(r.ctx, r.action)
}

func (a *Agent) handlerReturned(r *run, output *structpb.Struct, err error) {
	// Finished after the deadline but before the fence's timer ran (a paused process): as if
	// the fence had come first, the lease is given back, not completed.
	if !a.guaranteed() {
		a.selfFence()
	}
	r.active = false
	delete(a.superseded, r)
	// Its slot is free: a grant that waited for it starts now (see onGrant).
	defer a.startWaiting()
	if r.abandoned || r.report != nil {
		return
	}
	lost := r.lostReason()
	r.cancel() // the handler is done: release its context
	if r.gone {
		a.settle(r, nil) // the lease is gone: its outcome is no longer ours to report
		return
	}
	if lost != nil {
		a.settle(r, afterLoss(lost))
		return
	}
	if err == nil {
		a.settle(r, &report{outcome: Succeeded, output: output})
		return
	}
	var f *Failure
	if errors.As(err, &f) {
		a.settle(r, &report{outcome: Failed, message: f.Message, retryable: f.Retryable, details: f.Details})
		return
	}
	a.settle(r, &report{outcome: Failed, message: err.Error(), retryable: true})
}

// afterLoss is what to tell the server about a grant whose handler was
// cancelled: nothing when the lease is gone (expired, superseded, rolled
// back), a release otherwise (cancel, drain, self-fence, close).
func afterLoss(l *LeaseLost) *report {
	if l.gone() {
		return nil
	}
	return &report{outcome: Released, reason: l.Message, selfFenced: l.Reason == "self_fenced"}
}

// abort cancels a grant's handler (or gives back one still waiting).
func (a *Agent) abort(r *run, l *LeaseLost) {
	r.mu.Lock()
	if r.lost != nil {
		r.mu.Unlock()
		return
	}
	r.lost = l
	r.mu.Unlock()
	r.cancel()
	if r.waiting {
		r.waiting = false
		a.settle(r, afterLoss(l))
	} else if !r.active && r.report == nil {
		a.settle(r, afterLoss(l))
	}
}

// settle records how a grant ended and reports it; a nil report means the
// lease is no longer ours: it is forgotten without a word.
func (a *Agent) settle(r *run, rep *report) {
	if rep == nil {
		a.forget(r)
		return
	}
	r.report = fitted(rep)
	if a.current != nil {
		a.sendReport(a.current, r)
	}
}

// fitted makes a report sendable: text cleaned and cut, and a result that
// breaks a server limit turned into a non-retryable failure that says so,
// since the server would end the stream on it.
func fitted(rep *report) *report {
	rep.message = cleanText(rep.message, maxFailureRunes)
	rep.reason = cleanText(rep.reason, maxReasonRunes)
	output, err := cleanStruct(rep.output)
	if err == nil {
		rep.output = output
		rep.details, err = cleanStruct(rep.details)
	}
	if err != nil {
		what := "output"
		if rep.outcome == Failed {
			what = "failure details"
		}
		return &report{outcome: Failed, retryable: false,
			message: cleanText(fmt.Sprintf("the handler's %s breaks a server limit, so it was not reported: %v", what, err), maxFailureRunes)}
	}
	return rep
}

// forget drops r, if it is still the action's current grant.
func (a *Agent) forget(r *run) {
	if a.running[r.lease.ActionID] == r {
		delete(a.running, r.lease.ActionID)
	}
	r.cancel()
}

func (a *Agent) sendReport(c *conn, r *run) {
	if r.report == nil || c.ended || !c.welcomed {
		return
	}
	a.nextReportID++
	id := a.nextReportID
	c.pending[id] = r
	c.out.push(reportMessage(id, r.lease, r.report))
}

func reportMessage(id uint64, l Lease, rep *report) *leaseholdv1.ConnectRequest {
	switch rep.outcome {
	case Released:
		return &leaseholdv1.ConnectRequest{Message: &leaseholdv1.ConnectRequest_Release{Release: &leaseholdv1.ReleaseReport{
			ReportId: id, ActionId: l.ActionID, Epoch: l.Epoch, Reason: rep.reason, SelfFenced: rep.selfFenced}}}
	case Succeeded:
		return &leaseholdv1.ConnectRequest{Message: &leaseholdv1.ConnectRequest_Completion{Completion: &leaseholdv1.CompletionReport{
			ReportId: id, ActionId: l.ActionID, Epoch: l.Epoch,
			Outcome: &leaseholdv1.CompletionReport_Succeeded{Succeeded: &leaseholdv1.ActionSuccess{Output: rep.output}}}}}
	default:
		return &leaseholdv1.ConnectRequest{Message: &leaseholdv1.ConnectRequest_Completion{Completion: &leaseholdv1.CompletionReport{
			ReportId: id, ActionId: l.ActionID, Epoch: l.Epoch,
			Outcome: &leaseholdv1.CompletionReport_Failed{Failed: &leaseholdv1.ActionFailure{
				Message: rep.message, Retryable: rep.retryable, Details: rep.details}}}}}
	}
}

func (a *Agent) progress(r *run, phase string, details, checkpoint *structpb.Struct) {
	c := a.current
	if c == nil || c.ended || !c.welcomed || a.running[r.lease.ActionID] != r || r.report != nil || r.lostReason() != nil {
		return
	}
	a.nextReportID++
	c.out.push(&leaseholdv1.ConnectRequest{Message: &leaseholdv1.ConnectRequest_Progress{Progress: &leaseholdv1.ProgressReport{
		ReportId: a.nextReportID, ActionId: r.lease.ActionID, Epoch: r.lease.Epoch,
		Phase: phase, Details: details, Checkpoint: checkpoint}}})
}

func (a *Agent) revoke(rv *leaseholdv1.Revoke) {
	r := a.running[rv.GetActionId()]
	if r == nil || r.lease.Epoch != rv.GetEpoch() {
		return
	}
	reason, ok := revokeReasons[rv.GetReason()]
	if !ok {
		reason = "revoked"
	}
	message := rv.GetMessage()
	if message == "" {
		message = "lease revoked (" + reason + ")"
	}
	a.emit(Revoked{ActionID: r.lease.ActionID, Epoch: r.lease.Epoch, Reason: reason, Message: message})
	lost := &LeaseLost{Reason: reason, Message: message}
	if lost.gone() {
		// Even when something else stopped the handler first (a self-fence, a cancel).
		r.gone = true
	}
	switch {
	case reason == "collect_outputs":
		// Not a loss: the lease stays valid while the handler saves its outputs.
		if !r.stopped {
			r.stopped = true
			close(r.stop)
		}
	case r.report == nil:
		a.abort(r, lost)
	case lost.gone():
		// Finished, but the lease is gone: its report is no longer ours to make.
		a.forget(r)
	}
	// Otherwise (cancelled, drained) the report already on its way lets go.
}

func (a *Agent) reportResult(c *conn, rr *leaseholdv1.ReportResult) {
	r, ok := c.pending[rr.GetReportId()]
	if !ok {
		return // a grant ack's answer, or a report a reconnect sent again
	}
	delete(c.pending, rr.GetReportId())
	if rr.GetRejectReason() == leaseholdv1.RejectReason_REJECT_REASON_UNAVAILABLE {
		// The server could not apply it now: send it again shortly, unless a
		// reconnect sent it again already or a newer grant replaced it.
		time.AfterFunc(500*time.Millisecond, func() {
			a.post(func() {
				if a.current == c && a.running[r.lease.ActionID] == r && !c.isPending(r) {
					a.sendReport(c, r)
				}
			})
		})
		return
	}
	if rr.GetRejectReason() == leaseholdv1.RejectReason_REJECT_REASON_INVALID && r.report != nil &&
		r.report.outcome != Released && !r.report.refused && a.running[r.lease.ActionID] == r {
		// The server's limits differ from the ones this agent fitted the report
		// to (another version): the lease is still held, and the same report
		// would be refused again. The action fails with the server's reason
		// instead; nothing re-runs it.
		what := "failure report"
		if r.report.outcome == Succeeded {
			what = "output"
		}
		r.report = &report{outcome: Failed, refused: true,
			message: cleanText(fmt.Sprintf("the server refused this action's %s: %s", what, rr.GetMessage()), maxFailureRunes)}
		a.sendReport(c, r)
		return
	}
	// Accepted, fenced, invalid or not found: nothing more to say about this grant.
	if a.running[r.lease.ActionID] != r {
		return
	}
	a.forget(r)
	a.emit(Finished{ActionID: r.lease.ActionID, Epoch: r.lease.Epoch, Outcome: r.report.outcome,
		Accepted: rr.GetAccepted(), Message: rr.GetMessage()})
}

func (c *conn) isPending(r *run) bool {
	for _, p := range c.pending {
		if p == r {
			return true
		}
	}
	return false
}

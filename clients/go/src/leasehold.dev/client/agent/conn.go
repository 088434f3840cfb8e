package agent

import (
	"context"
	"io"
	"sync"
	"time"

	leaseholdv1 "leasehold.dev/client/gen/leasehold/v1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/proto"
)

// conn is one Connect stream. Its fields are loop-owned, except out (locked)
// and the context.
type conn struct {
	address string
	// index of address in Options.Addresses.
	index  int
	ctx    context.Context
	cancel context.CancelFunc
	out    *outbox
	// welcomed: the welcome arrived; reports and heartbeats may go out.
	welcomed    bool
	ended       bool
	saidGoodbye bool
	sequence    uint64
	// helloStoppedGrants: the hello set stop_grants (the agent was closing when it went out).
	helloStoppedGrants bool
	// takesStopGrants: the welcome set accepts_stop_grants.
	takesStopGrants bool
	// grantsStopped: the server sends no more grants on this stream: the
	// agent is closing and the server takes StopGrants (see Agent.stopGrants).
	grantsStopped bool
	// sent is the local send time of each unacknowledged heartbeat, by sequence.
	sent map[uint64]time.Time
	// lastAcked and lastAckedAt: the last heartbeat acknowledged and its send
	// time. A server whose renewal was late (a database outage) answers it
	// again (worker.proto).
	lastAcked   uint64
	lastAckedAt time.Time
	// pending are the reports waiting for their ReportResult, by report id.
	pending map[uint64]*run
	// asking: a round of health checks of the other addresses is out (see
	// unreachable.go); unreachableSince: when the first of the acks that
	// have said database_unreachable since the last one that did not
	// arrived (zero while they do not say so).
	asking           bool
	unreachableSince time.Time
	// probeEvery: until the welcome, the server's health is asked on the
	// stream's connection this often (see welcome_probe.go); zero for never.
	probeEvery time.Duration
}

// dialOptions are added to the caller's: keepalive like the TypeScript SDK,
// and a connect timeout of 5 s instead of 20 s, so that an address that
// does not answer costs less than the grace period; a server whose event
// loop is busy (starting up) still gets the time to finish its handshake
// when it is the only address (with several, the health checks before the
// welcome leave it after 1.5 heartbeat intervals: see welcome_probe.go).
// Each stream gets its own ClientConn, so the agent's backoff (bounded by
// grace/8) is the only one between attempts: grpc-go's own connection
// backoff never comes into play.
func dialOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithKeepaliveParams(keepalive.ClientParameters{
			Time: 10 * time.Second, Timeout: 5 * time.Second, PermitWithoutStream: true}),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.DefaultConfig, MinConnectTimeout: 5 * time.Second}),
	}
}

// dial opens the stream and reads it until it ends, posting every message
// and finally the end to the loop. It runs on its own goroutine.
func (a *Agent) dial(c *conn) {
	cc, err := grpc.DialContext(c.ctx, c.address, append(dialOptions(), a.opts.DialOptions...)...)
	if err != nil {
		a.post(func() { a.ended(c, err) })
		return
	}
	defer cc.Close()
	if c.probeEvery > 0 {
		// Started before the stream: opening it waits for the connection's handshake, and so
		// does the check, which then also finds a server that never finishes it.
		a.post(func() { a.probe(c, cc) })
	}
	stream, err := leaseholdv1.NewWorkerServiceClient(cc).Connect(c.ctx)
	if err != nil {
		a.post(func() { a.ended(c, err) })
		return
	}
	go c.write(stream)
	for {
		m, err := stream.Recv()
		if err != nil {
			if err == io.EOF {
				err = nil
			}
			a.post(func() { a.ended(c, err) })
			return
		}
		a.post(func() { a.receive(c, m) })
	}
}

// write sends what the loop queued, in order, until the stream ends.
func (c *conn) write(stream leaseholdv1.WorkerService_ConnectClient) {
	for {
		select {
		case <-c.out.wake:
		case <-c.ctx.Done():
			return
		}
		messages, batches, closeSend := c.out.take()
		for _, m := range frames(messages, batches) {
			if stream.Send(m) != nil {
				return // the reader sees the error and ends the connection
			}
		}
		if closeSend {
			_ = stream.CloseSend()
			return
		}
	}
}

// outbox is the queue between the loop and a stream's writer.
type outbox struct {
	mu      sync.Mutex
	queue   []*leaseholdv1.ConnectRequest
	batches bool
	closing bool
	wake    chan struct{}
}

func newOutbox() *outbox { return &outbox{wake: make(chan struct{}, 1)} }

func (o *outbox) push(m *leaseholdv1.ConnectRequest) {
	o.mu.Lock()
	if !o.closing {
		o.queue = append(o.queue, m)
	}
	o.mu.Unlock()
	o.signal()
}

// closeSend ends the worker's side of the stream after what is queued.
func (o *outbox) closeSend() {
	o.mu.Lock()
	o.closing = true
	o.mu.Unlock()
	o.signal()
}

// allowBatches: the welcome said the server takes ConnectRequest batches.
func (o *outbox) allowBatches(yes bool) {
	o.mu.Lock()
	o.batches = yes
	o.mu.Unlock()
}

func (o *outbox) signal() {
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

func (o *outbox) take() (messages []*leaseholdv1.ConnectRequest, batches, closeSend bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	messages, o.queue = o.queue, nil
	return messages, o.batches, o.closing
}

// frames turns the messages queued since the last write into what is sent:
// one by one, or, when the server takes batches, in batches of at most
// maxBatchMessages and about maxBatchBytes. In a batch, a grant ack is left
// out when a report on the same lease goes with it: the report acknowledges
// the grant (worker.proto, GrantAck), and the server has one message less to
// answer.
func frames(messages []*leaseholdv1.ConnectRequest, batches bool) []*leaseholdv1.ConnectRequest {
	if !batches || len(messages) < 2 {
		return messages
	}
	reported := map[Lease]bool{}
	for _, m := range messages {
		if l, ok := reportedLease(m); ok {
			reported[l] = true
		}
	}
	var out []*leaseholdv1.ConnectRequest
	var run []*leaseholdv1.ConnectRequest
	size := 0
	flush := func() {
		switch len(run) {
		case 0:
		case 1:
			out = append(out, run[0])
		default:
			out = append(out, &leaseholdv1.ConnectRequest{Message: &leaseholdv1.ConnectRequest_Batch{
				Batch: &leaseholdv1.ConnectRequestBatch{Messages: run}}})
		}
		run, size = nil, 0
	}
	for _, m := range messages {
		if ack := m.GetGrantAck(); ack != nil && reported[Lease{ack.GetActionId(), ack.GetEpoch()}] {
			continue
		}
		n := proto.Size(m)
		if len(run) > 0 && (len(run) == maxBatchMessages || size+n > maxBatchBytes) {
			flush()
		}
		run = append(run, m)
		size += n
	}
	flush()
	return out
}

// reportedLease is the lease a progress, completion or release report is about.
func reportedLease(m *leaseholdv1.ConnectRequest) (Lease, bool) {
	switch {
	case m.GetProgress() != nil:
		return Lease{m.GetProgress().GetActionId(), m.GetProgress().GetEpoch()}, true
	case m.GetCompletion() != nil:
		return Lease{m.GetCompletion().GetActionId(), m.GetCompletion().GetEpoch()}, true
	case m.GetRelease() != nil:
		return Lease{m.GetRelease().GetActionId(), m.GetRelease().GetEpoch()}, true
	}
	return Lease{}, false
}

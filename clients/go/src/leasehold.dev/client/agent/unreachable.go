package agent

import (
	"context"
	"fmt"
	"time"

	leaseholdv1 "leasehold.dev/client/gen/leasehold/v1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health/grpc_health_v1"
)

// A server that cannot reach its database still answers heartbeats, but its
// acks only count down from the last deadline it wrote, and say so
// (HeartbeatAck.database_unreachable). Staying would self-fence the work
// while another server could resume the session, so once the acks of a
// stream have said so for 3/4 of a heartbeat interval (servers notice an
// outage up to an interval apart: asking at once could move the agent to a
// server that has not noticed yet), with several addresses, the agent asks
// the other addresses' health and leaves for the first that serves; when
// none does (the database is down for every server), or an ack says the
// database is back before they answer, it stays. It asks no sooner than
// unreachableIntervals heartbeat intervals after the last round started, on
// whichever stream, so that a flapping database cannot bounce it between
// servers (worker.proto, Connect).

// unreachableIntervals is how many heartbeat intervals after the start of a
// round of health checks the agent's next round may start.
const unreachableIntervals = 4

// workerService is the service name the health checks ask about, from the
// descriptor (the generated service descriptor is not exported).
var workerService = string(leaseholdv1.File_leasehold_v1_worker_proto.Services().ByName("WorkerService").FullName())

// leaveIfUnreachable runs on an ack of c that says its server cannot reach
// its database: it starts a round of health checks of every other address,
// all at once, unless the acks of c have said so for less than a heartbeat
// interval, a round is out for c already, or the agent's last round started
// less than unreachableIntervals heartbeat intervals ago. With a single
// address there is nowhere to go, and it never asks.
func (a *Agent) leaveIfUnreachable(c *conn) {
	n := len(a.opts.Addresses)
	if n < 2 || a.stopped || c.ended || !c.welcomed || c.saidGoodbye || c.asking {
		return
	}
	// Three quarters of an interval: the second such ack, about an interval after the first, is
	// enough even when it comes a little early.
	if c.unreachableSince.IsZero() || time.Since(c.unreachableSince) < a.heartbeatInterval*3/4 {
		return
	}
	if !a.askedAt.IsZero() && time.Since(a.askedAt) < unreachableIntervals*a.heartbeatInterval {
		return
	}
	// The other addresses in the usual order, starting after the current one.
	var indexes []int
	var addresses []string
	for i := 1; i < n; i++ {
		j := (c.index + i) % n
		if a.opts.Addresses[j] != c.address {
			indexes = append(indexes, j)
			addresses = append(addresses, a.opts.Addresses[j])
		}
	}
	if len(addresses) == 0 {
		return
	}
	c.asking = true
	a.askedAt = time.Now()
	options := append(dialOptions(), a.opts.DialOptions...)
	timeout := a.heartbeatInterval
	go func() {
		// c.ctx ends with the stream: the checks of a stream that ended are cancelled.
		first := firstServing(c.ctx, addresses, timeout, options)
		a.post(func() {
			next := -1
			if first >= 0 {
				next = indexes[first]
			}
			a.healthAnswered(c, next)
		})
	}()
}

// healthAnswered ends c so that the next connection goes to Addresses[next],
// the first other address that serves; with none (next < 0), c stays. The
// answers for a stream that ended meanwhile are ignored, and so are those
// that came after an ack of c said the database is back: c stays then too
// (leaving would only move the session for nothing).
func (a *Agent) healthAnswered(c *conn, next int) {
	c.asking = false
	if a.stopped || c.ended || c.saidGoodbye || next < 0 || c.unreachableSince.IsZero() {
		return
	}
	// Like a server that stopped answering: the session and its leases are
	// resumed through the next stream, handlers keep running. That stream
	// goes to next, not to the address ended picks at random: it opens later,
	// on the loop.
	a.ended(c, fmt.Errorf("the server cannot reach its database; %s serves", a.opts.Addresses[next]))
	a.addressIndex = next
}

// firstServing asks every address's grpc.health.v1 Health/Check about the
// WorkerService at once, each within timeout, and returns the index of the
// first in the list that answers SERVING, as soon as those before it have
// answered otherwise; -1 when none does.
func firstServing(ctx context.Context, addresses []string, timeout time.Duration, options []grpc.DialOption) int {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel() // the checks still under way once the answer is known
	type answer struct {
		index   int
		serving bool
	}
	answers := make(chan answer, len(addresses))
	for i, address := range addresses {
		go func(i int, address string) { answers <- answer{i, serves(ctx, address, options)} }(i, address)
	}
	const unknown, yes, no = 0, 1, 2
	states := make([]int, len(addresses))
	for range addresses {
		got := <-answers
		states[got.index] = no
		if got.serving {
			states[got.index] = yes
		}
		for i, s := range states {
			if s == unknown {
				break
			}
			if s == yes {
				return i
			}
		}
	}
	return -1
}

// serves asks one address's health about the WorkerService, over a
// connection of its own with the stream's dial options (credentials
// included).
func serves(ctx context.Context, address string, options []grpc.DialOption) bool {
	cc, err := grpc.DialContext(ctx, address, options...)
	if err != nil {
		return false
	}
	defer cc.Close()
	res, err := grpc_health_v1.NewHealthClient(cc).Check(ctx, &grpc_health_v1.HealthCheckRequest{Service: workerService})
	return err == nil && res.GetStatus() == grpc_health_v1.HealthCheckResponse_SERVING
}

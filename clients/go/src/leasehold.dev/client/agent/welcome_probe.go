package agent

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// Before the welcome the rule on unanswered heartbeats does not apply yet,
// and a server may rightly hold the hello for long (starting, or waiting for
// its database). A hung one (a stopped process, a connection dead one way)
// holds it forever, and the 5 s connect timeout or HTTP/2 keepalive (10 s +
// 5 s) notices late, past the leases' guarantee. So, with other addresses to
// go to, the agent asks the stream's own connection for the server's health
// (grpc.health.v1 Check, service leasehold.v1.WorkerService) right after the
// hello and then every heartbeat interval until the welcome, and leaves the
// stream when a check goes unanswered for 1.5 intervals, the bound on
// heartbeat acks. Any answer, NOT_SERVING or an error status too, shows the
// server alive: only a deadline passed without one counts (worker.proto,
// Connect).

// defaultHeartbeat is the heartbeat interval assumed before the first welcome
// tells the server's: its default.
const defaultHeartbeat = 2 * time.Second

// probeEvery is how often a new stream asks its server's health until the
// welcome: the heartbeat interval of the last welcome (defaultHeartbeat
// before any). Zero with a single distinct address: there is nowhere else to
// go, and the agent waits for the welcome as long as the connection lives.
func (a *Agent) probeEvery() time.Duration {
	if distinctAddresses(a.opts.Addresses) < 2 {
		return 0
	}
	if a.heartbeatInterval > 0 {
		return a.heartbeatInterval
	}
	return defaultHeartbeat
}

// probe sends one health check on cc, the connection of c's stream, unless c
// was welcomed or ended; the answer goes to probed, on the loop.
func (a *Agent) probe(c *conn, cc *grpc.ClientConn) {
	if a.stopped || c.ended || c.welcomed || c.saidGoodbye {
		return
	}
	go func() {
		sentAt := time.Now()
		// c.ctx ends with the stream: the check of a stream that ended is cancelled.
		ctx, cancel := context.WithTimeout(c.ctx, c.probeEvery*3/2)
		_, err := grpc_health_v1.NewHealthClient(cc).Check(ctx, &grpc_health_v1.HealthCheckRequest{Service: workerService})
		cancel()
		unanswered := status.Code(err) == codes.DeadlineExceeded
		waited := time.Since(sentAt)
		a.post(func() { a.probed(c, cc, waited, unanswered) })
	}()
}

// probed handles the end of a health check that waited for waited: the next
// one goes out a heartbeat interval after this one did, unless the welcome
// came or the stream ended meanwhile; one that went unanswered ends the
// stream like unanswered heartbeats do, and the next goes to another address.
func (a *Agent) probed(c *conn, cc *grpc.ClientConn, waited time.Duration, unanswered bool) {
	if a.stopped || c.ended || c.welcomed || c.saidGoodbye {
		return
	}
	if !unanswered {
		time.AfterFunc(c.probeEvery-waited, func() { a.post(func() { a.probe(c, cc) }) })
		return
	}
	a.ended(c, fmt.Errorf("the server answered no health check for %dms before welcoming the agent", waited.Milliseconds()))
}

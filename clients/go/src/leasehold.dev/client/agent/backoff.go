package agent

import (
	"math/rand"
	"time"
)

// backoffCapBeforeWelcome is the largest reconnect delay before a welcome has
// told the agent the grace period (worker.proto, Connect: 1 s). An agent that
// was never welcomed holds no lease, so this only paces the wait for a server
// that is not up yet.
const backoffCapBeforeWelcome = time.Second

// reconnectCeiling is the ceiling of the next reconnect delay: initial doubled
// per attempt that got no welcome, never above grace/8 (grace zero: not known
// yet, then 1 s), nor above max when max is set. A server back within the
// grace period must find the agent again while its leases are still
// guaranteed, and the agent's own self-fence deadline is shorter than the
// grace by up to two heartbeats and the margin.
func reconnectCeiling(attempt int, initial, max, grace time.Duration) time.Duration {
	limit := backoffCapBeforeWelcome
	if grace > 0 {
		limit = grace / 8
	}
	if max > 0 && max < limit {
		limit = max
	}
	if attempt > 30 {
		attempt = 30
	}
	ceiling := initial
	for i := 0; i < attempt && ceiling < limit; i++ {
		ceiling *= 2
	}
	if ceiling > limit {
		ceiling = limit
	}
	if ceiling < 0 {
		return 0
	}
	return ceiling
}

// jitter draws a delay uniformly in [0, ceiling) (full jitter), so agents
// that lost the same server do not come back in lockstep.
func jitter(rng *rand.Rand, ceiling time.Duration) time.Duration {
	if ceiling <= 0 {
		return 0
	}
	return time.Duration(rng.Int63n(int64(ceiling)))
}

// refusedBackoffCap is the longest wait between attempts whose credentials the
// server refused.
const refusedBackoffCap = 30 * time.Second

// refusedDelay is the wait after the server refused the agent's credentials
// (UNAUTHENTICATED, PERMISSION_DENIED) refusals times in a row: such a refusal
// is not an outage, and retrying at the reconnect pace would only flood the
// server's log (worker.proto: 1–2 s after the first, doubling up to 15–30 s).
// A rotated token or policy may fix it, so the agent keeps trying.
func refusedDelay(rng *rand.Rand, refusals int) time.Duration {
	ceiling := 2 * time.Second
	for i := 1; i < refusals && ceiling < refusedBackoffCap; i++ {
		ceiling *= 2
	}
	if ceiling > refusedBackoffCap {
		ceiling = refusedBackoffCap
	}
	return ceiling/2 + jitter(rng, ceiling/2)
}

package agent

import (
	"math/rand"
	"testing"
	"time"
)

func TestReconnectCeilingDoublesUpToAnEighthOfTheGrace(t *testing.T) {
	grace := 2 * time.Second
	want := []time.Duration{200, 250, 250, 250}
	for attempt, w := range want {
		if got := reconnectCeiling(attempt, 200*time.Millisecond, 0, grace); got != w*time.Millisecond {
			t.Errorf("attempt %d: ceiling %v, want %v", attempt, got, w*time.Millisecond)
		}
	}
}

func TestReconnectCeilingIsOneSecondBeforeTheFirstWelcome(t *testing.T) {
	if got := reconnectCeiling(20, 200*time.Millisecond, 0, 0); got != time.Second {
		t.Errorf("ceiling %v, want 1s", got)
	}
	if got := reconnectCeiling(20, 200*time.Millisecond, 300*time.Millisecond, 10*time.Second); got != 300*time.Millisecond {
		t.Errorf("ceiling %v, want the explicit 300ms", got)
	}
}

func TestJitterStaysBelowTheCeiling(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for i := 0; i < 1000; i++ {
		if d := jitter(rng, 250*time.Millisecond); d < 0 || d >= 250*time.Millisecond {
			t.Fatalf("delay %v outside [0, 250ms)", d)
		}
	}
}

func TestRefusedDelayStartsAt1To2sAndStopsAt15To30s(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	if d := refusedDelay(rng, 1); d < time.Second || d > 2*time.Second {
		t.Errorf("first refusal: %v, want 1–2s", d)
	}
	if d := refusedDelay(rng, 50); d < 15*time.Second || d > 30*time.Second {
		t.Errorf("50th refusal: %v, want 15–30s", d)
	}
}

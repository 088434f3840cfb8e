package agent

import (
	"errors"
	"math/rand"
	"testing"
	"time"
)

// fixed is an intn that always draws i (or the largest it may).
func fixed(i int) func(n int) int {
	return func(n int) int {
		if i >= n {
			return n - 1
		}
		return i
	}
}

func TestAnotherAddressIsOneOfTheOthers(t *testing.T) {
	three := []string{"a:1", "b:1", "c:1"}
	for draw, want := range []int{1, 2} {
		if got := anotherAddress(three, 0, fixed(draw)); got != want {
			t.Errorf("from 0, draw %d: %d, want %d", draw, got, want)
		}
	}
	if got := anotherAddress(three, 2, fixed(0)); got != 0 {
		t.Errorf("from 2, draw 0: %d, want 0", got)
	}
	// The index is taken modulo the list: 4 is b:1.
	if got := anotherAddress(three, 4, fixed(1)); got != 2 {
		t.Errorf("from 4, draw 1: %d, want 2", got)
	}
}

func TestAnotherAddressSpreadsOverTheOthers(t *testing.T) {
	four := []string{"a:1", "b:1", "c:1", "d:1"}
	rng := rand.New(rand.NewSource(1))
	counts := map[int]int{}
	for i := 0; i < 3000; i++ {
		counts[anotherAddress(four, 0, rng.Intn)]++
	}
	if counts[0] != 0 {
		t.Errorf("stayed %d times", counts[0])
	}
	for _, i := range []int{1, 2, 3} {
		if counts[i] < 800 {
			t.Errorf("went to %d %d times out of 3000, want about 1000 (%v)", i, counts[i], counts)
		}
	}
}

func TestAnotherAddressSkipsTheSameAddressAndStaysWithoutAnother(t *testing.T) {
	if got := anotherAddress([]string{"a:1", "a:1", "b:1"}, 0, fixed(0)); got != 2 {
		t.Errorf("from a duplicate: %d, want 2 (b:1)", got)
	}
	if got := anotherAddress([]string{"a:1"}, 5, rand.Intn); got != 0 {
		t.Errorf("one address: %d, want 0", got)
	}
	if got := anotherAddress([]string{"a:1", "a:1"}, 1, rand.Intn); got != 1 {
		t.Errorf("one address twice: %d, want to stay at 1", got)
	}
}

// A stream that ends sends the agent to another address picked at random, not
// to the next one; a stream left for an address that serves goes there.
func TestAStreamThatEndsMovesTheAgentToARandomOtherAddress(t *testing.T) {
	done := make(chan struct{})
	close(done) // no loop: the reconnect the timer posts is dropped
	agent := func(seed int64) *Agent {
		return &Agent{opts: Options{Addresses: []string{"a:1", "b:1", "c:1"}, InitialBackoff: time.Millisecond},
			rng: rand.New(rand.NewSource(seed)), running: map[string]*run{}, loopDone: done}
	}
	stream := func() *conn {
		return &conn{address: "a:1", index: 0, cancel: func() {}, welcomed: true}
	}
	went := map[int]bool{}
	for seed := int64(0); seed < 40; seed++ {
		a := agent(seed)
		a.ended(stream(), errors.New("gone"))
		went[a.addressIndex%3] = true
	}
	if went[0] || !went[1] || !went[2] {
		t.Fatalf("went to %v from address 0, want both others", went)
	}
	for seed := int64(0); seed < 40; seed++ {
		a := agent(seed)
		c := stream()
		c.unreachableSince = time.Now()
		a.healthAnswered(c, 2)
		if !c.ended || a.addressIndex != 2 {
			t.Fatalf("left for the address that serves (2): ended %v, going to %d", c.ended, a.addressIndex)
		}
	}
}

package agent

import (
	"context"
	"math"
	"strings"
	"testing"

	"google.golang.org/protobuf/types/known/structpb"
)

func TestCleanTextReplacesNulAndInvalidUTF8AndCuts(t *testing.T) {
	if got := cleanText("a\x00b\xffc", 100); got != "a\uFFFDb\uFFFDc" {
		t.Errorf("got %q", got)
	}
	if got := cleanText(strings.Repeat("é", 10), 4); got != "éééé" {
		t.Errorf("got %q", got)
	}
}

func TestCleanStructRefusesWhatTheServerWould(t *testing.T) {
	deep := map[string]interface{}{}
	for i := 0; i < maxStructDepth; i++ {
		deep = map[string]interface{}{"d": deep}
	}
	cases := map[string]*structpb.Struct{
		"deep":       mustStruct(t, deep),
		"non-finite": {Fields: map[string]*structpb.Value{"x": structpb.NewNumberValue(math.Inf(1))}},
		"large":      mustStruct(t, map[string]interface{}{"s": strings.Repeat("x", maxStructJSON)}),
	}
	for name, s := range cases {
		if _, err := cleanStruct(s); err == nil {
			t.Errorf("%s: want an error", name)
		}
	}
	ok, err := cleanStruct(mustStruct(t, map[string]interface{}{"k\x00": "v\x00"}))
	if err != nil || ok.Fields["k\uFFFD"].GetStringValue() != "v\uFFFD" {
		t.Errorf("want NULs replaced, got %v, %v", ok, err)
	}
}

func mustStruct(t *testing.T, m map[string]interface{}) *structpb.Struct {
	t.Helper()
	s, err := structpb.NewStruct(m)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestStartRefusesNamesTheServerWouldRefuseInEveryHello(t *testing.T) {
	handler := func(context.Context, *Action) (*structpb.Struct, error) { return nil, nil }
	base := Options{Addresses: []string{"127.0.0.1:1"}, Cluster: "east", WorkerID: "w", Handler: handler}
	cases := map[string]func(o *Options){
		"cluster":   func(o *Options) { o.Cluster = "bad cluster" },
		"worker id": func(o *Options) { o.WorkerID = strings.Repeat("w", 129) },
		"capacity":  func(o *Options) { o.Capacity = 10001 },
		"label key": func(o *Options) { o.Labels = map[string]string{"bad key": "v"} },
		"label":     func(o *Options) { o.Labels = map[string]string{"k": strings.Repeat("v", 257)} },
	}
	for what, change := range cases {
		o := base
		change(&o)
		if a, err := Start(o); err == nil {
			a.Close(context.Background())
			t.Errorf("%s: started", what)
		} else if !strings.HasPrefix(err.Error(), "agent: ") {
			t.Errorf("%s: %v", what, err)
		}
	}
	if problem := helloProblem(Options{Cluster: "east", WorkerID: "w-1.a:b", Labels: map[string]string{"gpu": "yes"}}); problem != "" {
		t.Errorf("good names refused: %s", problem)
	}
}

func TestOnlyAReleaseMadeOnTheSelfFenceIsMarkedSo(t *testing.T) {
	l := Lease{ActionID: "a", Epoch: 3}
	fenced := reportMessage(1, l, afterLoss(&LeaseLost{Reason: "self_fenced", Message: "no ack"}))
	drained := reportMessage(2, l, afterLoss(&LeaseLost{Reason: "drained", Message: "drained"}))
	if !fenced.GetRelease().GetSelfFenced() {
		t.Errorf("a self-fence's release: want self_fenced, got %v", fenced)
	}
	if drained.GetRelease().GetSelfFenced() {
		t.Errorf("a drain's release: want no self_fenced, got %v", drained)
	}
}

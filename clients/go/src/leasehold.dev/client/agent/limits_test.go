package agent

import (
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

package agent

import (
	"fmt"
	"math"
	"regexp"
	"sort"
	"strings"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
)

// Limits of worker messages (worker.proto, ConnectRequest): a message that
// breaks one ends the stream, so the agent checks before sending.
const (
	maxStructDepth   = 32
	maxStructItems   = 10000
	maxStructJSON    = 1 << 20
	maxFailureRunes  = 65536
	maxReasonRunes   = 1024
	maxPhaseRunes    = 1024
	maxBatchMessages = 1024
	// maxBatchBytes bounds the reports of one ConnectRequest batch (a larger
	// report goes alone): far under what the server receives in one message.
	maxBatchBytes = 1 << 20
)

// cleanText makes s sendable: invalid UTF-8 and NUL become U+FFFD (proto3
// strings must be UTF-8; the server refuses NUL), cut to max runes.
func cleanText(s string, max int) string {
	s = strings.ReplaceAll(strings.ToValidUTF8(s, "\uFFFD"), "\x00", "\uFFFD")
	if utf8.RuneCountInString(s) <= max {
		return s
	}
	return string([]rune(s)[:max])
}

// cleanStruct returns a copy of s with its keys and strings made sendable
// (see cleanText, without the cut), or an error naming the limit it breaks:
// nesting, number of values and keys, size as JSON, non-finite numbers.
func cleanStruct(s *structpb.Struct) (*structpb.Struct, error) {
	if s == nil {
		return nil, nil
	}
	c := proto.Clone(s).(*structpb.Struct)
	items := 0
	if err := cleanFields(c, 1, &items); err != nil {
		return nil, err
	}
	if size := len(protojsonCompact(c)); size > maxStructJSON {
		return nil, fmt.Errorf("%d bytes as JSON, over %d", size, maxStructJSON)
	}
	return c, nil
}

func cleanFields(s *structpb.Struct, depth int, items *int) error {
	if depth > maxStructDepth {
		return fmt.Errorf("nests deeper than %d levels", maxStructDepth)
	}
	keys := make([]string, 0, len(s.GetFields()))
	for k := range s.GetFields() {
		keys = append(keys, k)
	}
	for _, k := range keys {
		*items++
		v := s.Fields[k]
		if clean := cleanText(k, math.MaxInt32); clean != k {
			delete(s.Fields, k)
			s.Fields[clean] = v
		}
		if err := cleanValue(v, depth, items); err != nil {
			return err
		}
	}
	return nil
}

func cleanValue(v *structpb.Value, depth int, items *int) error {
	*items++
	if *items > maxStructItems {
		return fmt.Errorf("holds more than %d values and keys", maxStructItems)
	}
	switch k := v.GetKind().(type) {
	case *structpb.Value_StringValue:
		k.StringValue = cleanText(k.StringValue, math.MaxInt32)
	case *structpb.Value_NumberValue:
		if math.IsNaN(k.NumberValue) || math.IsInf(k.NumberValue, 0) {
			return fmt.Errorf("holds a non-finite number")
		}
	case *structpb.Value_StructValue:
		return cleanFields(k.StructValue, depth+1, items)
	case *structpb.Value_ListValue:
		if depth+1 > maxStructDepth {
			return fmt.Errorf("nests deeper than %d levels", maxStructDepth)
		}
		for _, e := range k.ListValue.GetValues() {
			if err := cleanValue(e, depth+1, items); err != nil {
				return err
			}
		}
	}
	return nil
}

func protojsonCompact(m proto.Message) []byte {
	b, err := protojson.Marshal(m)
	if err != nil {
		return nil
	}
	return b
}

// name is the alphabet of worker ids, clusters and label keys (worker.proto, Hello).
var name = regexp.MustCompile(`^[A-Za-z0-9._:-]{1,128}$`)

// helloProblem says what in the options a server would refuse in every hello
// (worker.proto, Hello), or "" if nothing: an agent sending it would retry forever.
func helloProblem(o Options) string {
	switch {
	case !name.MatchString(o.WorkerID):
		return fmt.Sprintf("WorkerID %q must be 1–128 letters, digits, '.', '_', '-' or ':'", o.WorkerID)
	case !name.MatchString(o.Cluster):
		return fmt.Sprintf("Cluster %q must be 1–128 letters, digits, '.', '_', '-' or ':'", o.Cluster)
	case o.Capacity > 10000:
		return fmt.Sprintf("Capacity must be at most 10000, not %d", o.Capacity)
	case len(o.Labels) > 64:
		return fmt.Sprintf("Labels must have at most 64 entries, not %d", len(o.Labels))
	}
	keys := make([]string, 0, len(o.Labels))
	for k := range o.Labels {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if !name.MatchString(k) {
			return fmt.Sprintf("Labels key %q must be 1–128 letters, digits, '.', '_', '-' or ':'", k)
		}
		if utf8.RuneCountInString(o.Labels[k]) > 256 {
			return fmt.Sprintf("Labels[%q] must be at most 256 characters", k)
		}
	}
	return ""
}

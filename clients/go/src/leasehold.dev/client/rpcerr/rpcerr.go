// Package rpcerr turns the errors of Leasehold calls into one error type that
// carries the gRPC code and the machine-readable details the server puts in
// grpc-status-details-bin (a google.rpc.Status): ErrorInfo (a stable reason
// such as LEASE_FENCED, a domain and metadata), BadRequest field violations
// and PreconditionFailure violations.
//
// The message text is for people, Reason and the violations' fields are for
// programs.
package rpcerr

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// FieldViolation is one invalid field of a request (google.rpc.BadRequest).
type FieldViolation struct {
	// Field is the path of the field, e.g. "cluster" or "actions[3].payload".
	Field string
	// Description says what is wrong with it.
	Description string
}

// PreconditionViolation is one failed precondition (google.rpc.PreconditionFailure).
type PreconditionViolation struct {
	// Type of the precondition, e.g. "STATE".
	Type string
	// Subject the precondition is about, e.g. an action id.
	Subject string
	// Description says how it failed.
	Description string
}

// Error is a failed call: its gRPC code, message and decoded details.
type Error struct {
	// Code is the call's gRPC status code.
	Code codes.Code
	// Message is the status message, for people.
	Message string
	// Reason is ErrorInfo.reason (e.g. "LEASE_FENCED"), empty without an ErrorInfo.
	Reason string
	// Domain is ErrorInfo.domain.
	Domain string
	// Metadata is ErrorInfo.metadata (e.g. retry_after_ms); nil without an ErrorInfo.
	Metadata map[string]string
	// FieldViolations lists the invalid fields of a BadRequest detail.
	FieldViolations []FieldViolation
	// PreconditionViolations lists the failures of a PreconditionFailure detail.
	PreconditionViolations []PreconditionViolation

	status *status.Status
	cause  error
}

// From converts any error into an *Error: a gRPC status error (also one
// wrapped in other errors) with its details decoded; a context error as
// CANCELLED or DEADLINE_EXCEEDED; anything else as UNKNOWN with the error's
// text. It returns nil for nil, and the *Error itself when err is or wraps one.
func From(err error) *Error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	// status.FromError of older grpc-go (Debian's 1.33) does not look through
	// wrapped errors (fmt.Errorf("...: %w", err)); errors.As does.
	var withStatus interface{ GRPCStatus() *status.Status }
	var s *status.Status
	if errors.As(err, &withStatus) {
		s = withStatus.GRPCStatus()
	} else {
		switch {
		case errors.Is(err, context.Canceled):
			s = status.New(codes.Canceled, err.Error())
		case errors.Is(err, context.DeadlineExceeded):
			s = status.New(codes.DeadlineExceeded, err.Error())
		default:
			s = status.New(codes.Unknown, err.Error())
		}
	}
	e = &Error{Code: s.Code(), Message: s.Message(), status: s, cause: err}
	for _, detail := range s.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			e.Reason = d.GetReason()
			e.Domain = d.GetDomain()
			e.Metadata = d.GetMetadata()
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				e.FieldViolations = append(e.FieldViolations, FieldViolation{Field: v.GetField(), Description: v.GetDescription()})
			}
		case *errdetails.PreconditionFailure:
			for _, v := range d.GetViolations() {
				e.PreconditionViolations = append(e.PreconditionViolations,
					PreconditionViolation{Type: v.GetType(), Subject: v.GetSubject(), Description: v.GetDescription()})
			}
		}
		// Other detail types, and details this binary cannot decode (an error
		// value in the list), carry nothing the fields above need.
	}
	return e
}

// Error reads e.g. `INVALID_ARGUMENT: cluster: must be 1–128 letters, ...
// (field cluster: must be ...)` with the reason and every violation.
func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %s", CodeName(e.Code), e.Message)
	if e.Reason != "" {
		fmt.Fprintf(&b, " [reason %s", e.Reason)
		keys := make([]string, 0, len(e.Metadata))
		for k := range e.Metadata {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			fmt.Fprintf(&b, ", %s=%s", k, e.Metadata[k])
		}
		b.WriteString("]")
	}
	for _, v := range e.FieldViolations {
		fmt.Fprintf(&b, " (field %s: %s)", v.Field, v.Description)
	}
	for _, v := range e.PreconditionViolations {
		fmt.Fprintf(&b, " (precondition %s %s: %s)", v.Type, v.Subject, v.Description)
	}
	return b.String()
}

// Unwrap returns the error From was given.
func (e *Error) Unwrap() error { return e.cause }

// GRPCStatus makes status.FromError and status.Code work on an *Error.
func (e *Error) GRPCStatus() *status.Status { return e.status }

// CodeName spells a code as the gRPC spec does (INVALID_ARGUMENT, not
// InvalidArgument), for messages, logs and JSON.
func CodeName(c codes.Code) string {
	if name, ok := codeNames[c]; ok {
		return name
	}
	return fmt.Sprintf("CODE_%d", uint32(c))
}

var codeNames = map[codes.Code]string{
	codes.OK:                 "OK",
	codes.Canceled:           "CANCELLED",
	codes.Unknown:            "UNKNOWN",
	codes.InvalidArgument:    "INVALID_ARGUMENT",
	codes.DeadlineExceeded:   "DEADLINE_EXCEEDED",
	codes.NotFound:           "NOT_FOUND",
	codes.AlreadyExists:      "ALREADY_EXISTS",
	codes.PermissionDenied:   "PERMISSION_DENIED",
	codes.ResourceExhausted:  "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION",
	codes.Aborted:            "ABORTED",
	codes.OutOfRange:         "OUT_OF_RANGE",
	codes.Unimplemented:      "UNIMPLEMENTED",
	codes.Internal:           "INTERNAL",
	codes.Unavailable:        "UNAVAILABLE",
	codes.DataLoss:           "DATA_LOSS",
	codes.Unauthenticated:    "UNAUTHENTICATED",
}

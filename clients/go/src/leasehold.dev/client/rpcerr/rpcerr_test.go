package rpcerr

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestFromDecodesErrorInfoAndFieldViolations(t *testing.T) {
	s, err := status.New(codes.InvalidArgument, "cluster: may contain only letters").WithDetails(
		&errdetails.ErrorInfo{Reason: "INVALID_ARGUMENT", Domain: "leasehold.dev"},
		&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{
			{Field: "cluster", Description: "may contain only letters"}}},
	)
	if err != nil {
		t.Fatal(err)
	}
	e := From(fmt.Errorf("submitting: %w", s.Err()))
	if e.Code != codes.InvalidArgument || e.Reason != "INVALID_ARGUMENT" || len(e.FieldViolations) != 1 ||
		e.FieldViolations[0].Field != "cluster" {
		t.Fatalf("decoded %+v", e)
	}
	if !strings.Contains(e.Error(), "(field cluster: may contain only letters)") {
		t.Errorf("message %q names no field", e.Error())
	}
	if status.Code(e) != codes.InvalidArgument {
		t.Errorf("status.Code(e) = %v", status.Code(e))
	}
}

func TestFromMapsContextErrorsAndUnknownOnes(t *testing.T) {
	if From(nil) != nil {
		t.Error("From(nil) should be nil")
	}
	if c := From(context.DeadlineExceeded).Code; c != codes.DeadlineExceeded {
		t.Errorf("deadline: %v", c)
	}
	if c := From(errors.New("boom")).Code; c != codes.Unknown {
		t.Errorf("plain error: %v", c)
	}
}

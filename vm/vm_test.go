package vm

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

func TestCheckName(t *testing.T) {
	for _, tc := range []struct {
		name       string
		ok, hostOK bool
	}{
		{"web1", true, true},
		{"ubuntu22.04", true, false},
		{"Web_3", true, false},
		{"a", true, true},
		{"8c1f0d4e-5a55-4c9b-9b3e-2f1c9d7e6a10", true, true},
		{strings.Repeat("a", 63), true, true},
		{strings.Repeat("a", 64), true, false},
		{strings.Repeat("a", 65), false, false},
		{"", false, false},
		{"-web", false, false},
		{"web-", true, false},
		{".hidden", false, false},
		{"web1;id", false, false},
		{"web 1", false, false},
		{"web1\n", false, false},
	} {
		if err := CheckName(tc.name); (err == nil) != tc.ok || (err != nil && !errors.Is(err, ErrBadName)) {
			t.Errorf("CheckName(%q) = %v, want ok=%v", tc.name, err, tc.ok)
		}
		if err := CheckHostName(tc.name); (err == nil) != tc.hostOK || (err != nil && !errors.Is(err, ErrBadName)) {
			t.Errorf("CheckHostName(%q) = %v, want ok=%v", tc.name, err, tc.hostOK)
		}
	}
}

func TestCause(t *testing.T) {
	detail := errors.New("libvirt: connection refused")
	for _, tc := range []struct {
		err  error
		want error
	}{
		{ErrNoSuchVM, ErrNoSuchVM},
		{fmt.Errorf("%w: web1", ErrNoSuchVM), ErrNoSuchVM},
		{fmt.Errorf("%w: %w", ErrNoSuchVM, detail), ErrNoSuchVM},
		{fmt.Errorf("finding: %w", fmt.Errorf("%w: %w", ErrBadName, detail)), ErrBadName},
		{errors.Join(ErrBadName, detail), ErrBadName},
	} {
		if got := Cause(tc.err); got != tc.want {
			t.Errorf("Cause(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
	if Cause(nil) != nil {
		t.Error("Cause(nil) is not nil")
	}
}

func TestPrintable(t *testing.T) {
	if got := Printable("agent said: \x1b[2Jgone\r\nroot# "); got != "agent said: ?[2Jgone??root# " {
		t.Errorf("Printable = %q", got)
	}
	if got := Printable(strings.Repeat("x", 300)); len(got) != 203 {
		t.Errorf("Printable of 300 bytes is %d long", len(got))
	}
}

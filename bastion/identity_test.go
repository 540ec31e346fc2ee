package bastion

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestParseKeyOptions(t *testing.T) {
	for _, tc := range []struct {
		options []string
		want    string // error text, or "" for none
	}{
		{nil, ""},
		{[]string{`from="10.0.0.0/8,!10.0.0.1,192.168.*"`}, ""},
		{[]string{`expiry-time="20261231"`}, ""},
		{[]string{`expiry-time="202612312359Z"`}, ""},
		{[]string{`from="*.example.com"`}, "is not an address"},
		{[]string{`from="host1"`}, "is not an address"},
		{[]string{`expiry-time="soon"`}, "is not YYYYMMDD"},
		{[]string{`command="id"`}, "option command is not supported"},
		{[]string{"restrict"}, "option restrict is not supported"},
		{[]string{"cert-authority"}, "option cert-authority is not supported"},
		{[]string{"no-pty"}, "option no-pty is not supported"},
		{[]string{`permitopen="host:22"`}, "option permitopen is not supported"},
	} {
		_, err := ParseKeyOptions(tc.options)
		if (err == nil) != (tc.want == "") || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("ParseKeyOptions(%q) = %v, want %q", tc.options, err, tc.want)
		}
	}
}

func TestKeyOptionsAllows(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	opts, err := ParseKeyOptions([]string{`from="10.0.0.0/8,!10.0.0.1,192.168.1.*"`, `expiry-time="20261202Z"`})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		source string
		at     time.Time
		ok     bool
	}{
		{"10.1.2.3", now, true},
		{"10.0.0.1", now, false}, // negated
		{"192.168.1.7", now, true},
		{"::ffff:10.1.2.3", now, true},
		{"192.168.2.7", now, false},
		{"10.1.2.3", now.Add(12 * time.Hour), false}, // expired at midnight UTC
	} {
		err := opts.Allows(netip.MustParseAddr(tc.source), tc.at)
		if (err == nil) != tc.ok {
			t.Errorf("from %s at %v: %v, want ok=%v", tc.source, tc.at, err, tc.ok)
		}
	}
	if err := (KeyOptions{}).Allows(netip.MustParseAddr("203.0.113.9"), now); err != nil {
		t.Errorf("a key without options: %v", err)
	}
}

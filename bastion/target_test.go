package bastion

import (
	"errors"
	"net"
	"strings"
	"testing"
	"time"
)

func TestParseTarget(t *testing.T) {
	for _, tc := range []struct {
		user  string
		want  Target
		valid bool
	}{
		{"root@web1", Target{"root", "web1"}, true},
		{"dev@db-2.prod", Target{"dev", "db-2.prod"}, true},
		{"root@0f8fad5b-d9cb-469f-a165-70867728950e", Target{"root", "0f8fad5b-d9cb-469f-a165-70867728950e"}, true},
		{"root", Target{}, false},
		{"@web1", Target{}, false},
		{"root@", Target{}, false},
		{"root@web1@other", Target{}, false},
		{"ro ot@web1", Target{}, false},
		{"root@-web1", Target{}, false},
		{"root@web/1", Target{}, false},
		{"-oProxyCommand=x@web1", Target{}, false},
	} {
		got, err := ParseTarget(tc.user)
		if tc.valid && (err != nil || got != tc.want) {
			t.Errorf("ParseTarget(%q) = %v, %v; want %v", tc.user, got, err, tc.want)
		}
		if !tc.valid && !errors.Is(err, ErrBadTarget) {
			t.Errorf("ParseTarget(%q) = %v, %v; want ErrBadTarget", tc.user, got, err)
		}
	}
}

func FuzzParseTarget(f *testing.F) {
	for _, s := range []string{"root@web1", "a@b@c", "@", "x@-y", "dev@db-2.prod"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, user string) {
		got, err := ParseTarget(user)
		if err != nil {
			return
		}
		if got.Login+"@"+got.VM != user || strings.ContainsAny(got.VM, "@/ \x00") || strings.HasPrefix(got.VM, "-") || strings.HasPrefix(got.Login, "-") {
			t.Fatalf("ParseTarget(%q) = %+v", user, got)
		}
	})
}

func TestFailureLimiter(t *testing.T) {
	now := time.Unix(1000, 0)
	l := newFailureLimiter(3, 10*time.Second)
	l.now = func() time.Time { return now }
	a := &net.TCPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 1}
	b := &net.TCPAddr{IP: net.IPv4(10, 0, 0, 2), Port: 1}
	for i := 0; i < 3; i++ {
		if l.Blocked(a) {
			t.Fatalf("blocked after %d failures", i)
		}
		l.Fail(&net.TCPAddr{IP: a.IP, Port: 1000 + i}) // any port of the same host
	}
	if !l.Blocked(a) {
		t.Fatal("not blocked after 3 failures")
	}
	if l.Blocked(b) {
		t.Fatal("another source blocked")
	}
	now = now.Add(10 * time.Second)
	if l.Blocked(a) {
		t.Fatal("still blocked after a refill")
	}
	l.Fail(a)
	if !l.Blocked(a) {
		t.Fatal("a refill gave more than one attempt")
	}
}

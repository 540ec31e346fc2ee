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
		if d := l.Delay(a); d != 0 {
			t.Fatalf("delayed %v after %d failures", d, i)
		}
		l.Fail(&net.TCPAddr{IP: a.IP, Port: 1000 + i}) // any port of the same host
	}
	if d := l.Delay(a); d != 10*time.Second {
		t.Fatalf("after 3 failures: delayed %v, want a refill's 10s", d)
	}
	if d := l.Delay(b); d != 0 {
		t.Fatalf("another source delayed %v", d)
	}
	now = now.Add(4 * time.Second)
	if d := l.Delay(a); d != 6*time.Second {
		t.Fatalf("4s later: delayed %v, want the 6s left", d)
	}
	now = now.Add(6 * time.Second)
	if d := l.Delay(a); d != 0 {
		t.Fatalf("after a refill: still delayed %v", d)
	}
	l.Fail(a)
	if l.Delay(a) == 0 {
		t.Fatal("a refill gave more than one attempt")
	}
}

func TestFailureLimiterCountsIPv6BySlash64(t *testing.T) {
	l := newFailureLimiter(1, time.Hour)
	l.Fail(&net.TCPAddr{IP: net.ParseIP("2001:db8:0:1::1")})
	if l.Delay(&net.TCPAddr{IP: net.ParseIP("2001:db8:0:1:ffff::2")}) == 0 {
		t.Fatal("another address of the same /64 was not slowed")
	}
	if l.Delay(&net.TCPAddr{IP: net.ParseIP("2001:db8:0:2::1")}) != 0 {
		t.Fatal("another /64 was slowed")
	}
}

func TestFailureLimiterIsBounded(t *testing.T) {
	now := time.Unix(1000, 0)
	l := newFailureLimiter(10, time.Second)
	l.now = func() time.Time { return now }
	l.maxSources = 100
	for i := 0; i < 1000; i++ {
		l.Fail(&net.TCPAddr{IP: net.IPv4(10, 1, byte(i>>8), byte(i))})
	}
	if n := len(l.buckets); n > 100 {
		t.Fatalf("%d sources remembered, want at most 100", n)
	}
	// Once their buckets have refilled, the old sources make room.
	now = now.Add(time.Minute)
	l.Fail(&net.TCPAddr{IP: net.IPv4(10, 2, 0, 1)})
	if _, ok := l.buckets[sourceOf(&net.TCPAddr{IP: net.IPv4(10, 2, 0, 1)})]; !ok || len(l.buckets) != 1 {
		t.Fatalf("after a prune: %d sources, the new one kept: %v", len(l.buckets), ok)
	}
}

func TestClipCutsClientText(t *testing.T) {
	long := strings.Repeat("a", 200<<10)
	if got := clip(long); len(got) > 100 || !strings.Contains(got, "204800 bytes") {
		t.Fatalf("clip of 200 KiB: %d bytes: %.120s", len(got), got)
	}
	if got := clip("ro\not\x1b[2J"); got != `"ro\not\x1b[2J"` {
		t.Fatalf("control characters: %s", got)
	}
	if _, err := ParseTarget(long + "@web1"); err == nil || len(err.Error()) > 200 {
		t.Fatalf("ParseTarget of a 200 KiB login: %d bytes of error", len(err.Error()))
	}
}

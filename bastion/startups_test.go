package bastion

import (
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"log/slog"
	"net"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"
)

func tcp(ip string) net.Addr { return &net.TCPAddr{IP: net.ParseIP(ip), Port: 40000} }

func TestParseMaxStartups(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want MaxStartups
		ok   bool
	}{
		{"10:30:100", MaxStartups{10, 30, 100}, true},
		{"5", MaxStartups{5, 100, 5}, true},
		{"1:0:1", MaxStartups{1, 0, 1}, true},
		{"10:30", MaxStartups{}, false},
		{"10:130:100", MaxStartups{}, false},
		{"10:30:5", MaxStartups{}, false},
		{"0:30:100", MaxStartups{}, false},
		{"a:b:c", MaxStartups{}, false},
		{"", MaxStartups{}, false},
		{"-1", MaxStartups{}, false},
	} {
		got, err := ParseMaxStartups(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseMaxStartups(%q) = %v, %v; want %v ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func TestStartupsPerSourceCap(t *testing.T) {
	s := newStartups(MaxStartups{10, 30, 100}, 3)
	var releases []func()
	for i := 0; i < 3; i++ {
		r, err := s.admit(tcp("192.0.2.1"), 0)
		if err != nil {
			t.Fatalf("connection %d refused: %v", i+1, err)
		}
		releases = append(releases, r)
	}
	if _, err := s.admit(tcp("192.0.2.1"), 0); !errors.Is(err, errSourceFull) {
		t.Fatalf("a fourth from one address: %v, want refused", err)
	}
	if _, err := s.admit(tcp("192.0.2.2"), 0); err != nil {
		t.Fatalf("another address refused: %v", err)
	}
	releases[0]()
	releases[0]() // a second release gives nothing back twice
	if _, err := s.admit(tcp("192.0.2.1"), 0); err != nil {
		t.Fatalf("after one authenticated or closed: %v", err)
	}
	if _, err := s.admit(tcp("192.0.2.1"), 0); !errors.Is(err, errSourceFull) {
		t.Fatalf("a release was counted twice: %v", err)
	}
}

func TestStartupsIPv6CountedBySlash64(t *testing.T) {
	s := newStartups(MaxStartups{10, 30, 100}, 2)
	s.admit(tcp("2001:db8:1:2::1"), 0)
	s.admit(tcp("2001:db8:1:2:ffff::9"), 0)
	if _, err := s.admit(tcp("2001:db8:1:2:abcd::1"), 0); !errors.Is(err, errSourceFull) {
		t.Fatalf("a third address of one /64: %v, want refused", err)
	}
	if _, err := s.admit(tcp("2001:db8:1:3::1"), 0); err != nil {
		t.Fatalf("the next /64: %v", err)
	}
	// An IPv4-mapped address is the IPv4 address.
	s.admit(tcp("192.0.2.7"), 0)
	s.admit(tcp("::ffff:192.0.2.7"), 0)
	if _, err := s.admit(tcp("192.0.2.7"), 0); !errors.Is(err, errSourceFull) {
		t.Fatalf("a v4-mapped address counted apart: %v", err)
	}
}

func TestStartupsRandomEarlyDrop(t *testing.T) {
	s := newStartups(MaxStartups{2, 50, 4}, 0)
	roll := 0
	s.roll = func() int { return roll }
	s.admit(tcp("192.0.2.1"), 0)
	s.admit(tcp("192.0.2.1"), 0)
	// Two held: at start, a roll below 50 drops a busy source...
	roll = 49
	if _, err := s.admit(tcp("192.0.2.1"), 0); !errors.Is(err, errStartupsFull) {
		t.Fatalf("roll 49 at start: %v, want dropped", err)
	}
	// ...and a roll of 50 or more lets it in.
	roll = 50
	if _, err := s.admit(tcp("192.0.2.1"), 0); err != nil {
		t.Fatalf("roll 50 at start: %v", err)
	}
	// Three held: the chance is 75%; a new source's first is spared.
	roll = 0
	if _, err := s.admit(tcp("192.0.2.9"), 0); err != nil {
		t.Fatalf("a quiet source's first connection was dropped: %v", err)
	}
	// Four held: full; everyone is refused.
	roll = 99
	if _, err := s.admit(tcp("192.0.2.10"), 0); !errors.Is(err, errStartupsFull) {
		t.Fatalf("at full: %v, want refused", err)
	}
	if total, from := s.counts(tcp("192.0.2.1")); total != 4 || from != 3 {
		t.Fatalf("counts %d, %d; want 4 in all, 3 from the busy source", total, from)
	}
}

func TestRenewingCertRenewsNearItsEnd(t *testing.T) {
	issued := 0
	r, err := newRenewingCert(func(v time.Duration) (gossh.Signer, error) {
		issued++
		if v != frontCertValidity {
			t.Errorf("validity %v, want %v", v, frontCertValidity)
		}
		_, priv, _ := ed25519.GenerateKey(rand.Reader)
		return gossh.NewSignerFromKey(priv)
	}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	first := r.PublicKey()
	if issued != 1 || string(r.PublicKey().Marshal()) != string(first.Marshal()) {
		t.Fatalf("issued %d; the key changed before its renewal", issued)
	}
	r.renewAt = time.Now().Add(-time.Second)
	if r.PublicKey(); issued != 2 {
		t.Fatalf("issued %d after the renewal time, want 2", issued)
	}
}

func TestStartupsSourceAtItsCapWaitsItsTurn(t *testing.T) {
	s := newStartups(MaxStartups{10, 30, 100}, 1)
	first, err := s.admit(tcp("192.0.2.1"), 0)
	if err != nil {
		t.Fatal(err)
	}
	// Four may wait for each place.
	got := make(chan error, 4)
	for i := 0; i < 4; i++ {
		go func() {
			_, err := s.admit(tcp("192.0.2.1"), 10*time.Second)
			got <- err
		}()
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		s.mu.Lock()
		n := s.waiting[sourceOf(tcp("192.0.2.1"))]
		s.mu.Unlock()
		if n == 4 || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	// A fifth is refused at once.
	if _, err := s.admit(tcp("192.0.2.1"), 10*time.Second); !errors.Is(err, errSourceFull) {
		t.Fatalf("a fifth waiter: %v, want refused", err)
	}
	// A place frees: one of the waiters takes it.
	first()
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("the first waiter to finish: %v, want it let in", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no waiter was let in when a place freed")
	}
}

// TestLogPacing lets a burst through, then about logPerSecond a second, and
// counts what it held back.
func TestLogPacing(t *testing.T) {
	var e logPacer
	let := 0
	for range 1000 {
		if ok, _ := e.allow(); ok {
			let++
		}
	}
	if let < logBurst || let > logBurst+logPerSecond {
		t.Fatalf("%d of 1000 at once let through, want the burst of %d", let, logBurst)
	}
	time.Sleep(300 * time.Millisecond)
	ok, skipped := e.allow()
	if !ok || skipped < 1000-let-1 {
		t.Fatalf("after 300ms: ok %v, skipped %d (held back %d)", ok, skipped, 1000-let)
	}
}

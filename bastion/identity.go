package bastion

import (
	"fmt"
	"net"
	"sync"
	"time"

	gossh "golang.org/x/crypto/ssh"
)

// Account is a person who may log in to the bastion.
type Account struct {
	Name   string
	Groups []string
	Keys   []gossh.PublicKey
}

// AccountSet maps public keys to accounts. It is immutable once built.
type AccountSet struct {
	byKey map[string]*Account // by the key's wire encoding
}

// NewAccountSet indexes accounts by key. A key listed for two accounts, or
// two accounts with one name, is an error: one key maps to one account.
func NewAccountSet(accounts []Account) (*AccountSet, error) {
	set := &AccountSet{byKey: make(map[string]*Account)}
	names := make(map[string]bool)
	for i := range accounts {
		a := &accounts[i]
		if a.Name == "" {
			return nil, fmt.Errorf("account #%d has no name", i+1)
		}
		if names[a.Name] {
			return nil, fmt.Errorf("account %q is defined twice", a.Name)
		}
		names[a.Name] = true
		for _, k := range a.Keys {
			if other, ok := set.byKey[string(k.Marshal())]; ok {
				return nil, fmt.Errorf("key %s is listed for both %q and %q; one key maps to one account",
					gossh.FingerprintSHA256(k), other.Name, a.Name)
			}
			set.byKey[string(k.Marshal())] = a
		}
	}
	return set, nil
}

// Identify returns the account holding key.
func (s *AccountSet) Identify(key gossh.PublicKey) (Account, bool) {
	if s == nil {
		return Account{}, false
	}
	a, ok := s.byKey[string(key.Marshal())]
	if !ok {
		return Account{}, false
	}
	return *a, true
}

// failureLimiter counts failed authentication attempts per source address
// with a token bucket: burst failures at once, then one per refill. The zero
// value is not usable; see newFailureLimiter.
type failureLimiter struct {
	burst  float64
	refill time.Duration
	now    func() time.Time

	mu      sync.Mutex // protects buckets
	buckets map[string]*bucket
}

type bucket struct {
	tokens float64
	last   time.Time
}

func newFailureLimiter(burst int, refill time.Duration) *failureLimiter {
	return &failureLimiter{burst: float64(burst), refill: refill, now: time.Now, buckets: make(map[string]*bucket)}
}

func hostOf(addr net.Addr) string {
	if tcp, ok := addr.(*net.TCPAddr); ok {
		return tcp.IP.String()
	}
	host, _, err := net.SplitHostPort(addr.String())
	if err != nil {
		return addr.String()
	}
	return host
}

// Blocked reports whether addr has used up its failures.
func (l *failureLimiter) Blocked(addr net.Addr) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.take(hostOf(addr))
	return b.tokens < 1
}

// Fail records one failed attempt from addr.
func (l *failureLimiter) Fail(addr net.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.take(hostOf(addr))
	if b.tokens >= 1 {
		b.tokens--
	}
}

// take returns host's bucket refilled to now. l.mu must be held.
func (l *failureLimiter) take(host string) *bucket {
	now := l.now()
	b, ok := l.buckets[host]
	if !ok {
		if len(l.buckets) > 10000 {
			l.prune(now)
		}
		b = &bucket{tokens: l.burst, last: now}
		l.buckets[host] = b
		return b
	}
	b.tokens = min(l.burst, b.tokens+float64(now.Sub(b.last))/float64(l.refill))
	b.last = now
	return b
}

// prune drops buckets that have refilled completely. l.mu must be held.
func (l *failureLimiter) prune(now time.Time) {
	full := time.Duration(l.burst) * l.refill
	for host, b := range l.buckets {
		if now.Sub(b.last) >= full {
			delete(l.buckets, host)
		}
	}
}

package bastion

import (
	"fmt"
	"net"
	"net/netip"
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

// failureLimiter counts connections that failed to authenticate, per
// source (an IPv4 address or an IPv6 /64), with a token bucket: burst
// failures at once, then one per refill. A source out of tokens is slowed
// down, not shut out: its next connection waits for a token (see Delay),
// so one noisy neighbour behind a shared address costs the others seconds,
// not access. It remembers at most maxSources sources. The zero value is
// not usable; see newFailureLimiter.
type failureLimiter struct {
	burst      float64
	refill     time.Duration
	maxSources int
	now        func() time.Time

	mu        sync.Mutex // protects buckets and lastPrune
	buckets   map[netip.Prefix]*bucket
	lastPrune time.Time
}

type bucket struct {
	tokens float64
	last   time.Time
}

func newFailureLimiter(burst int, refill time.Duration) *failureLimiter {
	return &failureLimiter{burst: float64(burst), refill: refill, maxSources: 10000, now: time.Now,
		buckets: make(map[netip.Prefix]*bucket)}
}

// Delay is how long a new connection from addr waits before its key
// exchange: until its source has a failure to spend again; 0 for most.
func (l *failureLimiter) Delay(addr net.Addr) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.take(sourceOf(addr))
	if b.tokens >= 1 {
		return 0
	}
	return time.Duration((1 - b.tokens) * float64(l.refill))
}

// Fail records that a connection from addr ended without authenticating
// after at least one refused attempt.
func (l *failureLimiter) Fail(addr net.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.take(sourceOf(addr))
	b.tokens = max(0, b.tokens-1)
}

// take returns src's bucket refilled to now. A source seen for the first
// time while maxSources are remembered gets a full bucket that is not
// kept, once forgetting the full buckets has not made room; that scan
// runs at most once a refill, so a spray of sources costs no more than
// one scan per refill. l.mu must be held.
func (l *failureLimiter) take(src netip.Prefix) *bucket {
	now := l.now()
	b, ok := l.buckets[src]
	if !ok {
		b = &bucket{tokens: l.burst, last: now}
		if len(l.buckets) >= l.maxSources && now.Sub(l.lastPrune) >= l.refill {
			l.prune(now)
		}
		if len(l.buckets) < l.maxSources {
			l.buckets[src] = b
		}
		return b
	}
	b.tokens = min(l.burst, b.tokens+float64(now.Sub(b.last))/float64(l.refill))
	b.last = now
	return b
}

// prune forgets buckets that have refilled completely. l.mu must be held.
func (l *failureLimiter) prune(now time.Time) {
	l.lastPrune = now
	full := time.Duration(l.burst) * l.refill
	for src, b := range l.buckets {
		if now.Sub(b.last) >= full {
			delete(l.buckets, src)
		}
	}
}

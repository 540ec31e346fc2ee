package bastion

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/policy"
)

// Account is a person who may log in to the bastion.
type Account struct {
	Name   string
	Groups []string
	Keys   []gossh.PublicKey
	// KeyOptions holds the options a key was listed with, by the key's
	// SHA256 fingerprint; a key without an entry has none.
	KeyOptions map[string]KeyOptions
}

// KeyOptions are the authorized_keys options the bastion honours on an
// account's key (ParseKeyOptions refuses the others).
type KeyOptions struct {
	// From is OpenSSH's from= pattern list, by address only: CIDR
	// prefixes and address globs ("*", "?"), each negated by a leading
	// "!". A negated match refuses; otherwise one match lets the key in.
	// Empty means from anywhere.
	From []string
	// Expires is expiry-time=: the key is refused from then on. Zero
	// means never.
	Expires time.Time
}

// Allows reports why the key may not log in from source at now, or nil.
func (o KeyOptions) Allows(source netip.Addr, now time.Time) error {
	if !o.Expires.IsZero() && !now.Before(o.Expires) {
		return fmt.Errorf("key expired at %s", o.Expires.UTC().Format(time.RFC3339))
	}
	if len(o.From) == 0 {
		return nil
	}
	source = source.Unmap()
	allowed := false
	for _, p := range o.From {
		negated := strings.HasPrefix(p, "!")
		if matchFrom(strings.TrimPrefix(p, "!"), source) {
			if negated {
				return fmt.Errorf("key refused from %s by from=%q", source, p)
			}
			allowed = true
		}
	}
	if !allowed {
		return fmt.Errorf("key not allowed from %s (from=%q)", source, strings.Join(o.From, ","))
	}
	return nil
}

// matchFrom matches one from= pattern (not negated) against an address.
func matchFrom(pattern string, addr netip.Addr) bool {
	if prefix, err := netip.ParsePrefix(pattern); err == nil {
		return prefix.Masked().Contains(addr)
	}
	return policy.Glob(strings.ToLower(pattern), addr.String())
}

// ParseKeyOptions reads the options of an authorized_keys line as the
// bastion honours them: from= (addresses and prefixes only: the bastion
// does not resolve names) and expiry-time=. Any other option would be a
// promise the bastion does not keep (command=, restrict, no-pty,
// permitopen=, cert-authority, ...), so it is an error.
func ParseKeyOptions(options []string) (KeyOptions, error) {
	var o KeyOptions
	for _, opt := range options {
		name, value, hasValue := strings.Cut(opt, "=")
		value = strings.Trim(value, `"`)
		switch {
		case strings.EqualFold(name, "from") && hasValue:
			for _, p := range strings.Split(value, ",") {
				bare := strings.TrimPrefix(p, "!")
				if _, err := netip.ParsePrefix(bare); err == nil {
					o.From = append(o.From, p)
					continue
				}
				if bare == "" || strings.Trim(strings.ToLower(bare), "0123456789abcdef.:*?") != "" {
					return KeyOptions{}, fmt.Errorf("from=: %q is not an address, a prefix or an address pattern (the bastion does not resolve host names)", p)
				}
				o.From = append(o.From, p)
			}
		case strings.EqualFold(name, "expiry-time") && hasValue:
			t, err := parseExpiryTime(value)
			if err != nil {
				return KeyOptions{}, err
			}
			o.Expires = t
		default:
			return KeyOptions{}, fmt.Errorf("option %s is not supported on account keys (only from= and expiry-time= are)", name)
		}
	}
	return o, nil
}

// parseExpiryTime reads expiry-time= as sshd does: YYYYMMDD or
// YYYYMMDDHHMM[SS], in local time unless it ends in Z.
func parseExpiryTime(v string) (time.Time, error) {
	loc := time.Local
	if strings.HasSuffix(v, "Z") || strings.HasSuffix(v, "z") {
		v, loc = v[:len(v)-1], time.UTC
	}
	for _, layout := range []string{"20060102", "200601021504", "20060102150405"} {
		if len(v) == len(layout) {
			if t, err := time.ParseInLocation(layout, v, loc); err == nil {
				return t, nil
			}
		}
	}
	return time.Time{}, fmt.Errorf("expiry-time=%q is not YYYYMMDD[HHMM[SS]][Z]", v)
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

// Options are the options key was listed with in a.
func (a Account) Options(key gossh.PublicKey) KeyOptions {
	return a.KeyOptions[gossh.FingerprintSHA256(key)]
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

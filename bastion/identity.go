package bastion

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/keys"
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
	byKey   map[string]*Account // by the key's wire encoding
	byName  map[string]*Account
	cas     []UserCA
	revoked *keys.KRL
}

// NewAccountSet indexes accounts by key. A key listed for two accounts, or
// two accounts with one name, is an error: one key maps to one account.
func NewAccountSet(accounts []Account) (*AccountSet, error) {
	set := &AccountSet{byKey: make(map[string]*Account), byName: make(map[string]*Account)}
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
		set.byName[a.Name] = a
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

// fill brings b up to now: a token each refill, at most capacity.
func (b *bucket) fill(now time.Time, capacity float64, refill time.Duration) {
	b.tokens = min(capacity, b.tokens+float64(now.Sub(b.last))/float64(refill))
	b.last = now
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
	b.fill(now, l.burst, l.refill)
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

// UserCA is a certificate authority whose user certificates log people in
// ([[user_ca]]): an SSO's issuer, Vault's SSH engine, or ssh-keygen -s.
type UserCA struct {
	Key gossh.PublicKey
	// Principals maps the certificates' principals to account names; nil
	// means a principal is an account's name.
	Principals map[string]string
}

// CertLogin is what the certificate a connection logged in with says of
// it: who issued it to whom, and what it restricts.
type CertLogin struct {
	KeyID        string
	Serial       uint64
	Principal    string // the one that named the account
	ForceCommand string // force-command: every session runs this instead
	Extensions   map[string]string
}

// Permits reports whether the certificate grants the permit-* extension
// name (permit-pty, permit-port-forwarding, ...). A nil CertLogin (a
// plain key) permits everything.
func (c *CertLogin) Permits(name string) bool {
	if c == nil {
		return true
	}
	_, ok := c.Extensions[name]
	return ok
}

// certOptions are the critical options the bastion honours; a certificate
// with any other is refused, as OpenSSH's sshd does.
var certOptions = []string{"source-address", "force-command"}

// SetCertificates makes s take user certificates from cas, and refuse the
// keys and certificates revoked lists. Call it before s is used.
func (s *AccountSet) SetCertificates(cas []UserCA, revoked *keys.KRL) {
	s.cas, s.revoked = cas, revoked
}

// Revoked reports why key is revoked (the KRL of SetCertificates lists
// it), or "".
func (s *AccountSet) Revoked(key gossh.PublicKey) string {
	if s == nil {
		return ""
	}
	return s.revoked.Revoked(key)
}

// IdentifyCert returns the account a user certificate names. account is
// the account the client asked for by user name, or "" when the user name
// is a target (login@vm), in which case the certificate must name exactly
// one account. It checks the certificate as sshd does: a known CA, its
// signature, its validity at now, no critical option but source-address
// (which source must match) and force-command, not revoked.
func (s *AccountSet) IdentifyCert(cert *gossh.Certificate, account string, source netip.Addr, now time.Time) (Account, *CertLogin, error) {
	if s == nil {
		return Account{}, nil, errors.New("no accounts")
	}
	if cert.CertType != gossh.UserCert {
		return Account{}, nil, errors.New("certificate: a host certificate offered as a user's")
	}
	var ca *UserCA
	for i := range s.cas {
		if bytes.Equal(s.cas[i].Key.Marshal(), cert.SignatureKey.Marshal()) {
			ca = &s.cas[i]
			break
		}
	}
	if ca == nil {
		return Account{}, nil, fmt.Errorf("certificate signed by a CA that is not a [[user_ca]] (%s)", gossh.FingerprintSHA256(cert.SignatureKey))
	}
	if len(cert.ValidPrincipals) == 0 {
		return Account{}, nil, errors.New("certificate names no principals")
	}
	principalOf := make(map[string]string)
	var names []string
	for _, p := range cert.ValidPrincipals {
		name := p
		if ca.Principals != nil {
			var ok bool
			if name, ok = ca.Principals[p]; !ok {
				continue
			}
		}
		if _, ok := s.byName[name]; ok && principalOf[name] == "" {
			principalOf[name] = p
			names = append(names, name)
		}
	}
	principals := strings.Join(cert.ValidPrincipals, ",")
	switch {
	case account != "":
		if principalOf[account] == "" {
			return Account{}, nil, fmt.Errorf("certificate %q does not name account %q (principals %s)", cert.KeyId, account, clipText(principals))
		}
	case len(names) == 0:
		return Account{}, nil, fmt.Errorf("certificate %q names no account of this bastion (principals %s)", cert.KeyId, clipText(principals))
	case len(names) > 1:
		return Account{}, nil, fmt.Errorf("certificate %q names the accounts %s; log in as one of them (ACCOUNT@bastion)", cert.KeyId, strings.Join(names, ", "))
	default:
		account = names[0]
	}
	checker := gossh.CertChecker{
		IsUserAuthority:          func(auth gossh.PublicKey) bool { return bytes.Equal(auth.Marshal(), ca.Key.Marshal()) },
		SupportedCriticalOptions: certOptions,
		Clock:                    func() time.Time { return now },
	}
	if err := checker.CheckCert(principalOf[account], cert); err != nil {
		return Account{}, nil, fmt.Errorf("certificate %q: %s", cert.KeyId, strings.TrimPrefix(err.Error(), "ssh: "))
	}
	if why := s.revoked.Revoked(cert); why != "" {
		return Account{}, nil, fmt.Errorf("certificate %q: %s", cert.KeyId, why)
	}
	if list, ok := cert.CriticalOptions["source-address"]; ok {
		if err := sourceAllowed(list, source); err != nil {
			return Account{}, nil, fmt.Errorf("certificate %q: %w", cert.KeyId, err)
		}
	}
	return *s.byName[account], &CertLogin{KeyID: cert.KeyId, Serial: cert.Serial, Principal: principalOf[account],
		ForceCommand: cert.CriticalOptions["force-command"], Extensions: cert.Extensions}, nil
}

// sourceAllowed checks source against a certificate's source-address: a
// comma-separated list of addresses and CIDR ranges.
func sourceAllowed(list string, source netip.Addr) error {
	source = source.Unmap()
	for _, item := range strings.Split(list, ",") {
		item = strings.TrimSpace(item)
		if p, err := netip.ParsePrefix(item); err == nil {
			if p.Masked().Contains(source) {
				return nil
			}
			continue
		}
		if a, err := netip.ParseAddr(item); err == nil {
			if a.Unmap() == source {
				return nil
			}
			continue
		}
		return fmt.Errorf("source-address %q is not a list of addresses and CIDR ranges", clipText(list))
	}
	return fmt.Errorf("source-address %s does not include %s", clipText(list), source)
}

// clipText cuts s, which a certificate's issuer chose, for a message.
func clipText(s string) string {
	if len(s) > 200 {
		return s[:200] + "…"
	}
	return s
}

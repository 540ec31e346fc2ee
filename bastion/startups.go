package bastion

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// MaxStartups caps unauthenticated connections as OpenSSH's sshd does:
// from Start of them on, a new one is refused with a probability that
// rises from Rate percent to 100 at Full; at Full every new one is refused.
type MaxStartups struct{ Start, Rate, Full int }

// DefaultMaxStartups is OpenSSH's default, 10:30:100.
var DefaultMaxStartups = MaxStartups{Start: 10, Rate: 30, Full: 100}

// ParseMaxStartups reads "start:rate:full", or a lone "n" meaning n:100:n
// (every connection past n refused), as sshd_config's MaxStartups does.
func ParseMaxStartups(s string) (MaxStartups, error) {
	bad := func(why string) (MaxStartups, error) {
		return MaxStartups{}, fmt.Errorf("%q is not start:rate:full (like \"10:30:100\"): %s", s, why)
	}
	parts := strings.Split(s, ":")
	var n []int
	for _, p := range parts {
		v, err := strconv.Atoi(p)
		if err != nil || v < 0 {
			return bad("not a number")
		}
		n = append(n, v)
	}
	switch len(n) {
	case 1:
		if n[0] < 1 {
			return bad("at least one connection must be let in")
		}
		return MaxStartups{Start: n[0], Rate: 100, Full: n[0]}, nil
	case 3:
		m := MaxStartups{Start: n[0], Rate: n[1], Full: n[2]}
		switch {
		case m.Start < 1:
			return bad("start must be at least 1")
		case m.Rate > 100:
			return bad("rate is a percentage, at most 100")
		case m.Full < m.Start:
			return bad("full must not be below start")
		}
		return m, nil
	}
	return bad("three numbers separated by ':'")
}

func (m MaxStartups) String() string { return fmt.Sprintf("%d:%d:%d", m.Start, m.Rate, m.Full) }

// waitingPerPlace is how many connections of a source at its cap may wait
// for each of its places.
const waitingPerPlace = 4

// errStartupsFull and errSourceFull say why a connection was refused
// before its key exchange.
var (
	errStartupsFull = errors.New("too many unauthenticated connections")
	errSourceFull   = errors.New("too many unauthenticated connections from this source")
)

// startups counts unauthenticated connections, in all and by source, and
// decides at accept whether a new one may start its key exchange. A source
// is an IPv4 address or an IPv6 /64, so that one host cannot spread itself
// over the addresses of its network.
type startups struct {
	max       MaxStartups
	perSource int        // 0 means no cap per source
	roll      func() int // a number in [0, 100); replaced by tests
	mu        sync.Mutex // protects the fields below
	total     int        // unauthenticated connections
	bySource  map[netip.Prefix]int
	waiting   map[netip.Prefix]int // connections waiting for a place, by source
	changed   chan struct{}        // closed, and replaced, when a place frees
}

func newStartups(max MaxStartups, perSource int) *startups {
	return &startups{max: max, perSource: perSource, roll: func() int { return rand.IntN(100) },
		bySource: make(map[netip.Prefix]int), waiting: make(map[netip.Prefix]int), changed: make(chan struct{})}
}

// admit decides about a new connection from addr. Admitted, the
// connection holds its place until release is called (once it has
// authenticated, or closed), which may be called more than once.
//
// A source at its cap waits, without starting its key exchange, for one
// of its places to free, for up to wait: a burst of logins from one
// machine (Ansible, a script of parallel ssh -J) goes through in turn.
// Four times as many may wait as may hold places (a waiting connection
// costs a socket and a goroutine, no SSH state); past that, it is refused.
//
// Random early drop spares a source's first connection: a person behind
// an address that holds none is let in until Full, so a flood from other
// sources (each held to the per-source cap) does not lock them out.
func (s *startups) admit(addr net.Addr, wait time.Duration) (release func(), err error) {
	src := sourceOf(addr)
	s.mu.Lock()
	defer s.mu.Unlock()
	var deadline <-chan time.Time
	for s.perSource > 0 && s.bySource[src] >= s.perSource {
		if deadline == nil {
			if s.waiting[src] >= waitingPerPlace*s.perSource {
				return nil, errSourceFull
			}
			t := time.NewTimer(wait)
			defer t.Stop()
			deadline = t.C
			s.waiting[src]++
			defer func() {
				if s.waiting[src]--; s.waiting[src] <= 0 {
					delete(s.waiting, src)
				}
			}()
		}
		changed := s.changed
		s.mu.Unlock()
		select {
		case <-changed:
			s.mu.Lock()
		case <-deadline:
			s.mu.Lock()
			return nil, errSourceFull
		}
	}
	held := s.bySource[src]
	switch {
	case s.total >= s.max.Full:
		return nil, errStartupsFull
	case s.total >= s.max.Start && held > 0 && s.roll() < s.dropPercent():
		return nil, errStartupsFull
	}
	s.total++
	s.bySource[src]++
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			s.total--
			if s.bySource[src]--; s.bySource[src] <= 0 {
				delete(s.bySource, src)
			}
			close(s.changed) // wake the waiting; they look again
			s.changed = make(chan struct{})
		})
	}, nil
}

// dropPercent is the chance, in percent, that a new connection is refused
// with s.total unauthenticated ones: Rate at Start, rising linearly to 100
// at Full. s.mu must be held.
func (s *startups) dropPercent() int {
	if s.max.Full == s.max.Start {
		return 100
	}
	return s.max.Rate + (100-s.max.Rate)*(s.total-s.max.Start)/(s.max.Full-s.max.Start)
}

// counts reports the unauthenticated connections, in all and from addr.
// unauthenticated is how many connections hold places now.
func (s *startups) unauthenticated() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.total
}

func (s *startups) counts(addr net.Addr) (total, fromSource int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.total, s.bySource[sourceOf(addr)]
}

// sourceOf is the source a connection is counted under: its IPv4 address,
// or the /64 of its IPv6 address.
func sourceOf(addr net.Addr) netip.Prefix {
	var ip netip.Addr
	if tcp, ok := addr.(*net.TCPAddr); ok {
		ip, _ = netip.AddrFromSlice(tcp.IP)
	} else if ap, err := netip.ParseAddrPort(addr.String()); err == nil {
		ip = ap.Addr()
	}
	ip = ip.Unmap()
	bits := 32
	if ip.Is6() {
		bits = 64
	}
	p, _ := ip.Prefix(bits)
	return p
}

// counter counts things in use against a cap. The zero value counts from
// zero.
type counter struct{ n atomic.Int64 }

// take counts one more unless max are in use already.
func (c *counter) take(max int) bool {
	if c.n.Add(1) > int64(max) {
		c.n.Add(-1)
		return false
	}
	return true
}

// give counts one fewer.
func (c *counter) give() { c.n.Add(-1) }

// logPacer lets a repeated log line through about logPerSecond times a
// second, after a burst of up to logBurst, and says how many were held
// back meanwhile: a flood of refused connections must not become a flood
// of log lines, yet people trying keys and certificates are all on record.
type logPacer struct {
	mu      sync.Mutex
	b       bucket // unused until the first line: then full
	skipped int
}

const (
	logPerSecond = 10
	logBurst     = 50
)

// allow reports whether to log now, and how many lines were skipped since
// the last one.
func (e *logPacer) allow() (ok bool, skipped int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if now := time.Now(); e.b.last.IsZero() {
		e.b = bucket{tokens: logBurst, last: now}
	} else {
		e.b.fill(now, logBurst, time.Second/logPerSecond)
	}
	if e.b.tokens >= 1 {
		e.b.tokens--
		skipped, e.skipped = e.skipped, 0
		return true, skipped
	}
	e.skipped++
	return false, 0
}

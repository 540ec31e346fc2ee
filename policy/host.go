package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"path"
	"strconv"
	"strings"
)

// ErrBadHost is wrapped by the error of host text that CanonicalHost or
// CanonicalBind refuses. A forward to or bind on such a host is denied
// whatever the rules say.
var ErrBadHost = errors.New("invalid forward host")

// ErrBadPort refuses a forward to or from a port past 65535: SSH carries
// ports in 32 bits, and an sshd may bind one it wraps around.
var ErrBadPort = errors.New("invalid forward port")

// maxName is the longest host name, without its trailing dot (RFC 1035).
const maxName = 253

// Host is a forward's host text in canonical form: what the VM will make
// of it. Exactly one of Addr, Name and All is set.
type Host struct {
	// Addr is the address, when the text is one: IPv4 as glibc's
	// inet_aton reads it, IPv6 with its brackets and zone removed, a
	// v4-mapped IPv6 address as its IPv4 address.
	Addr netip.Addr
	// Zone is an IPv6 address's zone as written; matching ignores it.
	Zone string
	// Name is a host name, in lower case, without a trailing dot. The VM
	// resolves it, so it says nothing certain about where a forward goes.
	Name string
	// All is set by CanonicalBind for "" and "*": every address of the VM.
	All bool

	// absolute records that the name was written with a trailing dot.
	absolute bool
}

// String is the canonical form: an address in its usual text form (IPv6
// as RFC 5952 writes it, without a zone), a name, or "*" for every address.
func (h Host) String() string {
	switch {
	case h.Addr.IsValid():
		return h.Addr.String()
	case h.All:
		return "*"
	}
	return h.Name
}

// Loopback reports whether h is the VM itself in any form it may take:
// 127.0.0.0/8, ::1, the unspecified addresses 0.0.0.0 and :: (on Linux a
// connect to them reaches the local host), localhost, and names ending in
// .localhost (RFC 6761 reserves them for loopback). Deny rules treat all
// of these as loopback.
func (h Host) Loopback() bool {
	if h.Addr.IsValid() {
		return h.Addr.IsLoopback() || h.Addr.IsUnspecified()
	}
	return h.Name == "localhost" || strings.HasSuffix(h.Name, ".localhost")
}

// surelyLoopback is the part of Loopback an allow rule may rely on: the
// addresses, and "localhost" written without a trailing dot, which the
// VM's hosts file answers. A stock glibc resolver sends "localhost." and
// "x.localhost" to DNS, which may answer anything.
func (h Host) surelyLoopback() bool {
	if h.Addr.IsValid() {
		return h.Loopback()
	}
	return h.Name == "localhost" && !h.absolute
}

// CanonicalHost reads host, the destination of a local forward as a client
// sends it, as the VM will:
//
//   - IPv4 in any form glibc's inet_aton accepts: one to four parts, each
//     decimal, octal (a leading 0) or hexadecimal (0x), the last part
//     filling the remaining bytes ("127.1", "2130706433", "0x7f.1",
//     "0177.0.0.01" are all 127.0.0.1);
//   - IPv6, with or without brackets, with or without a %zone; a
//     v4-mapped address (::ffff:127.0.0.1) is its IPv4 address;
//   - otherwise a name, lower-cased, one trailing dot removed.
//
// It refuses, with an error wrapping ErrBadHost: empty text, text longer
// than a name can be, any byte but ASCII letters, digits and "-_.:[]%",
// brackets around anything but an IPv6 address, a colon or % outside one,
// empty labels or labels over 63 bytes, and names that look like
// addresses but are not (the last label all digits, as in "10.0.0.256",
// or text inet_aton reads once its trailing dot is gone, as in
// "0x7f000001.").
func CanonicalHost(host string) (Host, error) {
	bad := func(why string) (Host, error) {
		return Host{}, fmt.Errorf("%w %q: %s", ErrBadHost, host, why)
	}
	if host == "" {
		return bad("empty")
	}
	if len(host) > maxName+1 {
		return bad("longer than a host name can be")
	}
	for i := 0; i < len(host); i++ {
		c := host[i]
		if !nameByte(c) && !strings.ContainsRune(":[]%", rune(c)) {
			return bad(fmt.Sprintf("byte %q at %d is not a letter, digit or one of -_.:[]%%", c, i))
		}
	}
	text := host
	bracketed := strings.HasPrefix(text, "[")
	if bracketed {
		if !strings.HasSuffix(text, "]") {
			return bad("an opening bracket without a closing one")
		}
		text = text[1 : len(text)-1]
	}
	if strings.ContainsAny(text, "[]") {
		return bad("brackets only go around a whole IPv6 address")
	}
	if bracketed || strings.ContainsAny(text, ":%") {
		return canonicalIPv6(text, bad)
	}
	if a, ok := inetAton(text); ok {
		return Host{Addr: a}, nil
	}
	name := strings.ToLower(text)
	absolute := strings.HasSuffix(name, ".")
	if absolute {
		name = name[:len(name)-1]
	}
	if name == "" {
		return bad("no name")
	}
	if len(name) > maxName {
		return bad("a name is at most 253 bytes")
	}
	labels := strings.Split(name, ".")
	for _, label := range labels {
		if label == "" {
			return bad("an empty label")
		}
		if len(label) > 63 {
			return bad("a label is at most 63 bytes")
		}
	}
	if allDigits(labels[len(labels)-1]) {
		return bad("not an IPv4 address, and a name's last label is not all digits")
	}
	if _, ok := inetAton(name); ok {
		return bad("an address with a trailing dot is a name, which it cannot be")
	}
	return Host{Name: name, absolute: absolute}, nil
}

func canonicalIPv6(text string, bad func(string) (Host, error)) (Host, error) {
	addr, zone, hasZone := strings.Cut(text, "%")
	if hasZone {
		if zone == "" {
			return bad("an empty zone")
		}
		for i := 0; i < len(zone); i++ {
			if !nameByte(zone[i]) {
				return bad("a zone is letters, digits and -_.")
			}
		}
	}
	a, err := netip.ParseAddr(addr)
	if err != nil || !a.Is6() {
		return bad("not an IPv6 address")
	}
	return Host{Addr: a.Unmap(), Zone: strings.ToLower(zone)}, nil
}

// CanonicalBind reads host, the bind address of a remote forward, as the
// VM's sshd does: "" and "*" are every address (Host.All); anything else
// is read as CanonicalHost reads it. An unspecified address (0.0.0.0, ::,
// and so "0") is every address of its family.
func CanonicalBind(host string) (Host, error) {
	if host == "" || host == "*" {
		return Host{All: true}, nil
	}
	return CanonicalHost(host)
}

// inetAton reads s as glibc's inet_aton does (as getaddrinfo calls it,
// with nothing allowed after the address): one to four parts separated by
// dots, each starting with a digit and read as strtoul reads it with base
// 0 (0x or 0X hexadecimal, a leading 0 octal, otherwise decimal); every
// part but the last is one byte, the last fills the remaining bytes.
func inetAton(s string) (netip.Addr, bool) {
	var bytes [4]byte
	parts := 0
	for {
		if s == "" || !isDigit(s[0]) {
			return netip.Addr{}, false
		}
		val, rest, ok := strtoul(s)
		if !ok {
			return netip.Addr{}, false
		}
		s = rest
		if s == "" {
			// The last part: it fills the 4-parts bytes left.
			if val >= 1<<(8*(4-parts)) {
				return netip.Addr{}, false
			}
			for i := 3; i >= parts; i-- {
				bytes[i] = byte(val)
				val >>= 8
			}
			return netip.AddrFrom4(bytes), true
		}
		if s[0] != '.' || parts == 3 || val > 0xff {
			return netip.Addr{}, false
		}
		bytes[parts] = byte(val)
		parts++
		s = s[1:]
	}
}

// strtoul reads the number at the start of s, which starts with a digit,
// as C's strtoul with base 0: "0x" or "0X" followed by a hexadecimal digit
// starts a hexadecimal number (without the digit, only the "0" is read),
// another leading "0" an octal one. It fails for values over 32 bits,
// which inet_aton refuses.
func strtoul(s string) (val uint64, rest string, ok bool) {
	base, i := uint64(10), 0
	if s[0] == '0' {
		base = 8
		if len(s) > 2 && (s[1] == 'x' || s[1] == 'X') && hexValue(s[2]) < 16 {
			base, i = 16, 2
		}
	}
	for ; i < len(s); i++ {
		d := hexValue(s[i])
		if d >= base {
			break
		}
		val = val*base + d
		if val > 0xffffffff {
			return 0, "", false
		}
	}
	return val, s[i:], true
}

func hexValue(c byte) uint64 {
	switch {
	case isDigit(c):
		return uint64(c - '0')
	case 'a' <= c && c <= 'f':
		return uint64(c-'a') + 10
	case 'A' <= c && c <= 'F':
		return uint64(c-'A') + 10
	}
	return 99
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }

// nameByte reports whether c may appear in a host name: ASCII letters,
// digits, '-', '_' and '.'.
func nameByte(c byte) bool {
	return isDigit(c) || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || c == '-' || c == '_' || c == '.'
}

func allDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if !isDigit(s[i]) {
			return false
		}
	}
	return s != ""
}

// hostEntry is one forward_hosts entry, compiled.
type hostEntry struct {
	kind   entryKind
	prefix netip.Prefix // entryPrefix
	glob   string       // entryGlob: lower case, no trailing dot
}

type entryKind int

const (
	entryBad      entryKind = iota // did not compile: no allow rule matches, every deny rule does
	entryAny                       // "*": any host, any address, any bind
	entryLoopback                  // "localhost": the VM's loopback in every form
	entryPrefix                    // an address or CIDR prefix: addresses only
	entryGlob                      // a name glob: names only
)

// parseHostEntry compiles a forward_hosts entry. An address or CIDR prefix
// matches addresses; "localhost" the VM's loopback; "*" anything; any
// other entry is a glob on names. Entries that look like addresses but
// are not in the form netip reads (a partial address with a wildcard, an
// inet_aton form, a bad prefix) are errors, so that no entry silently
// matches nothing, or names where an address was meant.
func parseHostEntry(s string) (hostEntry, error) {
	if s == "*" {
		return hostEntry{kind: entryAny}, nil
	}
	lower := strings.ToLower(s)
	if lower == "localhost" || lower == "localhost." {
		return hostEntry{kind: entryLoopback}, nil
	}
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return hostEntry{}, fmt.Errorf("%q is not a CIDR prefix like \"10.0.0.0/16\" or \"fd00::/8\"", s)
		}
		return hostEntry{kind: entryPrefix, prefix: unmapPrefix(p.Masked())}, nil
	}
	if a, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")); err == nil {
		if a.Zone() != "" {
			return hostEntry{}, fmt.Errorf("%q: write the address without its zone, which is not matched", s)
		}
		a = a.Unmap()
		return hostEntry{kind: entryPrefix, prefix: netip.PrefixFrom(a, a.BitLen())}, nil
	}
	if strings.ContainsAny(s, ":[]%") {
		return hostEntry{}, fmt.Errorf("%q is not an IPv6 address or prefix", s)
	}
	wild := strings.ContainsAny(s, "*?")
	if wild && strings.Trim(s, "0123456789.*?") == "" {
		return hostEntry{}, fmt.Errorf("%q looks like part of an IP address, but a glob matches only names, never addresses: write a CIDR prefix such as %q", s, suggestPrefix(s))
	}
	for i := 0; i < len(s); i++ {
		if !nameByte(s[i]) && s[i] != '*' && s[i] != '?' {
			return hostEntry{}, fmt.Errorf("%q: a name glob is letters, digits, -_. and the wildcards * and ?", s)
		}
	}
	if !wild {
		h, err := CanonicalHost(s)
		if err != nil {
			return hostEntry{}, fmt.Errorf("%q is not an address, a CIDR prefix or a host name", s)
		}
		if h.Addr.IsValid() {
			return hostEntry{}, fmt.Errorf("%q is an address in a form the rules do not take: write %q", s, h.Addr.String())
		}
	}
	return hostEntry{kind: entryGlob, glob: strings.TrimSuffix(lower, ".")}, nil
}

// suggestPrefix turns a partial IPv4 glob such as "10.0.*" into the CIDR
// prefix it was probably meant as, "10.0.0.0/16".
func suggestPrefix(glob string) string {
	var octets []string
	for _, part := range strings.Split(glob, ".") {
		n, err := strconv.ParseUint(part, 10, 8)
		if err != nil {
			break
		}
		octets = append(octets, strconv.FormatUint(n, 10))
	}
	if len(octets) == 0 || len(octets) > 3 {
		return "10.0.0.0/16"
	}
	bits := 8 * len(octets)
	for len(octets) < 4 {
		octets = append(octets, "0")
	}
	return strings.Join(octets, ".") + "/" + strconv.Itoa(bits)
}

// unmapPrefix turns a prefix of v4-mapped addresses into the IPv4 prefix
// it stands for, since requests are matched unmapped.
func unmapPrefix(p netip.Prefix) netip.Prefix {
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		return netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p
}

var (
	loopback4 = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	loopback6 = netip.IPv6Loopback()
)

// target is the host of a forward request, read once per decision.
type target struct {
	host   Host
	err    error // the host did not canonicalise
	remote bool  // a bind address (remote forward), not a destination
	socket bool  // a unix socket (streamlocal): path is what it names
	path   string
}

func newTarget(r Request) target {
	t := target{remote: r.Channel == RemoteForward}
	if r.Socket != "" {
		t.socket = true
		t.path, t.err = CanonicalSocket(r.Socket)
		return t
	}
	if t.remote {
		t.host, t.err = CanonicalBind(r.Host)
	} else {
		t.host, t.err = CanonicalHost(r.Host)
	}
	if t.err == nil && r.Port > 65535 {
		t.err = fmt.Errorf("%w: %d", ErrBadPort, r.Port)
	}
	return t
}

// binds are the wildcard addresses a remote forward's bind stands for:
// both for "" and "*", one for 0.0.0.0 or ::; none for other binds.
func (t target) binds() []netip.Addr {
	switch {
	case !t.remote:
	case t.host.All:
		return []netip.Addr{netip.IPv4Unspecified(), netip.IPv6Unspecified()}
	case t.host.Addr.IsUnspecified():
		return []netip.Addr{t.host.Addr}
	}
	return nil
}

// dest is the address a connection to the target's address goes to: the
// unspecified addresses are the local host's loopback.
func (t target) dest() netip.Addr {
	a := t.host.Addr
	if a == netip.IPv4Unspecified() {
		return loopback4
	}
	if a == netip.IPv6Unspecified() {
		return loopback6
	}
	return a
}

// allowedBy reports whether an allow rule's forward_hosts entries take in
// the target. An address entry matches only an address, a glob only a
// name, "localhost" only the loopback forms the VM cannot resolve
// elsewhere. A remote forward binding every address (of a family) is
// allowed only by "*" or by address entries containing the wildcard
// address of every family it binds.
func (t target) allowedBy(entries []string) bool {
	if t.err != nil {
		return false
	}
	compiled := make([]hostEntry, 0, len(entries))
	for _, s := range entries {
		e, err := parseHostEntry(s)
		if err != nil {
			continue // matches nothing here
		}
		if e.kind == entryAny {
			return true
		}
		compiled = append(compiled, e)
	}
	if binds := t.binds(); binds != nil {
		for _, a := range binds {
			if !containsAddr(compiled, a) {
				return false
			}
		}
		return true
	}
	for _, e := range compiled {
		switch e.kind {
		case entryLoopback:
			if t.host.surelyLoopback() {
				return true
			}
		case entryPrefix:
			if t.host.Addr.IsValid() && e.prefix.Contains(t.dest()) {
				return true
			}
		case entryGlob:
			if t.host.Name != "" && Glob(e.glob, t.host.Name) {
				return true
			}
		}
	}
	return false
}

func containsAddr(entries []hostEntry, a netip.Addr) bool {
	for _, e := range entries {
		if e.kind == entryPrefix && e.prefix.Contains(a) {
			return true
		}
	}
	return false
}

// deniedBy reports whether a deny rule's forward_hosts entries match the
// target in any form it may take on the VM: loopback in every form of
// loopback (127.0.0.1, ::1 and localhost), an unspecified address as
// itself and as the loopback a connect to it reaches, a bind on every
// address as the wildcard addresses and as loopback, which it includes.
// Text that does not canonicalise, and entries that do not compile, match.
func (t target) deniedBy(entries []string) bool {
	if t.err != nil {
		return true
	}
	var addrs []netip.Addr
	var names []string
	loop := t.host.All || t.host.Loopback()
	if t.host.Addr.IsValid() {
		addrs = append(addrs, t.host.Addr)
	}
	if t.host.Name != "" {
		names = append(names, t.host.Name)
	}
	addrs = append(addrs, t.binds()...)
	if loop {
		addrs = append(addrs, loopback4, loopback6)
		names = append(names, "localhost")
	}
	for _, s := range entries {
		e, err := parseHostEntry(s)
		if err != nil {
			return true
		}
		switch e.kind {
		case entryAny:
			return true
		case entryLoopback:
			if loop {
				return true
			}
		case entryPrefix:
			for _, a := range addrs {
				if e.prefix.Contains(a) {
					return true
				}
			}
		case entryGlob:
			for _, n := range names {
				if Glob(e.glob, n) {
					return true
				}
			}
		}
	}
	return false
}

// ErrBadSocket refuses a forward to or from a unix socket path that is not
// absolute and plain, whatever the rules say.
var ErrBadSocket = errors.New("invalid forward socket")

// maxSocketPath is the longest path a unix socket address holds on Linux
// (sun_path is 108 bytes with its terminating NUL).
const maxSocketPath = 107

// CanonicalSocket checks a unix socket path from a streamlocal request: an
// absolute path in its plain form (as path.Clean leaves it: no "..", "."
// or doubled slashes, which a glob could be sidestepped with), of printable
// bytes, short enough for a socket address.
func CanonicalSocket(p string) (string, error) {
	bad := func(why string) (string, error) {
		return "", fmt.Errorf("%w %q: %s", ErrBadSocket, p, why)
	}
	switch {
	case p == "":
		return bad("empty")
	case len(p) > maxSocketPath:
		return bad(fmt.Sprintf("%d bytes, longer than a unix socket path can be (%d)", len(p), maxSocketPath))
	case !strings.HasPrefix(p, "/"):
		return bad("not an absolute path")
	}
	for i := 0; i < len(p); i++ {
		if p[i] < 0x20 || p[i] == 0x7f {
			return bad(fmt.Sprintf("control byte %#x at %d", p[i], i))
		}
	}
	if c := path.Clean(p); c != p {
		return bad(fmt.Sprintf("not in its plain form %q", c))
	}
	return p, nil
}

// checkSocketGlob checks a forward_sockets entry: an absolute path glob.
func checkSocketGlob(g string) error {
	if !strings.HasPrefix(g, "/") {
		return fmt.Errorf("%q is not an absolute path glob such as \"/run/user/*/vscode-*.sock\"", g)
	}
	if _, err := path.Match(g, "/"); err != nil {
		return fmt.Errorf("%q: %v", g, err)
	}
	return nil
}

// socketIn reports whether the target's socket path matches one of globs.
func (t target) socketIn(globs []string) bool {
	for _, g := range globs {
		if ok, err := path.Match(g, t.path); ok && err == nil {
			return true
		}
	}
	return false
}

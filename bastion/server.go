package bastion

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gliderlabs/ssh"
	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/policy"
	"github.com/bastionvm/bastion/vm"
)

// VMs finds the VMs the bastion serves. *hypervisor.Pool is one.
type VMs interface {
	// Find returns the VM called name (or with that UUID), or an error
	// wrapping vm.ErrNoSuchVM.
	Find(ctx context.Context, name string) (vm.Domain, error)
	// List returns every VM, running or not; the menu offers the running
	// ones.
	List(ctx context.Context) ([]vm.Domain, error)
}

// Resolver gives verified ways into VMs. *trust.Manager is one. Its errors
// wrap this package's sentinels or have a UserMessage() string method
// saying what the user may be told.
type Resolver interface {
	// Resolve returns a verified upstream for login on d, establishing
	// trust first if none is fresh.
	Resolve(ctx context.Context, d vm.Domain, login string) (keys.Upstream, error)
	// Forget drops the trust for login on d, which the VM no longer
	// honours (why says how), so that the next Resolve verifies again.
	Forget(d vm.Domain, login, why string)
}

// Identifier maps a public key to the account that holds it.
type Identifier interface {
	Identify(key gossh.PublicKey) (Account, bool)
}

// CertIdentifier is an Identifier that also takes user certificates and
// knows which keys are revoked. *AccountSet is one. An Identifier that is
// not one refuses every certificate.
type CertIdentifier interface {
	Identifier
	// IdentifyCert returns the account cert names: account, if the user
	// name asked for one, else the only one it names.
	IdentifyCert(cert *gossh.Certificate, account string, source netip.Addr, now time.Time) (Account, *CertLogin, error)
	// Revoked says why key is revoked, or "".
	Revoked(key gossh.PublicKey) string
}

// Decider is the policy. *policy.Policy is one.
type Decider interface {
	// Decide answers one request.
	Decide(policy.Request) policy.Decision
	// Logins lists the logins on d that account (in groups) may use from
	// source at t, "*" meaning any: what the menu offers.
	Logins(account string, groups []string, source netip.Addr, d vm.Domain, t time.Time) []string
	// Possible reports whether a rule could ever allow one of kinds to
	// r's account, source, VM and login, whatever the time and the
	// request's particulars: whether a link may share its upstream
	// connection. Erring towards true is safe.
	Possible(r policy.Request, kinds ...policy.Channel) bool
}

// HostCertifier issues host certificates for the bastion's host key.
type HostCertifier interface {
	HostCertSigner(principals []string, validity time.Duration) (gossh.Signer, error)
}

// DefaultEnvAllow is the environment a client may pass to a VM when the
// server sets no allow-list of its own.
var DefaultEnvAllow = []string{"LANG", "LC_*", "LANGUAGE", "TZ", "COLORTERM", "TERM_PROGRAM", "TERM_PROGRAM_VERSION", "GIT_PROTOCOL"}

// Server is the bastion's SSH front door. Set its fields before Serve; the
// zero value of each optional field is documented beside it.
type Server struct {
	HostKey   gossh.Signer  // required
	Certifier HostCertifier // issues host certificates; if nil, plain host keys only
	Hostnames []string      // principals of the front door's own certificate (names and addresses users reach it by); if empty, the front door presents its plain host key only

	Accounts Identifier // if nil, nobody can log in
	VMs      VMs        // if nil, no VM is known
	Resolver Resolver   // if nil, no VM can be reached
	Policy   Decider    // if nil, every request is denied

	EnvAllow       []string      // globs of environment variable names passed to VMs; nil means DefaultEnvAllow
	KeepAlive      time.Duration // keepalive interval on every hop; 0 means 30s, negative turns them off
	RequestTimeout time.Duration // how long a peer may take to answer a request; 0 means 30s
	ConnectTimeout time.Duration // verifying and logging in to a VM; 0 means 2 minutes
	PolicyTick     time.Duration // how often open sessions are checked against the policy's time windows; 0 means every minute, on the minute
	MaxChannels    int           // channels open at once on one connection (the ProxyJump inner hop counts its own); 0 means 100
	MaxPending     int           // links to VMs one account may be setting up at once; 0 means 64
	// UpstreamHandshakes is how many handshakes with one VM's sshd run at
	// once; 0 means 8, below sshd's default MaxStartups of 10. More wait
	// their turn within the connect timeout.
	UpstreamHandshakes int
	// UpstreamMaxSessions is how many sessions one upstream connection
	// carries for the links that share it (see upstream.go); 0 means 10,
	// OpenSSH's default MaxSessions; 1 gives every link a connection of
	// its own.
	UpstreamMaxSessions int
	// UpstreamLinger is how long a shared upstream connection stays open
	// once its last link has ended, for the same account's next link to
	// the same login on the VM; 0 closes it at once. Config's default is
	// DefaultUpstreamLinger.
	UpstreamLinger time.Duration
	AuthFailures   int           // failed authentications a source address may make at once; 0 means 10
	AuthRefill     time.Duration // how often a source regains one failure; 0 means 6s

	// Ciphers are offered on the front door and the ProxyJump inner hop,
	// and preferred in this order on the link to the VM; nil means
	// DefaultCiphers(). ParseCiphers checks a list from a user.
	Ciphers []string

	// Before authentication, in OpenSSH's terms. Connections past these
	// caps are closed before their key exchange.
	LoginGraceTime       time.Duration // how long a connection may take to authenticate; 0 means 120s, negative means no limit
	MaxStartups          MaxStartups   // unauthenticated connections in all; zero means DefaultMaxStartups
	PerSourceMaxStartups int           // unauthenticated connections from one IPv4 address or IPv6 /64; 0 means 10, negative means no cap

	// ProxyProtocol, if set, names the load balancers in front: every
	// connection must come from one of them and start with a PROXY
	// protocol header (v1 or v2), whose client address is the source the
	// policy, the limits and the audit see. Others are refused.
	ProxyProtocol []netip.Prefix

	// Commands are the bastion's own commands, run by `ssh alice@bastion
	// NAME args...`, by NAME. A command not here gets the menu's answer.
	Commands map[string]CommandFunc

	// Recordings is the directory session recordings are written to; if
	// empty, nothing is recorded. RecordingMaxBytes caps the output and
	// input one recording holds; 0 means 16 MiB.
	Recordings        string
	RecordingMaxBytes int64

	Logger *slog.Logger // if nil, logs are discarded
	Audit  audit.Sink   // receives every audit event; if nil, they are dropped
	// AuditRequired, if set, is asked before every new channel: while it
	// reports an error (the trail cannot be written), no new session or
	// forward starts, and the person is told why. Open ones go on.
	AuditRequired func() error

	initOnce sync.Once
	front    *ssh.Server
	limiter  *failureLimiter
	startups *startups
	stopOnce sync.Once
	stopped  chan struct{} // closed by Shutdown and Close
	refusals logPacer      // paces the log lines of refused connections
	failures logPacer      // and those of refused keys

	certMu sync.Mutex // protects certs
	certs  map[string]cachedCert

	linksMu       sync.Mutex // protects links, fronts, pending, turns, shared and the counts of each upstream and link's sessions
	links         map[*link]bool
	shared        map[shareKey][]*upstream // upstream connections links may share, by what they have in common
	fronts        map[*frontConn]bool      // authenticated front-door connections
	pending       map[string]int           // links being set up, by account
	turns         map[string]*turns        // handshakes with each VM's sshd, by address
	idleUpstreams int                      // shared upstreams lingering with no link
	lives         map[string]*live         // running sessions with a terminal, by id, for watch
}

// Counts are what the server holds open now: authenticated front-door
// connections and links to VMs (a link carries one connection's channels
// to one VM).
func (s *Server) Counts() (connections, links int) {
	s.linksMu.Lock()
	defer s.linksMu.Unlock()
	return len(s.fronts), len(s.links)
}

// IdleUpstreams is how many shared upstream connections are open with no
// link, kept for the next (UpstreamLinger).
func (s *Server) IdleUpstreams() int {
	s.linksMu.Lock()
	defer s.linksMu.Unlock()
	return s.idleUpstreams
}

// Unauthenticated is how many front-door connections have not yet
// authenticated (each holds one of the MaxStartups places).
func (s *Server) Unauthenticated() int {
	s.initOnce.Do(s.init)
	return s.startups.unauthenticated()
}

// Draining reports whether Shutdown or Close has begun.
func (s *Server) Draining() bool {
	s.initOnce.Do(s.init)
	select {
	case <-s.stopped:
		return true
	default:
		return false
	}
}

// Revalidate applies new accounts and a new policy to what is open, as
// after a reload. Every front-door connection is identified again from the
// key it logged in with: one whose key is gone, or now belongs to another
// account, is closed with a message to the user; the others take their
// account's new groups. Then the policy is asked again about every link and
// channel, and what it no longer allows ends, telling the user why. What it
// still allows is left alone.
func (s *Server) Revalidate() {
	s.linksMu.Lock()
	fronts := slices.Collect(maps.Keys(s.fronts))
	s.linksMu.Unlock()
	for _, fc := range fronts {
		s.reidentify(fc)
	}
	for _, l := range s.openLinks() {
		l.revalidate()
	}
}

// VMEvent ends the sessions on a VM that stopped, rebooted or was
// undefined, each with a message saying so: their upstream is gone, or
// about to be, and a reset guest would leave them hanging until TCP gave
// up. Other events leave sessions alone (a guest agent that leaves does
// not touch sshd). Every event that drops the VM's trusts (the agent
// leaving too) retires the upstream connections links share with it: they
// take no new link, which verifies again and dials. It does not block; the
// trust manager drops the trust itself.
func (s *Server) VMEvent(e vm.Event) {
	// The trust manager drops the VM's trusts on these: the connections
	// made with them take no more links.
	switch e.Kind {
	case vm.EventStopped, vm.EventRebooted, vm.EventMigrated, vm.EventUndefined, vm.EventAgentGone:
		s.retireShared(func(k shareKey) bool { return k.uri == e.URI && k.uuid == e.UUID })
	case vm.EventReconnected:
		s.retireShared(func(k shareKey) bool { return k.uri == e.URI })
	}
	var what string
	switch e.Kind {
	case vm.EventStopped:
		what = "stopped"
	case vm.EventRebooted:
		what = "rebooted"
	case vm.EventUndefined:
		what = "was removed from its hypervisor"
	default:
		return
	}
	go func() {
		for _, l := range s.openLinks() {
			if l.vm.UUID != e.UUID || l.vm.URI != e.URI {
				continue
			}
			l.log.Info("VM went away; ending its link", "event", string(e.Kind))
			s.audit(l.event().With(audit.Ended, "", "", "vm "+string(e.Kind)))
			l.end(fmt.Sprintf("bastion: %s %s; the session ended", l.vm.Name, what))
		}
	}()
}

// openLinks is a snapshot of the open links.
func (s *Server) openLinks() []*link {
	s.linksMu.Lock()
	defer s.linksMu.Unlock()
	return slices.Collect(maps.Keys(s.links))
}

// reidentify looks fc's key up again and ends fc if it no longer names
// its account; otherwise fc takes the account as it is now.
func (s *Server) reidentify(fc *frontConn) {
	fc.accountMu.Lock()
	was, key, at := fc.account, fc.key, fc.loginAt
	fc.accountMu.Unlock()
	var now Account
	ok := false
	var refused error
	certs, _ := s.Accounts.(CertIdentifier)
	if cert, isCert := key.(*gossh.Certificate); isCert {
		// Asked again as at login: a certificate that has since expired
		// does not end what it opened (sshd does not either), but one
		// whose CA, account or principal went, or that was revoked, does.
		if certs == nil {
			s.endFront(fc, "certificates are no longer accepted")
			return
		}
		var err error
		if now, _, err = certs.IdentifyCert(cert, was.Name, sourceAddr(fc.source), at); err != nil {
			s.endFront(fc, "the certificate it logged in with: "+err.Error())
			return
		}
		ok = true
	} else if s.Accounts != nil {
		now, ok = s.Accounts.Identify(key)
		if ok {
			refused = now.Options(key).Allows(sourceAddr(fc.source), time.Now())
			if certs != nil {
				if why := certs.Revoked(key); why != "" {
					refused = errors.New(why)
				}
			}
		}
	}
	switch {
	case !ok:
		s.endFront(fc, "the key it logged in with was removed")
	case refused != nil && now.Name == was.Name:
		s.endFront(fc, "the key it logged in with: "+refused.Error())
	case now.Name != was.Name:
		s.endFront(fc, fmt.Sprintf("the key it logged in with now belongs to account %q", now.Name))
	default:
		fc.accountMu.Lock()
		fc.account = now
		fc.accountMu.Unlock()
	}
}

// endFront closes a front-door connection that lost its identity in a
// reload: its links end first, each telling its sessions why, then the
// connection itself.
func (s *Server) endFront(fc *frontConn, reason string) {
	acc := fc.who()
	s.logger().Info("connection ended by a reload", "account", acc.Name, "source", fc.source.String(), "reason", reason)
	s.audit(audit.Event{Type: audit.Ended, Session: fc.id, Account: acc.Name, Source: fc.source.String(), Reason: "reload: " + reason})
	msg := "bastion: access ended: " + reason
	var ending []*link
	for _, l := range s.openLinks() {
		if l.front == fc {
			ending = append(ending, l)
			l.end(msg)
		}
	}
	go func() {
		grace := time.NewTimer(endGrace + time.Second) // links take up to endGrace themselves
		defer grace.Stop()
		for _, l := range ending {
			select {
			case <-l.done:
			case <-grace.C:
			}
		}
		fc.raw.Close()
	}()
}

// CommandFunc runs one of the bastion's own commands for account, writing
// to out, and returns the exit status. It is responsible for asking the
// policy.
type CommandFunc func(ctx context.Context, account Account, source net.Addr, args []string, out io.Writer) int

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = ssh.ErrServerClosed

// newSessionID is 16 random hex digits: unique enough to join a
// connection's events across a trail, and telling nothing about it.
func newSessionID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// frontConn is the state of one front-door connection.
type frontConn struct {
	id       string // the session id in its audit events
	ctx      ssh.Context
	raw      net.Conn          // the TCP connection, for closing it from outside
	conn     *gossh.ServerConn // set by state
	source   net.Addr          // the client: the PROXY header's source behind a load balancer
	balancer net.Addr          // the load balancer it came through, or nil
	local    net.Addr

	accountMu sync.Mutex      // protects key, account and cert
	key       gossh.PublicKey // the key it authenticated with; set by loggedIn
	account   Account         // set by loggedIn; its groups change on a reload (see who)
	cert      *CertLogin      // what its certificate says, if it logged in with one
	loginAt   time.Time       // when it authenticated

	// Until it authenticates the connection holds a startup place and
	// runs against the login grace time; authenticated ends both.
	authenticated func()
	authed        atomic.Bool // it authenticated
	refused       atomic.Bool // a key it offered was refused

	channels counter       // channels open on it
	channelN atomic.Uint32 // channel ids in its audit events: 1, 2, …

	loginOnce sync.Once // fills in conn and account

	// A login@vm connection's link, established on first use; every
	// channel of such a connection needs it, so they wait for it.
	linkMu  sync.Mutex // protects link and linkErr
	link    *link
	linkErr error
}

// userKeyAlgorithms are the signatures a person may log in with.
var userKeyAlgorithms = []string{
	gossh.KeyAlgoED25519, gossh.KeyAlgoSKED25519, gossh.KeyAlgoSKECDSA256,
	gossh.KeyAlgoECDSA256, gossh.KeyAlgoECDSA384, gossh.KeyAlgoECDSA521,
	gossh.KeyAlgoRSASHA256, gossh.KeyAlgoRSASHA512,
	// Certificates of these keys ([[user_ca]]) are allowed with them:
	// x/crypto checks a certificate's underlying algorithm.
}

type ctxKey struct{}

// identity is who a key says a connection is, carried from the key's check
// to the connection's state.
type identity struct {
	account Account
	key     gossh.PublicKey
	cert    *CertLogin // if key is a certificate
}

// certLogin is what fc's certificate says, or nil for a plain key.
func (fc *frontConn) certLogin() *CertLogin {
	fc.accountMu.Lock()
	defer fc.accountMu.Unlock()
	return fc.cert
}

// certRefuses says why fc's certificate does not permit a request of
// kind (it lacks the permit-* extension), or "".
func (fc *frontConn) certRefuses(kind policy.Channel) string {
	c := fc.certLogin()
	ext := ""
	switch kind {
	case policy.LocalForward, policy.RemoteForward:
		ext = "permit-port-forwarding"
	case policy.Agent:
		ext = "permit-agent-forwarding"
	case policy.X11:
		ext = "permit-X11-forwarding"
	}
	if ext == "" || c.Permits(ext) {
		return ""
	}
	return "the certificate does not " + strings.ReplaceAll(ext, "-", " ")
}

// who is the account of the connection as it is now.
func (fc *frontConn) who() Account {
	fc.accountMu.Lock()
	defer fc.accountMu.Unlock()
	return fc.account
}

// Serve accepts connections on l until Shutdown or Close.
func (s *Server) Serve(l net.Listener) error {
	if s.HostKey == nil {
		return errors.New("bastion: no host key")
	}
	s.initOnce.Do(s.init)
	return s.front.Serve(l)
}

// watchWindows asks the policy again about everything open at every
// PolicyTick, aligned to the clock, so that a time window closing ends
// what it allowed when it closes. Windows are written to the minute, so
// the default tick of a minute meets every boundary.
func (s *Server) watchWindows() {
	tick := s.PolicyTick
	if tick <= 0 {
		tick = time.Minute
	}
	for {
		// Just past the boundary, so that the policy sees the new time.
		next := time.Now().Truncate(tick).Add(tick + 10*time.Millisecond)
		select {
		case <-time.After(time.Until(next)):
			if len(s.openLinks()) > 0 {
				s.Revalidate()
			}
		case <-s.stopped:
			return
		}
	}
}

// Shutdown stops accepting connections and waits for open ones to end
// until ctx is done; then it closes those that remain.
func (s *Server) Shutdown(ctx context.Context) error {
	s.initOnce.Do(s.init)
	s.stopOnce.Do(func() { close(s.stopped) })
	s.closeIdle()
	err := s.front.Shutdown(ctx)
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		s.front.Close()
	}
	return err
}

// Close closes the listeners and every connection at once.
func (s *Server) Close() error {
	s.initOnce.Do(s.init)
	s.stopOnce.Do(func() { close(s.stopped) })
	s.closeIdle()
	return s.front.Close()
}

func (s *Server) init() {
	burst, refill := s.AuthFailures, s.AuthRefill
	if burst <= 0 {
		burst = 10
	}
	if refill <= 0 {
		refill = 6 * time.Second
	}
	s.limiter = newFailureLimiter(burst, refill)
	max, perSource := s.MaxStartups, s.PerSourceMaxStartups
	if max == (MaxStartups{}) {
		max = DefaultMaxStartups
	}
	switch {
	case perSource == 0:
		perSource = 10
	case perSource < 0:
		perSource = 0
	}
	s.startups = newStartups(max, perSource)
	s.stopped = make(chan struct{})
	go s.watchWindows()
	s.front = &ssh.Server{
		Version:                  strings.TrimPrefix(s.version(), "SSH-2.0-"),
		ServerConfigCallback:     s.frontConfig,
		ConnCallback:             s.accept,
		ConnectionFailedCallback: s.handshakeFailed,
		ChannelHandlers: map[string]ssh.ChannelHandler{
			"session":      s.frontChannel,
			"direct-tcpip": s.frontChannel,
			// A unix-socket -L; only a login@vm connection has somewhere to
			// take it.
			"direct-streamlocal@openssh.com": s.frontChannel,
		},
		RequestHandlers: map[string]ssh.RequestHandler{
			"default": s.frontRequest,
		},
	}
	if s.Certifier != nil && len(s.Hostnames) > 0 {
		// A certificate for the bastion's names, valid for a week and
		// renewed before it ends: the host CA is what users trust. A
		// certificate names its hosts: one valid for any name would be
		// refused by x/crypto, and is one a stolen key could use anywhere.
		cert, err := newRenewingCert(func(validity time.Duration) (gossh.Signer, error) {
			return s.Certifier.HostCertSigner(s.Hostnames, validity)
		}, s.logger())
		if err == nil {
			s.front.AddHostKey(cert)
		} else {
			s.logger().Error("front door certificate", "err", err)
		}
	}
	s.front.AddHostKey(s.HostKey)
}

// accept refuses connections past the caps on unauthenticated
// connections, slows down sources that failed to authenticate too often,
// and attaches the connection's state. An admitted connection must
// authenticate within the login grace time.
func (s *Server) accept(ctx ssh.Context, conn net.Conn) net.Conn {
	conn, source, balancer, err := s.fromBalancer(conn)
	if err != nil {
		s.refused(source, err.Error())
		return nil
	}
	release, err := s.startups.admit(source, startupWait)
	if err != nil {
		s.refused(source, err.Error())
		return nil
	}
	if d := s.limiter.Delay(source); d > 0 {
		// Before the grace time starts; the startup place is held, so the
		// waiting connections of one source stay within its cap.
		s.refused(source, fmt.Sprintf("rate limited: too many failed authentications; delayed %v", d.Round(time.Millisecond)))
		select {
		case <-time.After(d):
		case <-s.stopped:
			release()
			return nil
		}
	}
	fc := &frontConn{ctx: ctx, raw: conn, source: source, balancer: balancer, local: conn.LocalAddr(), id: newSessionID()}
	var grace *time.Timer
	if d := s.loginGraceTime(); d > 0 {
		grace = time.AfterFunc(d, func() {
			if ok, skipped := s.refusals.allow(); ok {
				s.logger().Info("closed: login grace time over", "source", source.String(), "grace", d, "also", skipped)
			}
			conn.Close()
		})
	}
	var once sync.Once
	fc.authenticated = func() {
		once.Do(func() {
			fc.authed.Store(true)
			if grace != nil {
				grace.Stop()
			}
			release()
		})
	}
	ctx.SetValue(ctxKey{}, fc)
	return &frontNetConn{bulkConn: newBulkConn(conn), closed: func() {
		// A connection that leaves without authenticating, after a key
		// was refused, is one failure of its source, however many keys
		// it tried.
		if !fc.authed.Load() && fc.refused.Load() {
			s.limiter.Fail(source)
		}
		fc.authenticated()
	}}
}

// addrString is a's text, or "" for none.
func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

// startupWait is how long a connection from a source at its cap of
// unauthenticated connections waits for one of them to authenticate.
const startupWait = 30 * time.Second

// refused logs and audits a connection closed at accept, at most once a
// second: a flood must not become a flood of log lines.
func (s *Server) refused(source net.Addr, reason string) {
	ok, skipped := s.refusals.allow()
	if !ok {
		return
	}
	detail := ""
	if skipped > 0 {
		detail = fmt.Sprintf("and %d more refused since the last event", skipped)
	}
	s.logger().Warn("refused", "source", source.String(), "reason", reason, "also", skipped)
	s.audit(audit.Event{Type: audit.LoginFailed, Source: source.String(), Reason: reason, Detail: detail})
}

// frontNetConn is a front-door connection that gives back its startup
// place when it closes.
type frontNetConn struct {
	*bulkConn
	closed func()
}

func (c *frontNetConn) Close() error {
	c.closed()
	return c.bulkConn.Close()
}

// handshakeFailed logs a front-door handshake that found no algorithm in
// common with the client: a client the bastion's settings (server.ciphers)
// turn away, which the client reports only to its user. Other failures,
// a port scan's or a dropped connection's, are not worth a line.
func (s *Server) handshakeFailed(conn net.Conn, err error) {
	var none *gossh.AlgorithmNegotiationError
	if !errors.As(err, &none) {
		return
	}
	// The address is the client's, read from a PROXY header if need be.
	if ok, skipped := s.refusals.allow(); ok {
		s.logger().Info("handshake failed: no common algorithm", "source", conn.RemoteAddr().String(), "what", none.What,
			"offered", strings.Join(none.SupportedAlgorithms, ","), "client_offered", clipText(strings.Join(none.RequestedAlgorithms, ",")), "also", skipped)
	}
}

// frontConfig is the front door's authentication: public keys only, each
// mapped to one account. The user name is the account's name, or login@vm.
func (s *Server) frontConfig(ctx ssh.Context) *gossh.ServerConfig {
	fc := ctx.Value(ctxKey{}).(*frontConn)
	return &gossh.ServerConfig{
		// gliderlabs turns NoClientAuth on when it handles no method
		// itself; "none" must still fail.
		NoClientAuthCallback: func(gossh.ConnMetadata) (*gossh.Permissions, error) {
			return nil, errors.New("authentication required")
		},
		PublicKeyCallback: func(meta gossh.ConnMetadata, key gossh.PublicKey) (*gossh.Permissions, error) {
			return s.authenticate(fc, meta, key)
		},
		// Called once a key is accepted and its signature verified.
		VerifiedPublicKeyCallback: func(meta gossh.ConnMetadata, _ gossh.PublicKey, perms *gossh.Permissions, _ string) (*gossh.Permissions, error) {
			s.loggedIn(fc, perms.ExtraData[ctxKey{}].(identity), meta.User())
			return perms, nil
		},
		// Called after every attempt; with no error once the connection
		// is authenticated.
		AuthLogCallback: func(_ gossh.ConnMetadata, _ string, err error) {
			if err == nil {
				fc.authenticated()
			}
		},
		// As OpenSSH: no SHA-1 RSA signatures (ssh-rsa), no DSA.
		PublicKeyAuthAlgorithms: userKeyAlgorithms,
		MaxAuthTries:            10,
		Config:                  gossh.Config{Ciphers: s.ciphers()},
	}
}

func (s *Server) authenticate(fc *frontConn, meta gossh.ConnMetadata, key gossh.PublicKey) (*gossh.Permissions, error) {
	fail := func(reason string) (*gossh.Permissions, error) {
		fc.refused.Store(true)
		if ok, skipped := s.failures.allow(); ok {
			s.logger().Info("authentication failed", "source", fc.source.String(), "user", clip(meta.User()),
				"key", gossh.FingerprintSHA256(key), "reason", reason, "also", skipped)
			detail := ""
			if skipped > 0 {
				detail = fmt.Sprintf("and %d more failed attempts since the last event", skipped)
			}
			s.audit(audit.Event{Type: audit.LoginFailed, Session: fc.id, Source: fc.source.String(), Balancer: addrString(fc.balancer), Reason: reason, Detail: detail})
		}
		return nil, errors.New(reason)
	}
	if s.Accounts == nil {
		return fail("no accounts")
	}
	certs, _ := s.Accounts.(CertIdentifier)
	if cert, ok := key.(*gossh.Certificate); ok {
		return s.authenticateCert(fc, meta, cert, certs, fail)
	}
	account, ok := s.Accounts.Identify(key)
	if !ok {
		return fail("unknown key")
	}
	if certs != nil {
		if why := certs.Revoked(key); why != "" {
			return fail(why)
		}
	}
	if err := account.Options(key).Allows(sourceAddr(fc.source), time.Now()); err != nil {
		return fail(err.Error())
	}
	user := meta.User()
	if strings.Contains(user, "@") {
		if _, err := ParseTarget(user); err != nil {
			return nil, &gossh.BannerError{Err: err, Message: "bastion: " + err.Error() + "\r\n"}
		}
	} else if user != account.Name {
		return fail(fmt.Sprintf("key of account %q offered for user %s", account.Name, clip(user)))
	}
	return &gossh.Permissions{ExtraData: map[any]any{ctxKey{}: identity{account: account, key: key}}}, nil
}

// authenticateCert checks a user certificate: the account it names must
// be the user name's, or, for a target user name, the only one it names.
func (s *Server) authenticateCert(fc *frontConn, meta gossh.ConnMetadata, cert *gossh.Certificate, certs CertIdentifier,
	fail func(string) (*gossh.Permissions, error)) (*gossh.Permissions, error) {
	if certs == nil {
		return fail("certificates are not accepted: no [[user_ca]]")
	}
	user, want := meta.User(), meta.User()
	if strings.Contains(user, "@") {
		if _, err := ParseTarget(user); err != nil {
			return nil, &gossh.BannerError{Err: err, Message: "bastion: " + err.Error() + "\r\n"}
		}
		want = ""
	}
	account, login, err := certs.IdentifyCert(cert, want, sourceAddr(fc.source), time.Now())
	if err != nil {
		return fail(err.Error())
	}
	return &gossh.Permissions{ExtraData: map[any]any{ctxKey{}: identity{account: account, key: cert, cert: login}}}, nil
}

// clip is text a client chose (a user name), quoted and cut to a length
// fit for a log line.
func clip(s string) string {
	const max = 64
	if len(s) <= max {
		return strconv.Quote(s)
	}
	return fmt.Sprintf("%q… (%d bytes)", s[:max], len(s))
}

// loggedIn records who fc is once its key's signature is verified, audits
// the login, and counts fc among the connections a reload identifies
// again, until it closes.
func (s *Server) loggedIn(fc *frontConn, id identity, user string) {
	fc.accountMu.Lock()
	fc.key, fc.account, fc.cert, fc.loginAt = id.key, id.account, id.cert, time.Now()
	fc.accountMu.Unlock()
	ev := audit.Event{Type: audit.Login, Session: fc.id, Account: id.account.Name, Source: fc.source.String(), Balancer: addrString(fc.balancer)}
	if c := id.cert; c != nil {
		serial := c.Serial
		ev.KeyID, ev.CertSerial = vm.Printable(clipText(c.KeyID)), &serial
		s.logger().Info("login", "account", id.account.Name, "source", fc.source.String(), "user", user, "cert", ev.KeyID, "serial", serial)
	} else {
		s.logger().Info("login", "account", id.account.Name, "source", fc.source.String(), "user", user)
	}
	s.audit(ev)
	s.linksMu.Lock()
	if s.fronts == nil {
		s.fronts = make(map[*frontConn]bool)
	}
	s.fronts[fc] = true
	s.linksMu.Unlock()
	context.AfterFunc(fc.ctx, func() {
		s.linksMu.Lock()
		delete(s.fronts, fc)
		s.linksMu.Unlock()
	})
}

// state returns the front-door state of conn. The first call, with the
// first channel or request, starts the connection's keepalives.
func (s *Server) state(ctx ssh.Context, conn *gossh.ServerConn) *frontConn {
	fc := ctx.Value(ctxKey{}).(*frontConn)
	fc.loginOnce.Do(func() {
		fc.conn = conn
		s.keepalive(fc.ctx, conn)
	})
	return fc
}

// frontChannel routes a channel opened on the front door. With a login@vm
// user name every channel belongs to that VM; otherwise direct-tcpip is
// the ProxyJump inner hop and a session gets the bastion's own answer.
func (s *Server) frontChannel(_ *ssh.Server, conn *gossh.ServerConn, newCh gossh.NewChannel, ctx ssh.Context) {
	fc := s.state(ctx, conn)
	if !s.audited(fc, newCh) {
		return
	}
	if !fc.channels.take(s.maxChannels()) {
		newCh.Reject(gossh.ResourceShortage, "bastion: too many channels open on this connection")
		return
	}
	defer fc.channels.give()
	if strings.Contains(conn.User(), "@") {
		l, err := s.frontLink(fc, conn)
		if err != nil {
			newCh.Reject(gossh.Prohibited, userMessage(targetVM(conn.User()), err))
			return
		}
		l.channel(newCh)
		return
	}
	switch newCh.ChannelType() {
	case "direct-tcpip":
		s.jump(fc, newCh)
	case "session":
		s.menu(fc, newCh)
	default:
		newCh.Reject(gossh.Prohibited, "bastion: "+newCh.ChannelType()+" needs a VM: forward through ssh -J or login@vm@bastion")
	}
}

// audited reports whether a new channel may start as far as the audit
// trail goes, and refuses newCh with the reason if not.
func (s *Server) audited(fc *frontConn, newCh gossh.NewChannel) bool {
	if s.AuditRequired == nil {
		return true
	}
	err := s.AuditRequired()
	if err == nil {
		return true
	}
	s.logger().Error("refused a channel: the audit trail cannot be written", "account", fc.who().Name, "channel", newCh.ChannelType(), "err", err)
	newCh.Reject(gossh.Prohibited, "bastion: the audit trail cannot be written, so no session may start; tell the bastion's operators")
	// Written if the trail can take it again: the refusal is on record,
	// and the next channel is let through.
	s.audit(audit.Event{Session: fc.id, Account: fc.who().Name, Source: fc.source.String()}.
		With(audit.Denied, newCh.ChannelType(), "", "the audit trail cannot be written"))
	return false
}

// frontRequest answers global requests on the front door: forward requests
// belong to a login@vm connection's VM; everything else is hop-by-hop.
func (s *Server) frontRequest(ctx ssh.Context, _ *ssh.Server, req *gossh.Request) (bool, []byte) {
	conn, _ := ctx.Value(ssh.ContextKeyConn).(*gossh.ServerConn)
	if conn == nil || !strings.Contains(conn.User(), "@") {
		return false, nil
	}
	switch req.Type {
	case "tcpip-forward", "cancel-tcpip-forward", "streamlocal-forward@openssh.com", "cancel-streamlocal-forward@openssh.com":
	default:
		return false, nil
	}
	l, err := s.frontLink(s.state(ctx, conn), conn)
	if err != nil {
		return false, nil
	}
	return l.global(req)
}

// frontLink returns the link of a login@vm connection, establishing it on
// first use. A failure is remembered: every later channel gets it too.
func (s *Server) frontLink(fc *frontConn, conn *gossh.ServerConn) (*link, error) {
	fc.linkMu.Lock()
	defer fc.linkMu.Unlock()
	if fc.link != nil || fc.linkErr != nil {
		return fc.link, fc.linkErr
	}
	t, err := ParseTarget(conn.User())
	if err != nil {
		fc.linkErr = err
		return nil, err
	}
	d, err := s.lookup(fc.ctx, t.VM)
	if err != nil {
		fc.linkErr = err
		return nil, err
	}
	fc.link, fc.linkErr = s.establish(fc, d, t.Login)
	if fc.link != nil {
		fc.link.start(conn)
	}
	return fc.link, fc.linkErr
}

func targetVM(user string) string {
	_, name, _ := strings.Cut(user, "@")
	return name
}

// lookup finds the VM a request names. A failure other than "no such VM"
// is the hypervisor's, and says so to the user.
func (s *Server) lookup(ctx context.Context, name string) (vm.Domain, error) {
	if s.VMs == nil {
		return vm.Domain{}, fmt.Errorf("%w: %s", vm.ErrNoSuchVM, name)
	}
	d, err := s.VMs.Find(ctx, name)
	if err != nil && !errors.Is(err, vm.ErrNoSuchVM) {
		return vm.Domain{}, &lookupError{err}
	}
	return d, err
}

// lookupError is a VM lookup that failed for a reason other than the VM
// not existing: an unreachable hypervisor, say.
type lookupError struct{ err error }

func (e *lookupError) Error() string { return "finding the VM: " + e.err.Error() }
func (e *lookupError) Unwrap() error { return e.err }
func (e *lookupError) UserMessage() string {
	return "could not verify the VM (finding the VM: " + vm.Cause(e.err).Error() + ")"
}

// ask is one question to the policy about what a link may do.
type ask struct {
	kind    policy.Channel
	command string // exec and scp
	host    string // forwards
	port    uint32
	socket  string // forwards to and from a unix socket on the VM
}

// detail is the ask's particulars, for logs and audit events.
func (a ask) detail() string {
	switch {
	case a.command != "":
		return a.command
	case a.socket != "":
		return a.socket
	case a.host != "" || a.port != 0:
		return net.JoinHostPort(a.host, fmt.Sprint(a.port))
	}
	return ""
}

func (s *Server) decide(fc *frontConn, d vm.Domain, login string, a ask) policy.Decision {
	if s.Policy == nil {
		return policy.Decision{Reason: "no policy"}
	}
	if why := fc.certRefuses(a.kind); why != "" {
		return policy.Decision{Reason: why}
	}
	account := fc.who()
	return s.Policy.Decide(policy.Request{
		Account: account.Name, Groups: account.Groups, Source: sourceAddr(fc.source), VM: d, Login: login,
		Channel: a.kind, Command: a.command, Host: a.host, Port: a.port, Socket: a.socket, Time: time.Now(),
	})
}

func (s *Server) logger() *slog.Logger {
	if s.Logger == nil {
		return slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return s.Logger
}

func (s *Server) version() string { return "SSH-2.0-bastion" }

func (s *Server) envAllowList() []string {
	if s.EnvAllow == nil {
		return DefaultEnvAllow
	}
	return s.EnvAllow
}

func (s *Server) keepAliveInterval() time.Duration {
	if s.KeepAlive == 0 {
		return 30 * time.Second
	}
	return s.KeepAlive
}

func (s *Server) requestTimeout() time.Duration { return orDefault(s.RequestTimeout, 30*time.Second) }

func (s *Server) maxChannels() int { return orDefault(s.MaxChannels, 100) }

func (s *Server) upstreamHandshakes() int { return orDefault(s.UpstreamHandshakes, 8) }

func (s *Server) upstreamMaxSessions() int { return orDefault(s.UpstreamMaxSessions, 10) }

func (s *Server) maxPending() int { return orDefault(s.MaxPending, 64) }

func (s *Server) loginGraceTime() time.Duration {
	if s.LoginGraceTime == 0 {
		return 120 * time.Second
	}
	return s.LoginGraceTime
}

func (s *Server) recordingMaxBytes() int64 {
	if s.RecordingMaxBytes <= 0 {
		return 16 << 20
	}
	return s.RecordingMaxBytes
}
func (s *Server) connectTimeout() time.Duration { return orDefault(s.ConnectTimeout, 2*time.Minute) }

// orDefault is v, or def when v is not above zero: the rule of the
// Server's optional limits.
func orDefault[T int | time.Duration](v, def T) T {
	if v <= 0 {
		return def
	}
	return v
}

func (s *Server) audit(e audit.Event) { s.Audit.Emit(e) }

// Reloaded audits a reload of the accounts and the policy that took
// effect, then revalidates every open link and channel against them.
func (s *Server) Reloaded(why string) {
	s.audit(audit.Event{Type: audit.Reloaded, Reason: why})
	s.Revalidate()
}

// ReloadFailed audits a reload that was refused: the running accounts and
// policy stay.
func (s *Server) ReloadFailed(why string, err error) {
	s.audit(audit.Event{Type: audit.ReloadFailed, Reason: err.Error()})
}

package bastion

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/policy"
	"github.com/bastionvm/bastion/vm"
)

// link is one downstream connection bound to one login on one VM, and the
// upstream connection to that VM's sshd that serves it, its own or shared
// with the same person's other links there (upstream.go). The downstream
// is either the ProxyJump inner hop or a front-door connection whose user
// name is login@vm.
type link struct {
	srv   *Server
	front *frontConn // the person's connection to the front door
	vm    vm.Domain
	login string
	log   *slog.Logger

	up       *upstream // its connection to the VM's sshd, perhaps shared (upstream.go)
	shared   bool      // up may serve other links: nothing of the connection's is the link's
	sessions int       // session channels open on up; protected by srv.linksMu

	down      gossh.Conn  // set by start, before any channel is handled
	unwatchUp func() bool // stops closing down when up ends; set by start

	closeOnce sync.Once
	done      chan struct{} // closed when the link has ended
	open      counter       // channels open on the inner hop

	began              time.Time    // when it was established
	bytesUp, bytesDown atomic.Int64 // totals of its channels that ended

	mu       sync.Mutex              // protects the fields below
	forwards map[string]bool         // remote forwards granted to the downstream, "host:port"
	sockets  map[string]bool         // and unix-socket remote forwards, by path
	agent    bool                    // the downstream asked for, and was allowed, agent forwarding
	x11      bool                    // likewise for X11
	active   map[*activeChannel]bool // channels in use, for revalidation
}

// endGrace bounds how long an ending link waits for its channels to take
// their last messages to the user before it closes its downstream and lets
// go of its upstream.
const endGrace = 5 * time.Second

// activeChannel is a channel in use on a link: what the policy allowed it
// for, how to end it, and when it has finished.
type activeChannel struct {
	a    ask
	end  func(msg string) // ends the channel, telling the user msg where it can
	done chan struct{}    // closed when the channel is no longer in use
}

// track records a channel in use until the returned function is called.
// A limit above 0, from the rule that allowed the channel, ends it then.
func (l *link) track(a ask, limit time.Duration, end func(msg string)) (untrack func()) {
	c := &activeChannel{a: a, end: end, done: make(chan struct{})}
	l.mu.Lock()
	l.active[c] = true
	l.mu.Unlock()
	var timer *time.Timer
	if limit > 0 {
		timer = time.AfterFunc(limit, func() {
			l.log.Info("session time limit reached", "channel", a.kind, "limit", limit)
			ev := l.event().With(audit.Ended, string(a.kind), "", fmt.Sprintf("time limit %v", limit))
			ev.Detail = a.detail()
			l.srv.audit(ev)
			end(fmt.Sprintf("bastion: %s: session time limit (%v) reached", l.vm.Name, limit))
		})
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			if timer != nil {
				timer.Stop()
			}
			l.mu.Lock()
			delete(l.active, c)
			l.mu.Unlock()
			close(c.done)
		})
	}
}

// channels is a snapshot of the channels in use.
func (l *link) channels() []*activeChannel {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Collect(maps.Keys(l.active))
}

// end ends every channel of the link with msg and, once they have
// finished (their message, exit status and close sent) or endGrace has
// passed, the link itself.
func (l *link) end(msg string) {
	active := l.channels()
	for _, c := range active {
		c.end(msg)
	}
	go func() {
		grace := time.NewTimer(endGrace)
		defer grace.Stop()
		for _, c := range active {
			select {
			case <-c.done:
			case <-grace.C:
				l.log.Warn("channels did not finish before the link ended", "grace", endGrace)
				l.close()
				return
			}
		}
		l.close()
	}()
}

// close is the end of the link's life, whichever side ended it: the
// downstream is closed (and with it every channel of the link, on either
// side), the link gives back its place on the upstream connection (which
// closes with its last link), leaves the server's set, and its end is
// logged and audited. Only the first call does anything.
func (l *link) close() {
	l.closeOnce.Do(func() {
		if l.unwatchUp != nil {
			l.unwatchUp()
		}
		if l.down != nil {
			l.down.Close()
		}
		l.up.release()
		s := l.srv
		s.linksMu.Lock()
		delete(s.links, l)
		s.linksMu.Unlock()
		l.log.Info("disconnected")
		ev := l.event().With(audit.Disconnected, "", "", "")
		ev.Activity = &audit.Activity{Seconds: seconds(time.Since(l.began)), BytesUp: l.bytesUp.Load(), BytesDown: l.bytesDown.Load()}
		s.audit(ev)
		close(l.done)
	})
}

// addBytes adds what a channel moved to the link's totals.
func (l *link) addBytes(up, down int64) {
	l.bytesUp.Add(up)
	l.bytesDown.Add(down)
}

// event is an audit event about this link, its type and decision fields
// to be set (see audit.Event.With).
func (l *link) event() audit.Event {
	return audit.Event{Session: l.front.id, Account: l.front.who().Name, Source: l.front.source.String(), VM: l.vm.Name, Login: l.login}
}

// decide asks the policy about a on this link.
func (l *link) decide(a ask) policy.Decision {
	return l.srv.decide(l.front, l.vm, l.login, a)
}

// revalidate asks the policy again about the link and each of its channels,
// ending what it no longer allows.
func (l *link) revalidate() {
	if d := l.decide(ask{kind: policy.Connect}); !d.Allow {
		l.log.Info("ended by a policy change", "reason", d.Reason)
		l.srv.audit(l.event().With(audit.Ended, string(policy.Connect), d.Rule, "policy change: "+d.Reason))
		l.end(fmt.Sprintf("bastion: %s: access ended by a policy change", l.vm.Name))
		return
	}
	for _, c := range l.channels() {
		if d := l.decide(c.a); !d.Allow {
			l.log.Info("channel ended by a policy change", "channel", c.a.kind, "detail", c.a.detail(), "reason", d.Reason)
			ev := l.event().With(audit.Ended, string(c.a.kind), d.Rule, "policy change: "+d.Reason)
			ev.Detail = c.a.detail()
			l.srv.audit(ev)
			c.end(fmt.Sprintf("bastion: %s: %s ended by a policy change", l.vm.Name, c.a.kind))
		}
	}
	l.revalidateGrants()
}

// establish decides whether account may reach vm as login, obtains a
// verified upstream from the resolver and logs in to the VM. Nothing is
// sent to the VM before the policy allows it.
func (s *Server) establish(fc *frontConn, d vm.Domain, login string) (*link, error) {
	account := fc.who()
	log := s.logger().With("account", account.Name, "source", fc.source.String(), "vm", d.Name, "login", login)
	ev := audit.Event{Session: fc.id, Account: account.Name, Source: fc.source.String(), VM: d.Name, Login: login}
	if err := checkLogin(login); err != nil {
		return nil, err
	}
	done, ok := s.beginPending(account.Name)
	if !ok {
		log.Warn("refused: too many links being set up", "limit", s.maxPending())
		s.audit(ev.With(audit.Denied, string(policy.Connect), "", ErrBusy.Error()))
		return nil, ErrBusy
	}
	defer done()
	dec := s.decide(fc, d, login, ask{kind: policy.Connect})
	if !dec.Allow {
		log.Info("denied", "channel", policy.Connect, "rule", dec.Rule, "reason", dec.Reason)
		s.audit(ev.With(audit.Denied, string(policy.Connect), dec.Rule, dec.Reason))
		return nil, fmt.Errorf("%w: %s", ErrDenied, dec.Reason)
	}
	if s.Resolver == nil {
		return nil, fmt.Errorf("%w: no resolver", ErrNotVerified)
	}
	ctx, cancel := context.WithTimeout(fc.ctx, s.connectTimeout())
	defer cancel()
	target, err := s.Resolver.Resolve(ctx, d, login)
	if err != nil {
		log.Warn("resolve failed", "err", err)
		s.audit(upstreamFailed(ev, err, true))
		return nil, err
	}
	l := &link{srv: s, front: fc, vm: d, login: login, log: log, done: make(chan struct{}), began: time.Now(),
		forwards: make(map[string]bool), sockets: make(map[string]bool), active: make(map[*activeChannel]bool)}
	shared := s.shareable(fc, d, login)
	dialed := time.Now()
	up, reused, err := s.connect(ctx, l, target, shared)
	if errors.Is(err, ErrUpstreamAuth) || errors.Is(err, keys.ErrHostKeyMismatch) {
		// The VM no longer takes the trust's key (configuration management
		// rewrote authorized_keys) or presents another host key: the trust
		// is stale. Verified again, once, before the user hears of it; a
		// changed host key is pinned only if the check proves it again.
		// Connections made with that trust take no more links.
		log.Info("the trust no longer holds; verifying the VM again", "err", err)
		s.Resolver.Forget(d, login, err.Error())
		s.retireShared(func(k shareKey) bool { return k.uri == d.URI && k.uuid == d.UUID && k.login == login })
		if target, err = s.Resolver.Resolve(ctx, d, login); err != nil {
			log.Warn("resolve failed", "err", err)
			s.audit(upstreamFailed(ev, err, true))
			return nil, err
		}
		dialed = time.Now()
		up, reused, err = s.connect(ctx, l, target, shared)
	}
	if err != nil {
		log.Warn("upstream failed", "addr", target.Addr, "err", err)
		s.audit(upstreamFailed(ev, err, false))
		return nil, err
	}
	l.up, l.shared = up, shared
	log.Info("connected", "addr", target.Addr, "shared", shared, "reused", reused)
	connected := ev.With(audit.Connected, "", "", "")
	// How long reaching the VM's sshd took: the wait for a turn, TCP, the
	// handshake and the bastion's authentication; or, joining a shared
	// connection, the wait for it.
	connected.Activity = &audit.Activity{Seconds: seconds(time.Since(dialed))}
	connected.Reused = reused
	s.audit(connected)
	return l, nil
}

// upstreamFailed is the upstream_failed event of err, with its cause;
// resolving says the error is the verification's, not the dial's.
func upstreamFailed(ev audit.Event, err error, resolving bool) audit.Event {
	ev = ev.With(audit.UpstreamFailed, "", "", err.Error())
	ev.Cause = upstreamCause(err, resolving)
	return ev
}

// upstreamCause names the kind of an error of reaching a VM, one of
// audit.Causes: a bounded word for metrics and alerts, where the reason
// tells the whole story.
func upstreamCause(err error, resolving bool) string {
	var te interface{ Timeout() bool }
	switch {
	case errors.Is(err, vm.ErrNoSuchVM):
		return "no_such_vm"
	case resolving:
		return "not_verified"
	case errors.Is(err, keys.ErrHostKeyMismatch):
		return "host_key"
	case errors.Is(err, ErrUpstreamAuth):
		return "auth"
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &te) && te.Timeout():
		return "timeout"
	case errors.Is(err, ErrUpstreamUnreachable):
		return "unreachable"
	default:
		return "not_verified"
	}
}

// beginPending counts one more link being set up for account, unless it
// has MaxPending already; done counts it off.
func (s *Server) beginPending(account string) (done func(), ok bool) {
	s.linksMu.Lock()
	defer s.linksMu.Unlock()
	if s.pending[account] >= s.maxPending() {
		return nil, false
	}
	if s.pending == nil {
		s.pending = make(map[string]int)
	}
	s.pending[account]++
	return func() {
		s.linksMu.Lock()
		defer s.linksMu.Unlock()
		if s.pending[account]--; s.pending[account] <= 0 {
			delete(s.pending, account)
		}
	}, true
}

// start binds the link to its downstream connection and serves what the
// VM initiates. Losing either side closes the other and ends the link.
func (l *link) start(down gossh.Conn) {
	l.down = down
	s := l.srv
	s.linksMu.Lock()
	if s.links == nil {
		s.links = make(map[*link]bool)
	}
	s.links[l] = true
	s.linksMu.Unlock()
	// The upstream ending ends the link: its channels close with the
	// downstream. The upstream keeps itself alive (upstream.go), the front
	// door its own connections.
	l.unwatchUp = context.AfterFunc(l.up.ended, func() { down.Close() })
	go func() {
		down.Wait()
		l.close()
	}()
}

// serve runs a downstream connection whose channels and requests are all
// the link's: the ProxyJump inner hop. It returns when the downstream
// connection ends; start's watcher then ends the link.
func (l *link) serve(down gossh.Conn, chans <-chan gossh.NewChannel, reqs <-chan *gossh.Request) {
	l.start(down)
	// One goroutine for both: requests are answered in order, as they
	// must be, and a channel opened meanwhile waits for the answer.
	for chans != nil || reqs != nil {
		select {
		case ch, ok := <-chans:
			if !ok {
				chans = nil
				continue
			}
			if !l.open.take(l.srv.maxChannels()) {
				ch.Reject(gossh.ResourceShortage, "bastion: too many channels open on this connection")
				continue
			}
			go func() {
				defer l.open.give()
				l.channel(ch)
			}()
		case req, ok := <-reqs:
			if !ok {
				reqs = nil
				continue
			}
			granted, payload := l.global(req)
			req.Reply(granted, payload)
		}
	}
}

// channel handles a channel the downstream opens.
func (l *link) channel(newCh gossh.NewChannel) {
	if !l.srv.audited(l.front, newCh) {
		return
	}
	switch newCh.ChannelType() {
	case "session":
		l.session(newCh)
	case "direct-tcpip":
		var dest directTCPIP
		if err := gossh.Unmarshal(newCh.ExtraData(), &dest); err != nil {
			newCh.Reject(gossh.ConnectionFailed, "bastion: malformed direct-tcpip request")
			return
		}
		a := ask{kind: policy.LocalForward, host: dest.Host, port: dest.Port}
		d := l.allow(a)
		if !d.Allow {
			newCh.Reject(gossh.Prohibited, l.denial(policy.LocalForward))
			return
		}
		l.bridge(a, d.MaxTime, newCh, l.up.conn)
	case "direct-streamlocal@openssh.com":
		// -L to a unix socket on the VM: VS Code's socket mode.
		var dest directStreamlocal
		if err := gossh.Unmarshal(newCh.ExtraData(), &dest); err != nil {
			newCh.Reject(gossh.ConnectionFailed, "bastion: malformed direct-streamlocal request")
			return
		}
		a := ask{kind: policy.LocalForward, socket: dest.SocketPath}
		d := l.allow(a)
		if !d.Allow {
			newCh.Reject(gossh.Prohibited, l.denial(policy.LocalForward))
			return
		}
		l.bridge(a, d.MaxTime, newCh, l.up.conn)
	default:
		newCh.Reject(gossh.UnknownChannelType, "bastion: unsupported channel type "+newCh.ChannelType())
	}
}

// directStreamlocal is the payload of a direct-streamlocal@openssh.com
// channel (OpenSSH's PROTOCOL, 2.4).
type directStreamlocal struct {
	SocketPath string
	Reserved   string
	Reserved2  uint32
}

// streamlocalForward is the payload of streamlocal-forward@openssh.com and
// its cancel, and the start of a forwarded-streamlocal@openssh.com
// channel's.
type streamlocalForward struct {
	SocketPath string
	Rest       []byte `ssh:"rest"`
}

// maxRemoteForwards caps the remote forwards (ports and sockets) one
// connection may hold: each is a listener on the VM.
const maxRemoteForwards = 64

// grantForward marks key granted in m (l.forwards or l.sockets), unless
// the connection holds maxRemoteForwards already and key is not one of
// them. had says whether it was granted before.
func (l *link) grantForward(m map[string]bool, key string) (had, granted bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if had = m[key]; !had && len(l.forwards)+len(l.sockets) >= maxRemoteForwards {
		l.log.Info("refused a remote forward: too many", "max", maxRemoteForwards)
		return false, false
	}
	m[key] = true
	return had, true
}

// withdraw ends the remote forward key of m, which the policy (decision d)
// no longer allows: audited, and cancelled on the VM with cancel (if not
// nil) so that its sshd stops listening.
func (l *link) withdraw(m map[string]bool, key string, d policy.Decision, cancel func()) {
	l.mu.Lock()
	delete(m, key)
	l.mu.Unlock()
	l.log.Info("remote forward cancelled by a policy change", "forward", key, "reason", d.Reason)
	ev := l.event().With(audit.Ended, string(policy.RemoteForward), d.Rule, "policy change: "+d.Reason)
	ev.Detail = key
	l.srv.audit(ev)
	if cancel != nil {
		cancel()
	}
}

// tcpipForward is the payload of tcpip-forward and cancel-tcpip-forward.
type tcpipForward struct {
	Host string
	Port uint32
}

// global answers a downstream global request. Forward requests are passed
// to the VM; everything else is hop-by-hop and answered here.
func (l *link) global(req *gossh.Request) (bool, []byte) {
	switch req.Type {
	case "tcpip-forward":
		var f tcpipForward
		if gossh.Unmarshal(req.Payload, &f) != nil {
			return false, nil
		}
		if !l.allowConnectionWide(ask{kind: policy.RemoteForward, host: f.Host, port: f.Port}) {
			return false, nil
		}
		// Granted before it is asked for upstream: the VM's sshd may open a
		// forwarded-tcpip channel the moment it binds, before its answer
		// arrives here. A port of 0 stands for the port the VM will choose.
		requested := net.JoinHostPort(f.Host, fmt.Sprint(f.Port))
		had, granted := l.grantForward(l.forwards, requested)
		if !granted {
			return false, nil
		}
		ok, reply, err := l.srv.sendRequest(l.up.conn, req.Type, true, req.Payload)
		port := f.Port
		if err == nil && ok && port == 0 {
			var bound struct{ Port uint32 }
			if gossh.Unmarshal(reply, &bound) != nil {
				ok = false
			}
			port = bound.Port
		}
		l.mu.Lock()
		// A refused request for a forward held already (asked twice)
		// leaves that one in place.
		if f.Port == 0 || (!had && (err != nil || !ok)) {
			delete(l.forwards, requested)
		}
		if err == nil && ok {
			l.forwards[net.JoinHostPort(f.Host, fmt.Sprint(port))] = true
		}
		l.mu.Unlock()
		if err != nil || !ok {
			return false, nil
		}
		return true, reply
	case "cancel-tcpip-forward":
		var f tcpipForward
		if gossh.Unmarshal(req.Payload, &f) != nil {
			return false, nil
		}
		key := net.JoinHostPort(f.Host, fmt.Sprint(f.Port))
		l.mu.Lock()
		granted := l.forwards[key]
		delete(l.forwards, key)
		l.mu.Unlock()
		if !granted {
			return false, nil
		}
		ok, reply, err := l.srv.sendRequest(l.up.conn, req.Type, true, req.Payload)
		return err == nil && ok, reply
	case "streamlocal-forward@openssh.com":
		// -R with a unix socket on the VM.
		var f streamlocalForward
		if gossh.Unmarshal(req.Payload, &f) != nil {
			return false, nil
		}
		if !l.allowConnectionWide(ask{kind: policy.RemoteForward, socket: f.SocketPath}) {
			return false, nil
		}
		// Granted before it is asked for, as for ports; withdrawn if the VM
		// refuses, unless it was granted already.
		had, granted := l.grantForward(l.sockets, f.SocketPath)
		if !granted {
			return false, nil
		}
		ok, reply, err := l.srv.sendRequest(l.up.conn, req.Type, true, req.Payload)
		if err != nil || !ok {
			if !had {
				l.mu.Lock()
				delete(l.sockets, f.SocketPath)
				l.mu.Unlock()
			}
			return false, nil
		}
		return true, reply
	case "cancel-streamlocal-forward@openssh.com":
		var f streamlocalForward
		if gossh.Unmarshal(req.Payload, &f) != nil {
			return false, nil
		}
		l.mu.Lock()
		granted := l.sockets[f.SocketPath]
		delete(l.sockets, f.SocketPath)
		l.mu.Unlock()
		if !granted {
			return false, nil
		}
		ok, reply, err := l.srv.sendRequest(l.up.conn, req.Type, true, req.Payload)
		return err == nil && ok, reply
	default:
		// keepalive@openssh.com, no-more-sessions@openssh.com and unknown
		// requests stay on this hop.
		return false, nil
	}
}

// upstreamChannel accepts a channel the VM opens if the downstream asked
// for it and the policy, asked again now, still allows it: a reload that
// withdraws agent, X11 or remote forwarding stops what the VM opens later.
func (l *link) upstreamChannel(newCh gossh.NewChannel) {
	a := ask{kind: channelKind(newCh)}
	var wanted bool
	switch newCh.ChannelType() {
	case "forwarded-tcpip":
		var p directTCPIP
		if gossh.Unmarshal(newCh.ExtraData(), &p) == nil {
			a.host, a.port = p.Host, p.Port
			l.mu.Lock()
			wanted = l.forwards[net.JoinHostPort(p.Host, fmt.Sprint(p.Port))] || l.forwards[net.JoinHostPort(p.Host, "0")]
			l.mu.Unlock()
		}
	case "forwarded-streamlocal@openssh.com":
		var p streamlocalForward
		if gossh.Unmarshal(newCh.ExtraData(), &p) == nil {
			a.socket = p.SocketPath
			l.mu.Lock()
			wanted = l.sockets[p.SocketPath]
			l.mu.Unlock()
		}
	case "auth-agent@openssh.com":
		l.mu.Lock()
		wanted = l.agent
		l.mu.Unlock()
	case "x11":
		l.mu.Lock()
		wanted = l.x11
		l.mu.Unlock()
	}
	if !wanted {
		l.log.Warn("refused a channel opened by the VM", "type", newCh.ChannelType())
		newCh.Reject(gossh.Prohibited, "not requested")
		return
	}
	d := l.allow(a)
	if !d.Allow {
		newCh.Reject(gossh.Prohibited, "denied by policy")
		return
	}
	go l.bridge(a, d.MaxTime, newCh, l.down)
}

// revalidateGrants withdraws what the downstream was granted and the policy
// no longer allows: remote forwards are cancelled on the VM, so its sshd
// stops listening; agent and X11 forwarding end for channels to come.
func (l *link) revalidateGrants() {
	l.mu.Lock()
	forwards := slices.Collect(maps.Keys(l.forwards))
	sockets := slices.Collect(maps.Keys(l.sockets))
	agent, x11 := l.agent, l.x11
	l.mu.Unlock()
	for _, path := range sockets {
		if d := l.decide(ask{kind: policy.RemoteForward, socket: path}); !d.Allow {
			l.withdraw(l.sockets, path, d, func() {
				l.srv.sendRequest(l.up.conn, "cancel-streamlocal-forward@openssh.com", true, gossh.Marshal(streamlocalForward{SocketPath: path}))
			})
		}
	}
	for _, f := range forwards {
		host, portText, _ := net.SplitHostPort(f)
		port, _ := strconv.ParseUint(portText, 10, 32)
		d := l.decide(ask{kind: policy.RemoteForward, host: host, port: uint32(port)})
		if d.Allow {
			continue
		}
		var cancel func()
		if port != 0 {
			cancel = func() {
				l.srv.sendRequest(l.up.conn, "cancel-tcpip-forward", true, gossh.Marshal(tcpipForward{Host: host, Port: uint32(port)}))
			}
		}
		l.withdraw(l.forwards, f, d, cancel)
	}
	for _, g := range []struct {
		kind policy.Channel
		on   bool
		off  func()
	}{
		{policy.Agent, agent, func() { l.agent = false }},
		{policy.X11, x11, func() { l.x11 = false }},
	} {
		if g.on && !l.decide(ask{kind: g.kind}).Allow {
			l.mu.Lock()
			g.off()
			l.mu.Unlock()
			l.log.Info("forwarding withdrawn by a policy change", "channel", g.kind)
		}
	}
}

// channelKind is the policy kind of a channel the VM opens.
func channelKind(newCh gossh.NewChannel) policy.Channel {
	switch newCh.ChannelType() {
	case "forwarded-tcpip", "forwarded-streamlocal@openssh.com":
		return policy.RemoteForward
	case "x11":
		return policy.X11
	}
	return policy.Agent
}

// allow asks the policy about one channel of this link and audits a denial.
func (l *link) allow(a ask) policy.Decision {
	d := l.decide(a)
	if !d.Allow {
		l.log.Info("denied", "channel", a.kind, "detail", a.detail(), "rule", d.Rule, "reason", d.Reason)
		ev := l.event().With(audit.Denied, string(a.kind), d.Rule, d.Reason)
		ev.Detail = a.detail()
		l.srv.audit(ev)
	}
	return d
}

// allowConnectionWide asks the policy about a, one of the kinds that
// belong to a whole upstream connection (remote forwarding, agent, X11),
// and refuses it all the same on a shared connection. Each refusal is
// audited with its own reason.
func (l *link) allowConnectionWide(a ask) bool {
	return l.allow(a).Allow && !l.refuseShared(a)
}

// refuseShared refuses, as the policy does, what a link on a shared
// upstream connection cannot have: remote forwarding, agent and X11, whose
// channels the VM would open on a connection other links use. The policy
// could not allow them when the link was made (shareable); after a reload
// that allows them, a new link has a connection of its own.
func (l *link) refuseShared(a ask) bool {
	if !l.shared {
		return false
	}
	reason := "the link shares its upstream connection, made when the policy could not allow " + string(a.kind) + "; a new connection can have it"
	l.log.Info("denied", "channel", a.kind, "detail", a.detail(), "reason", reason)
	ev := l.event().With(audit.Denied, string(a.kind), "", reason)
	ev.Detail = a.detail()
	l.srv.audit(ev)
	return true
}

// denial is what the user is told when the policy refuses kind.
func (l *link) denial(kind policy.Channel) string {
	return fmt.Sprintf("bastion: %s: %s denied by policy", l.vm.Name, kind)
}

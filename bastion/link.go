package bastion

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/policy"
)

// Upstream is a verified way into one VM for one login: where its sshd
// listens, the host keys it must present, and the key to log in with.
type Upstream struct {
	Addr     string
	HostKeys []gossh.PublicKey
	Signer   gossh.Signer
}

// link is one downstream connection bound to one login on one VM, and the
// upstream connection to that VM's sshd that serves it. The downstream is
// either the ProxyJump inner hop or a front-door connection whose user name
// is login@vm.
type link struct {
	srv     *Server
	account Account
	source  net.Addr
	vm      VM
	login   string
	log     *slog.Logger

	up      gossh.Conn
	upChans <-chan gossh.NewChannel
	upReqs  <-chan *gossh.Request

	down gossh.Conn // set by start, before any channel is handled

	maxTime time.Duration // from the deciding rule; 0 means no limit

	mu       sync.Mutex              // protects the fields below
	forwards map[string]bool         // remote forwards granted to the downstream, "host:port"
	agent    bool                    // the downstream asked for, and was allowed, agent forwarding
	x11      bool                    // likewise for X11
	active   map[*activeChannel]bool // channels in use, for revalidation
}

// activeChannel is a channel in use on a link: what the policy allowed it
// for, and how to end it.
type activeChannel struct {
	a   ask
	end func(msg string) // ends the channel, telling the user msg where it can
}

// track records a channel in use until the returned function is called.
func (l *link) track(a ask, end func(msg string)) (untrack func()) {
	c := &activeChannel{a: a, end: end}
	l.mu.Lock()
	l.active[c] = true
	l.mu.Unlock()
	return func() {
		l.mu.Lock()
		delete(l.active, c)
		l.mu.Unlock()
	}
}

// end ends every channel of the link with msg, then the link itself.
func (l *link) end(msg string) {
	l.mu.Lock()
	var active []*activeChannel
	for c := range l.active {
		active = append(active, c)
	}
	l.mu.Unlock()
	for _, c := range active {
		c.end(msg)
	}
	// Give the messages a moment on the wire before the connection goes.
	time.AfterFunc(500*time.Millisecond, func() {
		l.up.Close()
		l.down.Close()
	})
}

// revalidate asks the policy again about the link and each of its channels,
// ending what it no longer allows.
func (l *link) revalidate() {
	if d := l.srv.decide(l.account, l.source, l.vm, l.login, ask{kind: policy.Connect}); !d.Allow {
		l.log.Info("ended by a policy change", "reason", d.Reason)
		l.srv.audit(Event{Type: EventEnded, Account: l.account.Name, Source: l.source.String(), VM: l.vm.Name,
			Login: l.login, Channel: string(policy.Connect), Rule: d.Rule, Reason: "policy change: " + d.Reason})
		l.end(fmt.Sprintf("bastion: %s: access ended by a policy change", l.vm.Name))
		return
	}
	l.mu.Lock()
	var active []*activeChannel
	for c := range l.active {
		active = append(active, c)
	}
	l.mu.Unlock()
	for _, c := range active {
		if d := l.srv.decide(l.account, l.source, l.vm, l.login, c.a); !d.Allow {
			l.log.Info("channel ended by a policy change", "channel", c.a.kind, "detail", c.a.detail(), "reason", d.Reason)
			l.srv.audit(Event{Type: EventEnded, Account: l.account.Name, Source: l.source.String(), VM: l.vm.Name,
				Login: l.login, Channel: string(c.a.kind), Detail: c.a.detail(), Rule: d.Rule, Reason: "policy change: " + d.Reason})
			c.end(fmt.Sprintf("bastion: %s: %s ended by a policy change", l.vm.Name, c.a.kind))
		}
	}
}

// establish decides whether account may reach vm as login, obtains a
// verified upstream from the resolver and logs in to the VM. Nothing is
// sent to the VM before the policy allows it.
func (s *Server) establish(ctx context.Context, account Account, source net.Addr, vm VM, login string) (*link, error) {
	log := s.logger().With("account", account.Name, "source", source.String(), "vm", vm.Name, "login", login)
	ev := Event{Account: account.Name, Source: source.String(), VM: vm.Name, Login: login}
	if err := checkLogin(login); err != nil {
		return nil, err
	}
	d := s.decide(account, source, vm, login, ask{kind: policy.Connect})
	if !d.Allow {
		log.Info("denied", "channel", policy.Connect, "rule", d.Rule, "reason", d.Reason)
		s.audit(ev.with(EventDenied, string(policy.Connect), d.Rule, d.Reason))
		return nil, fmt.Errorf("%w: %s", ErrDenied, d.Reason)
	}
	ctx, cancel := context.WithTimeout(ctx, s.connectTimeout())
	defer cancel()
	target, err := s.Resolver.Resolve(ctx, vm, login)
	if err != nil {
		log.Warn("resolve failed", "err", err)
		s.audit(ev.with(EventUpstreamFailed, "", "", err.Error()))
		return nil, err
	}
	l := &link{srv: s, account: account, source: source, vm: vm, login: login, log: log, maxTime: d.MaxTime,
		forwards: make(map[string]bool), active: make(map[*activeChannel]bool)}
	if err := l.dial(ctx, target); err != nil {
		log.Warn("upstream failed", "addr", target.Addr, "err", err)
		s.audit(ev.with(EventUpstreamFailed, "", "", err.Error()))
		return nil, err
	}
	log.Info("connected", "addr", target.Addr)
	s.audit(ev.with(EventConnected, "", "", ""))
	return l, nil
}

// dial connects to the VM's sshd, requiring one of the pinned host keys,
// and logs in with the upstream's signer.
func (l *link) dial(ctx context.Context, target Upstream) error {
	if len(target.HostKeys) == 0 {
		return fmt.Errorf("%w: no host key is pinned", ErrNotVerified)
	}
	var algos []string
	for _, k := range target.HostKeys {
		algos = append(algos, hostKeyAlgorithms(k)...)
	}
	var mismatch error
	config := &gossh.ClientConfig{
		User:              l.login,
		Auth:              []gossh.AuthMethod{gossh.PublicKeys(target.Signer)},
		HostKeyAlgorithms: algos,
		HostKeyCallback: func(_ string, _ net.Addr, key gossh.PublicKey) error {
			for _, pinned := range target.HostKeys {
				if bytes.Equal(pinned.Marshal(), key.Marshal()) {
					return nil
				}
			}
			mismatch = fmt.Errorf("%w: presented %s %s", ErrHostKeyMismatch, key.Type(), gossh.FingerprintSHA256(key))
			return mismatch
		},
		ClientVersion: l.srv.version(),
	}
	var d net.Dialer
	tcp, err := d.DialContext(ctx, "tcp", target.Addr)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrUpstreamUnreachable, err)
	}
	nc := newBulkConn(tcp)
	// The handshake honours ctx through the connection's deadline.
	if deadline, ok := ctx.Deadline(); ok {
		nc.SetDeadline(deadline)
	}
	conn, chans, reqs, err := gossh.NewClientConn(nc, target.Addr, config)
	if err != nil {
		nc.Close()
		switch {
		case mismatch != nil:
			return mismatch
		// x/crypto reports a refused login only in the error's text.
		case strings.Contains(err.Error(), "unable to authenticate"):
			return fmt.Errorf("%w: %v", ErrUpstreamAuth, err)
		default:
			return fmt.Errorf("%w: %v", ErrUpstreamUnreachable, err)
		}
	}
	nc.SetDeadline(time.Time{})
	l.up, l.upChans, l.upReqs = conn, chans, reqs
	return nil
}

// hostKeyAlgorithms lists the algorithms under which key may be presented.
func hostKeyAlgorithms(key gossh.PublicKey) []string {
	if key.Type() == gossh.KeyAlgoRSA {
		return []string{gossh.KeyAlgoRSASHA512, gossh.KeyAlgoRSASHA256}
	}
	return []string{key.Type()}
}

// start binds the link to its downstream connection and serves what the
// VM initiates. Losing either side closes the other.
func (l *link) start(down gossh.Conn) {
	l.down = down
	go l.upstream()
	l.srv.keepalive(l.up) // the front door keeps its own connections alive
	s := l.srv
	s.linksMu.Lock()
	if s.links == nil {
		s.links = make(map[*link]bool)
	}
	s.links[l] = true
	s.linksMu.Unlock()
	var limit *time.Timer
	if l.maxTime > 0 {
		limit = time.AfterFunc(l.maxTime, func() {
			l.log.Info("session time limit reached", "limit", l.maxTime)
			s.audit(Event{Type: EventEnded, Account: l.account.Name, Source: l.source.String(), VM: l.vm.Name,
				Login: l.login, Reason: fmt.Sprintf("time limit %v", l.maxTime)})
			l.end(fmt.Sprintf("bastion: %s: session time limit (%v) reached", l.vm.Name, l.maxTime))
		})
	}
	go func() {
		down.Wait()
		l.up.Close()
		if limit != nil {
			limit.Stop()
		}
		s.linksMu.Lock()
		delete(s.links, l)
		s.linksMu.Unlock()
	}()
}

// serve runs a downstream connection whose channels and requests are all
// the link's: the ProxyJump inner hop.
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
			go l.channel(ch)
		case req, ok := <-reqs:
			if !ok {
				reqs = nil
				continue
			}
			granted, payload := l.global(req)
			req.Reply(granted, payload)
		}
	}
	l.up.Close()
	l.log.Info("disconnected")
	l.srv.audit(Event{Type: EventDisconnected, Account: l.account.Name, Source: l.source.String(), VM: l.vm.Name, Login: l.login})
}

// channel handles a channel the downstream opens.
func (l *link) channel(newCh gossh.NewChannel) {
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
		if !l.allow(a).Allow {
			newCh.Reject(gossh.Prohibited, l.denial(policy.LocalForward))
			return
		}
		l.bridge(a, newCh, l.up)
	default:
		newCh.Reject(gossh.UnknownChannelType, "bastion: unsupported channel type "+newCh.ChannelType())
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
		if !l.allow(ask{kind: policy.RemoteForward, host: f.Host, port: f.Port}).Allow {
			return false, nil
		}
		// Granted before it is asked for upstream: the VM's sshd may open a
		// forwarded-tcpip channel the moment it binds, before its answer
		// arrives here. A port of 0 stands for the port the VM will choose.
		requested := net.JoinHostPort(f.Host, fmt.Sprint(f.Port))
		l.mu.Lock()
		l.forwards[requested] = true
		l.mu.Unlock()
		ok, reply, err := l.srv.sendRequest(l.up, req.Type, true, req.Payload)
		port := f.Port
		if err == nil && ok && port == 0 {
			var bound struct{ Port uint32 }
			if gossh.Unmarshal(reply, &bound) != nil {
				ok = false
			}
			port = bound.Port
		}
		l.mu.Lock()
		if f.Port == 0 || err != nil || !ok {
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
		ok, reply, err := l.srv.sendRequest(l.up, req.Type, true, req.Payload)
		return err == nil && ok, reply
	default:
		// keepalive@openssh.com, no-more-sessions@openssh.com and unknown
		// requests stay on this hop.
		return false, nil
	}
}

// upstream handles what the VM sends unasked until its connection ends,
// then closes the downstream. Channels: forwarded-tcpip for a remote
// forward the downstream asked for, and agent or X11 channels when the
// downstream asked for those; anything else is refused. Global requests
// (hostkeys-00, …) are hop-by-hop: answered false.
func (l *link) upstream() {
	chans, reqs := l.upChans, l.upReqs
	for chans != nil || reqs != nil {
		select {
		case newCh, ok := <-chans:
			if !ok {
				chans = nil
				continue
			}
			l.upstreamChannel(newCh)
		case req, ok := <-reqs:
			if !ok {
				reqs = nil
				continue
			}
			if req.WantReply {
				req.Reply(false, nil)
			}
		}
	}
	l.down.Close()
}

// upstreamChannel accepts a channel the VM opens if the downstream asked
// for it.
func (l *link) upstreamChannel(newCh gossh.NewChannel) {
	var wanted bool
	switch newCh.ChannelType() {
	case "forwarded-tcpip":
		var p directTCPIP
		if gossh.Unmarshal(newCh.ExtraData(), &p) == nil {
			l.mu.Lock()
			wanted = l.forwards[net.JoinHostPort(p.Host, fmt.Sprint(p.Port))] || l.forwards[net.JoinHostPort(p.Host, "0")]
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
	go l.bridge(ask{kind: channelKind(newCh)}, newCh, l.down)
}

// channelKind is the policy kind of a channel the VM opens.
func channelKind(newCh gossh.NewChannel) policy.Channel {
	switch newCh.ChannelType() {
	case "forwarded-tcpip":
		return policy.RemoteForward
	case "x11":
		return policy.X11
	}
	return policy.Agent
}

// allow asks the policy about one channel of this link and audits a denial.
func (l *link) allow(a ask) policy.Decision {
	d := l.srv.decide(l.account, l.source, l.vm, l.login, a)
	if !d.Allow {
		l.log.Info("denied", "channel", a.kind, "detail", a.detail(), "rule", d.Rule, "reason", d.Reason)
		l.srv.audit(Event{Type: EventDenied, Account: l.account.Name, Source: l.source.String(), VM: l.vm.Name,
			Login: l.login, Channel: string(a.kind), Detail: a.detail(), Rule: d.Rule, Reason: d.Reason})
	}
	return d
}

// denial is what the user is told when the policy refuses kind.
func (l *link) denial(kind policy.Channel) string {
	return fmt.Sprintf("bastion: %s: %s denied by policy", l.vm.Name, kind)
}

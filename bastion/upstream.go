package bastion

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"syscall"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/policy"
	"github.com/bastionvm/bastion/vm"
)

// upstream is one SSH connection to a VM's sshd and the links it serves.
//
// A link that can never need what belongs to a whole connection (remote
// forwards, whose channels the VM opens on the connection that asked for
// them, and agent and X11 forwarding, whose channels the VM opens back)
// shares one with the same account's other such links to the same login
// on the same VM, as long as the resolver still returns the target it was
// dialled with: up to UpstreamMaxSessions sessions. Any other link has one
// of its own, which closes when the link ends. A shared connection whose
// last link ends stays open for UpstreamLinger, idle, for the account's
// next link to the login (the next `ssh -J` of a script, an IDE's next
// connection): no handshake at the VM then. Every link on a connection
// ends when it does.
type upstream struct {
	srv    *Server
	key    shareKey      // its place in srv.shared; zero for a link's own
	target keys.Upstream // what it was dialled with

	// ready is closed once the dial has ended: then conn is set, or err.
	ready chan struct{}
	conn  gossh.Conn
	err   error

	ended    context.Context    // done once conn has closed
	endedNow context.CancelFunc // ends ended

	// Protected by srv.linksMu:
	links   int         // links holding it, those waiting for its dial included
	slots   int         // sessions counted against the cap: each link's open sessions, at least one a link
	retired bool        // takes no more links: its trust was dropped, its dial failed, or it closed
	full    bool        // the VM refused a session on it (its MaxSessions is below the cap): no more links
	idle    *time.Timer // set while it lingers with no link, to close it
}

// DefaultUpstreamLinger is server.upstream_linger's default.
const DefaultUpstreamLinger = 15 * time.Second

// maxIdleUpstreams caps the shared connections lingering with no link at
// once, over all accounts: past it, a connection whose last link ends
// closes at once.
const maxIdleUpstreams = 1000

// shareKey is what links sharing an upstream have in common: the account,
// the VM (its hypervisor and UUID) and the login. The target is compared
// besides.
type shareKey struct {
	account, uri, uuid, login string
}

// connectionKinds are the channel kinds that belong to a whole upstream
// connection rather than to one link's channels.
var connectionKinds = []policy.Channel{policy.RemoteForward, policy.Agent, policy.X11}

// shareable reports whether a link of fc to login on d may share an
// upstream connection: sharing is on, and neither the policy (at any time)
// nor fc's certificate could let it use remote forwarding, agent or X11.
func (s *Server) shareable(fc *frontConn, d vm.Domain, login string) bool {
	if s.upstreamMaxSessions() <= 1 || s.Policy == nil {
		return false
	}
	var kinds []policy.Channel
	for _, k := range connectionKinds {
		if fc.certRefuses(k) == "" {
			kinds = append(kinds, k)
		}
	}
	if len(kinds) == 0 {
		return true
	}
	account := fc.who()
	return !s.Policy.Possible(policy.Request{Account: account.Name, Groups: account.Groups, Source: sourceAddr(fc.source), VM: d, Login: login}, kinds...)
}

// sameTarget reports whether a and b are one verified way in: the same
// address, the same pinned host keys in the same order, and the same key
// of the bastion's (one trust epoch).
func sameTarget(a, b keys.Upstream) bool {
	if a.Addr != b.Addr || len(a.HostKeys) != len(b.HostKeys) || a.Signer == nil || b.Signer == nil {
		return false
	}
	for i := range a.HostKeys {
		if !bytes.Equal(a.HostKeys[i].Marshal(), b.HostKeys[i].Marshal()) {
			return false
		}
	}
	return bytes.Equal(a.Signer.PublicKey().Marshal(), b.Signer.PublicKey().Marshal())
}

// connect gives l an upstream connection to target: if shared, one the
// account's links to the same login on the VM share already, dialled
// with the same target and with a session to spare (waiting, within ctx,
// for one being dialled); otherwise, or if there is none, a new one.
// reused says no dial was made for l.
func (s *Server) connect(ctx context.Context, l *link, target keys.Upstream, shared bool) (up *upstream, reused bool, err error) {
	key := shareKey{account: l.front.who().Name, uri: l.vm.URI, uuid: l.vm.UUID, login: l.login}
	for {
		s.linksMu.Lock()
		if shared {
			if up = s.joinShared(key, target); up != nil {
				s.linksMu.Unlock()
				select {
				case <-up.ready:
				case <-ctx.Done():
					up.release()
					return nil, false, fmt.Errorf("%w: waiting for a connection being made: %w", ErrUpstreamUnreachable, ctx.Err())
				}
				if up.err == nil && up.ended.Err() == nil {
					return up, true, nil
				}
				up.release() // its dial failed, or it died meanwhile: make one
				continue
			}
		}
		up = &upstream{srv: s, target: target, ready: make(chan struct{}), links: 1, slots: 1}
		up.ended, up.endedNow = context.WithCancel(context.Background())
		if shared {
			up.key = key
			if s.shared == nil {
				s.shared = make(map[shareKey][]*upstream)
			}
			s.shared[key] = append(s.shared[key], up)
		}
		s.linksMu.Unlock()
		conn, chans, reqs, err := s.dial(ctx, l.log, l.login, target)
		if err != nil {
			s.linksMu.Lock()
			up.err = err
			s.retire(up)
			s.linksMu.Unlock()
			close(up.ready)
			up.release()
			return nil, false, err
		}
		s.linksMu.Lock()
		up.conn = conn
		s.linksMu.Unlock()
		close(up.ready)
		route := l.upstreamChannel
		if shared {
			route = func(newCh gossh.NewChannel) {
				l.log.Warn("refused a channel the VM opened on a shared connection", "type", newCh.ChannelType())
				newCh.Reject(gossh.Prohibited, "not requested")
			}
		}
		go up.serve(chans, reqs, route)
		s.keepalive(up.ended, conn) // once per connection, whatever the links on it
		return up, false, nil
	}
}

// joinShared takes a place on one of the shared upstreams of key dialled
// with target that is not retired and has a session to spare, or returns
// nil. srv.linksMu is held.
func (s *Server) joinShared(key shareKey, target keys.Upstream) *upstream {
	for _, up := range s.shared[key] {
		if up.retired || up.full || up.slots >= s.upstreamMaxSessions() || !sameTarget(up.target, target) {
			continue
		}
		if up.ended.Err() != nil {
			continue
		}
		s.wake(up)
		up.links++
		up.slots++
		return up
	}
	return nil
}

// retire takes up out of the shared set: it serves the links it has and
// takes no more. srv.linksMu is held.
func (s *Server) retire(up *upstream) {
	if up.retired {
		return
	}
	up.retired = true
	if up.idle != nil {
		s.wake(up)
		go up.conn.Close() // no link holds it
	}
	if up.key == (shareKey{}) {
		return
	}
	list := slices.DeleteFunc(s.shared[up.key], func(u *upstream) bool { return u == up })
	if len(list) == 0 {
		delete(s.shared, up.key)
	} else {
		s.shared[up.key] = list
	}
}

// retireShared retires the shared upstreams whose trust was dropped: those
// matching match. New links to them verify again and dial anew.
func (s *Server) retireShared(match func(shareKey) bool) {
	s.linksMu.Lock()
	defer s.linksMu.Unlock()
	for key, list := range s.shared {
		if !match(key) {
			continue
		}
		for _, up := range slices.Clone(list) {
			s.retire(up)
		}
	}
}

// release gives back one link's place (and its session slot) on up; the
// last one closes the connection.
func (up *upstream) release() {
	s := up.srv
	s.linksMu.Lock()
	up.links--
	up.slots--
	var closing gossh.Conn
	if up.links == 0 && !s.linger(up) {
		s.retire(up)
		closing = up.conn
	}
	s.linksMu.Unlock()
	if closing != nil {
		closing.Close()
	}
}

// linger keeps up open with no link, for UpstreamLinger, if it is shared
// and may take links still; it reports whether it does. srv.linksMu is
// held.
func (s *Server) linger(up *upstream) bool {
	if s.UpstreamLinger <= 0 || up.key == (shareKey{}) || up.retired || up.full || up.conn == nil || up.ended.Err() != nil ||
		s.idleUpstreams >= maxIdleUpstreams || s.Draining() {
		return false
	}
	s.idleUpstreams++
	var timer *time.Timer
	timer = time.AfterFunc(s.UpstreamLinger, func() {
		s.linksMu.Lock()
		defer s.linksMu.Unlock()
		if up.idle == timer { // no link took it meanwhile
			s.retire(up) // closes it
		}
	})
	up.idle = timer
	return true
}

// wake ends up's lingering, as a link takes it or it is retired.
// srv.linksMu is held.
func (s *Server) wake(up *upstream) {
	if up.idle != nil {
		up.idle.Stop()
		up.idle = nil
		s.idleUpstreams--
	}
}

// closeIdle closes the shared connections lingering with no link, as the
// server stops.
func (s *Server) closeIdle() {
	s.linksMu.Lock()
	defer s.linksMu.Unlock()
	for _, list := range s.shared {
		for _, up := range slices.Clone(list) {
			if up.idle != nil {
				s.retire(up)
			}
		}
	}
}

// sessionOpened counts one more session channel of l on its upstream: a
// link's first is counted when it joins. The returned function counts it
// off.
func (l *link) sessionOpened() (closed func()) {
	s := l.srv
	s.linksMu.Lock()
	if l.sessions++; l.sessions > 1 {
		l.up.slots++
	}
	s.linksMu.Unlock()
	return func() {
		s.linksMu.Lock()
		if l.sessions > 1 {
			l.up.slots--
		}
		l.sessions--
		s.linksMu.Unlock()
	}
}

// sessionRefused notes that the VM refused a session on up, as sshd does
// past its MaxSessions: if up is shared, it takes no more links, which
// dial a connection of their own instead. Its links go on.
func (up *upstream) sessionRefused(err error) {
	var refused *gossh.OpenChannelError
	if up.key == (shareKey{}) || !errors.As(err, &refused) {
		return
	}
	up.srv.linksMu.Lock()
	up.full = true
	up.srv.linksMu.Unlock()
}

// serve handles what the VM sends unasked until the connection ends:
// channels go to route; global requests (hostkeys-00, …) are hop-by-hop
// and answered false. Then up is retired and ended, which ends its links.
func (up *upstream) serve(chans <-chan gossh.NewChannel, reqs <-chan *gossh.Request, route func(gossh.NewChannel)) {
	for chans != nil || reqs != nil {
		select {
		case newCh, ok := <-chans:
			if !ok {
				chans = nil
				continue
			}
			route(newCh)
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
	up.srv.linksMu.Lock()
	up.srv.retire(up)
	up.srv.linksMu.Unlock()
	up.endedNow()
}

// dial connects to the VM's sshd, requiring one of the pinned host keys,
// and logs in as login with the upstream's signer. At most
// UpstreamHandshakes run against one VM at once, the others waiting their
// turn within ctx: every upstream connection comes from the bastion's
// address, and sshd drops unauthenticated connections past its
// MaxStartups. One that sshd resets before authentication all the same is
// tried again, with a growing pause; a refused connection is tried again
// by keys.DialSSHD for the few seconds sshd takes to restart.
func (s *Server) dial(ctx context.Context, log *slog.Logger, login string, target keys.Upstream) (gossh.Conn, <-chan gossh.NewChannel, <-chan *gossh.Request, error) {
	if len(target.HostKeys) == 0 {
		return nil, nil, nil, fmt.Errorf("%w: no host key is pinned", ErrNotVerified)
	}
	turn, err := s.upstreamTurn(ctx, target.Addr)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%w: waiting for a turn to connect: %w", ErrUpstreamUnreachable, err)
	}
	defer turn()
	pause := 50 * time.Millisecond
	for {
		conn, chans, reqs, err := s.handshake(ctx, login, target)
		if err == nil || !droppedBeforeAuth(err) {
			return conn, chans, reqs, err
		}
		log.Debug("the VM's sshd dropped the connection; trying again", "pause", pause, "err", err)
		select {
		case <-time.After(pause):
		case <-ctx.Done():
			return nil, nil, nil, err
		}
		pause = min(2*pause, 2*time.Second)
	}
}

// droppedBeforeAuth reports whether a handshake error is sshd closing or
// resetting a connection it would not start, as it does past MaxStartups.
func droppedBeforeAuth(err error) bool {
	return errors.Is(err, ErrUpstreamUnreachable) && (errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF))
}

// handshake is one attempt of dial.
func (s *Server) handshake(ctx context.Context, login string, target keys.Upstream) (gossh.Conn, <-chan gossh.NewChannel, <-chan *gossh.Request, error) {
	tcp, err := keys.DialSSHD(ctx, target.Addr)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%w: %w", ErrUpstreamUnreachable, err)
	}
	nc := newBulkConn(tcp)
	// The handshake honours ctx through the connection's deadline.
	if deadline, ok := ctx.Deadline(); ok {
		nc.SetDeadline(deadline)
	}
	config := target.ClientConfig(login, s.version())
	config.Ciphers = UpstreamCiphers(s.Ciphers) // as a client, the bastion's order is the preference
	conn, chans, reqs, err := gossh.NewClientConn(nc, target.Addr, config)
	if err != nil {
		nc.Close()
		switch {
		case errors.Is(err, keys.ErrHostKeyMismatch):
			return nil, nil, nil, err
		// x/crypto reports a refused login only in the error's text.
		case strings.Contains(err.Error(), "unable to authenticate"):
			return nil, nil, nil, fmt.Errorf("%w: %w", ErrUpstreamAuth, err)
		default:
			return nil, nil, nil, fmt.Errorf("%w: %w", ErrUpstreamUnreachable, err)
		}
	}
	nc.SetDeadline(time.Time{})
	return conn, chans, reqs, nil
}

// upstreamTurn waits, within ctx, for one of the UpstreamHandshakes turns
// of the VM at addr; done gives it back.
func (s *Server) upstreamTurn(ctx context.Context, addr string) (done func(), err error) {
	s.linksMu.Lock()
	if s.turns == nil {
		s.turns = make(map[string]*turns)
	}
	t := s.turns[addr]
	if t == nil {
		t = &turns{c: make(chan struct{}, s.upstreamHandshakes())}
		s.turns[addr] = t
	}
	t.users++
	s.linksMu.Unlock()
	leave := func() {
		s.linksMu.Lock()
		if t.users--; t.users == 0 {
			delete(s.turns, addr)
		}
		s.linksMu.Unlock()
	}
	select {
	case t.c <- struct{}{}:
		return func() { <-t.c; leave() }, nil
	case <-ctx.Done():
		leave()
		return nil, ctx.Err()
	}
}

// turns are the handshakes with one VM allowed at once, and how many
// links use them (so that the entry goes when none does).
type turns struct {
	c     chan struct{}
	users int
}

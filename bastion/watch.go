package bastion

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/policy"
	"github.com/bastionvm/bastion/vm"
)

// A running session with a terminal can be watched: `ssh carol@bastion
// watch ID` shows its output as it happens, read-only, to an account the
// policy allows the watch channel on the session's VM.

const (
	maxWatchers   = 8        // per session
	watchBacklog  = 256      // chunks a watcher may fall behind before it is dropped
	watchTailSize = 16 << 10 // the latest output a watcher is shown on joining
)

// live is a watchable session: its output goes to each watcher.
type live struct {
	id      string
	account string
	vm      vm.Domain
	login   string
	marker  func(string) // records a marker in the session's recording, if any

	mu       sync.Mutex
	tail     []byte // the last watchTailSize bytes of output
	watchers map[*watcher]bool
	ended    bool
}

// watcher is one person watching: chunks of output, closed when the
// session ends or the watcher falls too far behind.
type watcher struct {
	c       chan []byte
	dropped bool // closed for falling behind
}

// publish hands p to every watcher. A watcher that cannot keep up is
// dropped: it never slows the session.
func (lv *live) publish(p []byte) {
	lv.mu.Lock()
	defer lv.mu.Unlock()
	lv.tail = append(lv.tail, p...)
	if over := len(lv.tail) - watchTailSize; over > 0 {
		lv.tail = append(lv.tail[:0], lv.tail[over:]...)
	}
	if len(lv.watchers) == 0 {
		return
	}
	chunk := append([]byte(nil), p...)
	for w := range lv.watchers {
		select {
		case w.c <- chunk:
		default:
			w.dropped = true
			close(w.c)
			delete(lv.watchers, w)
		}
	}
}

// join adds a watcher, with the latest output to start from.
func (lv *live) join() (*watcher, []byte, error) {
	lv.mu.Lock()
	defer lv.mu.Unlock()
	if lv.ended {
		return nil, nil, fmt.Errorf("session %s has ended", lv.id)
	}
	if len(lv.watchers) >= maxWatchers {
		return nil, nil, fmt.Errorf("session %s has %d watchers already", lv.id, maxWatchers)
	}
	w := &watcher{c: make(chan []byte, watchBacklog)}
	if lv.watchers == nil {
		lv.watchers = make(map[*watcher]bool)
	}
	lv.watchers[w] = true
	return w, append([]byte(nil), lv.tail...), nil
}

// leave removes w, if the session has not already.
func (lv *live) leave(w *watcher) {
	lv.mu.Lock()
	defer lv.mu.Unlock()
	if lv.watchers[w] {
		delete(lv.watchers, w)
		close(w.c)
	}
}

// end closes every watcher: the session is over.
func (lv *live) end() {
	lv.mu.Lock()
	defer lv.mu.Unlock()
	lv.ended = true
	for w := range lv.watchers {
		close(w.c)
		delete(lv.watchers, w)
	}
}

// goLive makes a session watchable under id until the returned function
// is called.
func (s *Server) goLive(lv *live) func() {
	s.linksMu.Lock()
	if s.lives == nil {
		s.lives = make(map[string]*live)
	}
	s.lives[lv.id] = lv
	s.linksMu.Unlock()
	return func() {
		s.linksMu.Lock()
		delete(s.lives, lv.id)
		s.linksMu.Unlock()
		lv.end()
	}
}

// watch runs `watch ID` on ch: the running session's output until it
// ends, the watcher types ^C or q, or the channel closes. Nothing the
// watcher sends reaches the session.
func (s *Server) watch(fc *frontConn, ch gossh.Channel, line string, args []string) {
	ev := audit.Event{Session: fc.id, Account: fc.who().Name, Source: fc.source.String(), Channel: string(policy.Watch)}
	act := audit.Activity{ChannelID: fc.channelN.Add(1), Kind: "exec", Command: cut(line, maxCommandAudited)}
	fail := func(msg string) {
		fmt.Fprintf(ch.Stderr(), "bastion: %s\r\n", msg)
		sendExitStatus(ch, 1)
		ch.Close()
	}
	if len(args) != 2 {
		fail("usage: watch ID (the session ids are in `bastion sessions ls` and the audit trail)")
		return
	}
	id := args[1]
	s.linksMu.Lock()
	lv := s.lives[id]
	s.linksMu.Unlock()
	if lv == nil {
		// The same answer for a session that does not exist and one the
		// policy hides: ids are not to be probed.
		s.audit(ev.With(audit.Denied, string(policy.Watch), "", "no running session "+cut(id, 64)+" with a terminal"))
		fail(fmt.Sprintf("no running session %s with a terminal", cut(id, 64)))
		return
	}
	ev.VM, ev.Login = lv.vm.Name, lv.login
	if d := s.decide(fc, lv.vm, lv.login, ask{kind: policy.Watch}); !d.Allow {
		s.logger().Info("denied", "account", fc.who().Name, "channel", policy.Watch, "session", id, "reason", d.Reason)
		s.audit(ev.With(audit.Denied, string(policy.Watch), d.Rule, d.Reason))
		fail(fmt.Sprintf("no running session %s with a terminal", cut(id, 64)))
		return
	}
	w, tail, err := lv.join()
	if err != nil {
		fail(err.Error())
		return
	}
	defer lv.leave(w)
	start := act
	ev.Type, ev.Activity, ev.Detail = audit.SessionStart, &start, "watching "+id
	s.audit(ev)
	lv.marker("watched by " + fc.who().Name)
	began := time.Now()
	out := countingWriter{ch, new(atomic.Int64)}
	fmt.Fprintf(out, "bastion: watching %s: %s on %s as %s; ^C or q stops\r\n", id, lv.account, lv.vm.Name, lv.login)
	out.Write(tail)

	// ^C or q stops; the end of the watcher's input does not (ssh -n).
	stop := make(chan struct{})
	go func() {
		b := make([]byte, 64)
		for {
			n, err := ch.Read(b)
			for _, c := range b[:n] {
				if c == 3 || c == 'q' {
					close(stop)
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
	status, why := 0, "the session ended"
loop:
	for {
		select {
		case p, ok := <-w.c:
			if !ok {
				if w.dropped {
					status, why = 1, "the watch fell too far behind the session, and was stopped"
				}
				break loop
			}
			if _, err := out.Write(p); err != nil {
				break loop
			}
		case <-stop:
			why = ""
			break loop
		case <-fc.ctx.Done():
			break loop
		}
	}
	if why != "" {
		fmt.Fprintf(ch, "\r\nbastion: %s\r\n", why)
	}
	sendExitStatus(ch, uint32(status))
	ch.Close()
	act.ExitStatus, act.Seconds, act.BytesDown = &status, seconds(time.Since(began)), out.n.Load()
	ev.Type, ev.Activity = audit.SessionEnd, &act
	s.audit(ev)
}

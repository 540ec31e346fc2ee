package bastion

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/bastion/record"
	"github.com/bastionvm/bastion/policy"
)

// session forwards one session channel to the VM. The upstream channel is
// opened before the downstream one is accepted, so a refusal carries the
// VM's own reason.
func (l *link) session(newCh gossh.NewChannel) {
	defer l.sessionOpened()()
	up, upReqs, err := l.openSession(newCh.ExtraData())
	if err != nil {
		l.up.sessionRefused(err)
		reject(newCh, l.vm.Name, err)
		return
	}
	down, downReqs, err := newCh.Accept()
	if err != nil {
		up.Close()
		return
	}
	(&sessionForward{link: l, up: up, down: down, id: l.front.channelN.Add(1)}).run(upReqs, downReqs)
}

// sessionRetries are the waits before asking a shared connection again for
// a session the VM refused. OpenSSH's sshd frees a closed session's place
// only once it has handled everything it read with the close, so a session
// asked for the moment another ended (the next of many parallel `ssh -J`)
// can be refused past MaxSessions for an instant.
var sessionRetries = []time.Duration{10 * time.Millisecond, 40 * time.Millisecond, 150 * time.Millisecond}

// openSession opens a session channel on l's connection to the VM, asking
// again (sessionRetries) if the VM refuses it on a shared connection.
func (l *link) openSession(extra []byte) (gossh.Channel, <-chan *gossh.Request, error) {
	ch, reqs, err := l.up.conn.OpenChannel("session", extra)
	var refused *gossh.OpenChannelError
	for _, wait := range sessionRetries {
		if err == nil || !l.shared || !errors.As(err, &refused) {
			break
		}
		time.Sleep(wait)
		ch, reqs, err = l.up.conn.OpenChannel("session", extra)
	}
	return ch, reqs, err
}

// reject refuses newCh with the reason another hop gave for refusing it.
func reject(newCh gossh.NewChannel, vm string, err error) {
	var refused *gossh.OpenChannelError
	if errors.As(err, &refused) {
		newCh.Reject(refused.Reason, refused.Message)
		return
	}
	newCh.Reject(gossh.ConnectionFailed, fmt.Sprintf("bastion: %s: %v", vm, err))
}

// sessionForward is one session channel forwarded between a downstream and
// an upstream channel.
type sessionForward struct {
	link *link
	up   gossh.Channel
	down gossh.Channel
	id   uint32 // its channel id in the audit events

	bytesUp, bytesDown atomic.Int64 // what was copied each way

	// Set by the goroutine handling upstream requests, read once it ends:
	exitStatus *int
	exitSignal string

	endMu     sync.Mutex     // protects the fields below
	endReason string         // why the bastion ended it, if it did
	began     time.Time      // when session_start was emitted; zero if it never started
	startAct  audit.Activity // what session_start said
	startKind policy.Channel // and the policy's kind of it

	// Owned by the goroutine handling downstream requests:
	start    ask            // the shell, command or subsystem asked for
	limit    time.Duration  // how long the rule that allowed it lets it run; 0 means no limit
	untrack  func()         // set once it has started
	readOnly bool           // sftp the policy allows only to read; read after started closes
	act      audit.Activity // what session_start says: the pty and environment asked for, then the start
	pty      bool           // a terminal was asked for
	refusal  string         // why the start was refused, if not the policy

	// Set before the start is sent upstream, read after started closes:
	cast       *record.Cast // the recording, if the session is recorded
	recordMode record.Mode
	live       *live         // set when a session with a terminal starts: its watchers
	unlive     func()        // ends the watch
	trail      *sftpFollower // set when an sftp session starts (not read-only)
}

// run copies data and requests both ways until both sides are done.
//
// Teardown order, downstream (RFC 4254 §6.10): exit-status or exit-signal,
// the remaining output, EOF, close. Requests are forwarded as they arrive,
// so the exit status may overtake output still being copied; EOF waits for
// both output copiers and for the exit status (or the VM's close, when the
// command ends without one); close waits for the VM's close, after which
// no request can follow. The stdin copier is not awaited: the VM may
// finish without reading its input.
func (f *sessionForward) run(upReqs, downReqs <-chan *gossh.Request) {
	f.serve(upReqs, downReqs, false)
}

// runStarted forwards a session whose shell was started upstream already.
func (f *sessionForward) runStarted(upReqs, downReqs <-chan *gossh.Request) {
	f.serve(upReqs, downReqs, true)
}

func (f *sessionForward) serve(upReqs, downReqs <-chan *gossh.Request, alreadyStarted bool) {
	exited := make(chan struct{})   // closed once the exit status is forwarded, or upReqs ends
	upClosed := make(chan struct{}) // closed when upReqs ends: the VM closed the channel
	go func() {
		defer close(upClosed)
		var once sync.Once
		defer once.Do(func() { close(exited) })
		for req := range upReqs {
			switch req.Type {
			case "exit-status", "exit-signal":
				f.down.SendRequest(req.Type, false, req.Payload)
				f.noteExit(req)
				once.Do(func() { close(exited) })
			case "eow@openssh.com":
				f.down.SendRequest(req.Type, false, req.Payload)
			default: // keepalive@openssh.com and the unknown stay on this hop
				if req.WantReply {
					req.Reply(false, nil)
				}
			}
		}
	}()
	// Data is held until the shell, command or subsystem has been
	// requested upstream, so the VM never sees input or EOF before it, and
	// so that a read-only sftp session is served, not copied.
	started := make(chan struct{})
	go func() {
		// This goroutine alone touches f.start, f.act and f.untrack.
		defer func() {
			if f.untrack != nil {
				f.untrack()
			}
		}()
		var once sync.Once
		defer once.Do(func() { close(started) })
		if alreadyStarted {
			once.Do(func() { close(started) })
		}
		for req := range downReqs {
			ok, denied := f.request(req)
			if denied != "" {
				f.refuse(req, denied)
				once.Do(func() { close(started) }) // to drain what is left
				continue
			}
			if req.WantReply {
				req.Reply(ok, nil)
			}
			switch req.Type {
			case "shell", "exec", "subsystem":
				once.Do(func() { close(started) })
			}
		}
		// The client closed the channel; pass that on.
		f.up.Close()
	}()

	output := make(chan error, 2)
	go func() {
		<-started
		out, errOut, in := io.Writer(f.down), io.Writer(f.down.Stderr()), io.Writer(f.up)
		if f.cast != nil {
			out, errOut = recorded{out, f.cast.Output}, recorded{errOut, f.cast.Output}
			if f.recordMode == record.Input {
				in = recorded{in, f.cast.Input}
			}
		}
		if f.live != nil {
			out, errOut = recorded{out, f.live.publish}, recorded{errOut, f.live.publish}
		}
		if f.trail != nil {
			out, in = seenFirst{out, f.trail.FromVM}, seenFirst{in, f.trail.ToVM}
		}
		go copier{dst: errOut, src: f.up.Stderr(), count: &f.bytesDown}.run(output)
		if f.readOnly {
			refused := func(method, path string) {
				ev := f.link.event().With(audit.Denied, string(policy.SFTP), "", "sftp is read-only: "+method+" refused")
				ev.Detail = cut(path, maxPathAudited)
				f.link.srv.audit(ev)
			}
			if err := readOnlySFTP(f.up, f.down, refused); err != nil {
				f.link.log.Info("read-only sftp ended", "err", err)
			}
			output <- nil
			return
		}
		go copier{dst: out, src: f.up, count: &f.bytesDown}.run(output)
		copier{dst: in, src: f.down, closeWrite: f.up.CloseWrite, count: &f.bytesUp}.run(nil)
	}()
	<-output
	<-output
	<-exited
	f.down.CloseWrite()
	<-upClosed
	f.down.Close()
	f.ended()
}

// notePty keeps the terminal a pty-req asks for, for session_start.
func (f *sessionForward) notePty(payload []byte) {
	var pty struct {
		Term             string
		Cols, Rows, W, H uint32
		Modes            string
	}
	if gossh.Unmarshal(payload, &pty) == nil {
		f.pty = true
		f.act.Term, f.act.Cols, f.act.Rows = cut(pty.Term, 64), pty.Cols, pty.Rows
	}
}

// noteExit keeps what the VM said of how the session's program ended.
func (f *sessionForward) noteExit(req *gossh.Request) {
	switch req.Type {
	case "exit-status":
		var st struct{ Status uint32 }
		if gossh.Unmarshal(req.Payload, &st) == nil {
			n := int(st.Status)
			f.exitStatus = &n
		}
	case "exit-signal":
		var sig struct {
			Signal      string
			CoreDumped  bool
			Error, Lang string
		}
		if gossh.Unmarshal(req.Payload, &sig) == nil {
			f.exitSignal = cut(sig.Signal, 32)
		}
	}
}

// started audits the start of the session's shell, command or subsystem.
func (f *sessionForward) started() {
	f.act.ChannelID = f.id
	switch {
	case f.start.kind == policy.Shell:
		f.act.Kind = "shell"
	case f.start.kind == policy.SFTP || strings.HasPrefix(string(f.start.kind), "subsystem "):
		f.act.Kind, f.act.Command = "subsystem", cut(f.start.command, maxCommandAudited)
	default:
		f.act.Kind, f.act.Command = "exec", cut(f.start.command, maxCommandAudited)
		f.act.Direction, f.act.Path = transferOf(f.start.command)
	}
	act := f.act
	f.endMu.Lock()
	f.began, f.startAct, f.startKind = time.Now(), act, f.start.kind
	f.endMu.Unlock()
	ev := f.link.event().With(audit.SessionStart, string(f.start.kind), "", "")
	ev.Activity = &act
	f.link.srv.audit(ev)
	if f.start.kind == policy.SFTP && !f.readOnly {
		f.trail = newSFTPFollower(f.fileEvent)
	}
	if f.pty {
		l := f.link
		f.live = &live{id: f.key(), account: l.front.who().Name, vm: l.vm, login: l.login,
			marker: func(m string) {
				if f.cast != nil {
					f.cast.Marker(m)
				}
			}}
		f.unlive = l.srv.goLive(f.live)
	}
}

// ended audits the end of a session that started: how its program ended,
// how long it ran, what it moved; and adds that to the link's totals.
func (f *sessionForward) ended() {
	f.endMu.Lock()
	began, start, kind, reason := f.began, f.startAct, f.startKind, f.endReason
	f.endMu.Unlock()
	if began.IsZero() {
		return
	}
	if f.unlive != nil {
		f.unlive()
	}
	if f.trail != nil {
		f.fileEvent(f.trail.summary())
	}
	act := audit.Activity{ChannelID: f.id, Kind: start.Kind, Command: start.Command, ExitStatus: f.exitStatus, ExitSignal: f.exitSignal,
		Seconds: seconds(time.Since(began)), BytesUp: f.bytesUp.Load(), BytesDown: f.bytesDown.Load()}
	if f.cast != nil {
		sum, err := f.cast.Close(f.exitStatus, f.exitSignal)
		if err != nil {
			f.link.log.Error("the recording could not be written whole", "recording", f.cast.ID, "err", err)
		}
		act.Recording, act.RecordingSHA256, act.RecordingCapped, act.RecordingBytes = f.cast.ID, sum, f.cast.Capped(), f.cast.Size()
	}
	f.link.addBytes(act.BytesUp, act.BytesDown)
	ev := f.link.event().With(audit.SessionEnd, string(kind), "", reason)
	ev.Activity = &act
	f.link.srv.audit(ev)
}

// fileEvent audits what an sftp session did to a file.
func (f *sessionForward) fileEvent(act audit.Activity) {
	act.ChannelID = f.id
	ev := f.link.event().With(audit.File, string(policy.SFTP), "", "")
	ev.Activity = &act
	f.link.srv.audit(ev)
}

// transferOf is what a legacy scp or an rsync command copies: its
// direction and the path on the VM, or nothing for other commands.
func transferOf(command string) (direction, where string) {
	if c, ok := policy.ParseSCP(command); ok {
		if c.Download {
			return "download", cut(c.Path, maxPathAudited)
		}
		return "upload", cut(c.Path, maxPathAudited)
	}
	words, err := policy.Words(command)
	if err != nil || len(words) < 3 || path.Base(words[0]) != "rsync" || words[1] != "--server" {
		return "", ""
	}
	direction = "upload"
	if slices.Contains(words, "--sender") {
		direction = "download"
	}
	return direction, cut(words[len(words)-1], maxPathAudited)
}

// key names the session channel in recordings and for watch: the
// connection's session id and the channel id.
func (f *sessionForward) key() string { return fmt.Sprintf("%s-%d", f.link.front.id, f.id) }

// seconds is d in seconds, to the millisecond.
func seconds(d time.Duration) float64 { return float64(d.Milliseconds()) / 1000 }

// request forwards one downstream session request upstream, if the policy
// allows it, and reports the VM's answer. A shell, command or subsystem
// the policy refuses is reported as denied, and not sent.
func (f *sessionForward) request(req *gossh.Request) (ok bool, denied policy.Channel) {
	l := f.link
	req = forced(l.front.certLogin(), req)
	switch req.Type {
	case "window-change":
		var size struct{ Cols, Rows, W, H uint32 }
		if f.cast != nil && gossh.Unmarshal(req.Payload, &size) == nil {
			f.cast.Resize(size.Cols, size.Rows)
		}
	case "signal", "break", "eow@openssh.com":
	case "pty-req":
		if !l.front.certLogin().Permits("permit-pty") {
			return false, ""
		}
		f.notePty(req.Payload)
	case "env":
		var env struct{ Name, Value string }
		if gossh.Unmarshal(req.Payload, &env) != nil || !l.srv.envAllowed(env.Name) {
			return false, ""
		}
		if len(f.act.Env) < maxEnvAudited {
			f.act.Env = append(f.act.Env, cut(env.Name, 64))
		}
	case "shell":
		f.start = ask{kind: policy.Shell}
		d := l.allow(f.start)
		if !d.Allow {
			return false, policy.Shell
		}
		f.limit = d.MaxTime
		if f.untrack == nil && f.record(d) != nil {
			return false, policy.Shell
		}
	case "exec":
		var cmd struct{ Command string }
		if gossh.Unmarshal(req.Payload, &cmd) != nil {
			return false, ""
		}
		f.start = ask{kind: policy.CommandKind(cmd.Command), command: cmd.Command}
		d := l.allow(f.start)
		if !d.Allow {
			return false, f.start.kind
		}
		f.limit = d.MaxTime
		if f.untrack == nil && f.record(d) != nil {
			return false, f.start.kind
		}
	case "subsystem":
		var sub struct{ Name string }
		if gossh.Unmarshal(req.Payload, &sub) != nil {
			return false, ""
		}
		kind := policy.Channel("subsystem " + sub.Name)
		if sub.Name == "sftp" {
			kind = policy.SFTP
		}
		f.start = ask{kind: kind, command: sub.Name}
		d := l.allow(f.start)
		if !d.Allow {
			return false, kind
		}
		f.readOnly, f.limit = d.ReadOnly, d.MaxTime
	case "auth-agent-req@openssh.com":
		if !l.allowConnectionWide(ask{kind: policy.Agent}) {
			return false, ""
		}
		l.mu.Lock()
		l.agent = true
		l.mu.Unlock()
	case "x11-req":
		if !l.allowConnectionWide(ask{kind: policy.X11}) {
			return false, ""
		}
		l.mu.Lock()
		l.x11 = true
		l.mu.Unlock()
	default:
		return false, ""
	}
	ok, _, err := l.srv.within(func() (bool, []byte, error) {
		ok, err := f.up.SendRequest(req.Type, req.WantReply, req.Payload)
		return ok, nil, err
	}, func() { f.up.Close() })
	ok = err == nil && ok
	switch req.Type {
	case "shell", "exec", "subsystem":
		if ok && f.untrack == nil {
			f.untrack = l.track(f.start, f.limit, f.end)
			f.started()
		} else if f.untrack == nil {
			f.discardRecording()
		}
	}
	return ok, ""
}

// forced is req as the certificate c has it: with a force-command, a
// shell, a command or a subsystem runs that command instead, as sshd runs
// it. A reply still goes to the client's request.
func forced(c *CertLogin, req *gossh.Request) *gossh.Request {
	if c == nil || c.ForceCommand == "" {
		return req
	}
	switch req.Type {
	case "shell", "exec", "subsystem":
		r := *req
		r.Type, r.Payload = "exec", gossh.Marshal(struct{ Command string }{c.ForceCommand})
		return &r
	}
	return req
}

// record starts the session's recording before its shell or command
// starts, if the bastion records and the decision d asks for it: with a
// terminal always, exec without one when d.RecordExec. A recording that
// cannot be written refuses the session (f.refusal says so): never one
// silently unrecorded.
func (f *sessionForward) record(d policy.Decision) error {
	s, l := f.link.srv, f.link
	mode := record.Mode(d.Record)
	if mode == "" {
		mode = record.Output
	}
	if s.Recordings == "" || mode == record.None || !f.pty && !(f.start.kind == policy.Exec && d.RecordExec) {
		return nil
	}
	id := f.key()
	title := fmt.Sprintf("%s on %s as %s", l.front.who().Name, l.vm.Name, l.login)
	c, err := record.Create(s.Recordings, id, record.Header{Cols: f.act.Cols, Rows: f.act.Rows, Term: f.act.Term,
		Command: cut(f.start.command, maxCommandAudited), Title: title}, s.recordingMaxBytes(), func(err error) {
		l.log.Error("the recording cannot be written; ending the session", "recording", id, "err", err)
		f.end("bastion: the session's recording cannot be written, so the session is ended; tell the bastion's operators")
	})
	if err != nil {
		l.log.Error("refused: the recording cannot be written", "channel", f.start.kind, "err", err)
		l.srv.audit(l.event().With(audit.Denied, string(f.start.kind), d.Rule, "the recording cannot be written: "+err.Error()))
		f.refusal = "bastion: this session must be recorded, and the recording cannot be written, so it may not start; tell the bastion's operators"
		return err
	}
	f.cast, f.recordMode = c, mode
	return nil
}

// discardRecording removes the recording of a session whose shell or
// command did not start.
func (f *sessionForward) discardRecording() {
	if f.cast != nil {
		f.cast.Close(nil, "")
		os.Remove(f.cast.Path)
		f.cast = nil
	}
}

// seenFirst is a writer whose bytes go to see before they are written.
type seenFirst struct {
	w   io.Writer
	see func([]byte)
}

func (s seenFirst) Write(p []byte) (int, error) {
	s.see(p)
	return s.w.Write(p)
}

// recorded is a writer whose bytes also go to a recording.
type recorded struct {
	w   io.Writer
	rec func([]byte)
}

func (r recorded) Write(p []byte) (int, error) {
	n, err := r.w.Write(p)
	if n > 0 {
		r.rec(p[:n])
	}
	return n, err
}

// maxCommandAudited bounds the command line in an event: long enough for
// any command a person types, short of what a client may send.
const maxCommandAudited = 8 << 10

// cut is s, from a client or a VM, cut to at most n bytes of valid UTF-8,
// with "…" where it was cut.
func cut(s string, n int) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}

// maxEnvAudited bounds the variable names one session_start lists: the
// names are the client's, and the allow-list may be a glob.
const maxEnvAudited = 32

// end ends a running session, telling the user msg on its stderr.
//
// The user's side ends at once: the message, exit status 255, and the
// close. The VM's side is asked to end its command (SIGTERM) and closed:
// sshd keeps a command without a terminal running after its channel
// closes, until it exits by itself.
func (f *sessionForward) end(msg string) {
	f.endMu.Lock()
	if f.endReason == "" {
		f.endReason = msg
	}
	f.endMu.Unlock()
	if f.cast != nil {
		f.cast.Marker(msg)
	}
	fmt.Fprintf(f.down.Stderr(), "\r\n%s\r\n", msg)
	sendExitStatus(f.down, 255)
	f.up.SendRequest("signal", false, gossh.Marshal(struct{ Signal string }{"TERM"}))
	f.up.Close()
	f.down.Close()
}

// refuse ends a session whose shell, command or subsystem the policy
// refused. The request is answered with success and the session ends with
// the refusal on stderr and exit status 255: OpenSSH exits at once on a
// failed exec, before showing what arrived on stderr, so a plain failure
// would hide the reason.
func (f *sessionForward) refuse(req *gossh.Request, kind policy.Channel) {
	if req.WantReply {
		req.Reply(true, nil)
	}
	msg := f.link.denial(kind)
	if f.refusal != "" {
		msg = f.refusal
	}
	fmt.Fprintf(f.down.Stderr(), "%s\r\n", msg)
	sendExitStatus(f.down, 255)
	f.up.Close()
}

// envAllowed reports whether a client's environment variable may be passed
// to the VM: names matching the server's allow-list globs.
func (s *Server) envAllowed(name string) bool {
	for _, glob := range s.envAllowList() {
		if ok, _ := path.Match(glob, name); ok {
			return true
		}
	}
	return false
}

// bridge opens a channel like newCh on other and, once other accepts,
// accepts newCh and copies both ways. It serves direct-tcpip,
// forwarded-tcpip, agent and X11 channels, whose requests are hop-by-hop.
// The channel is tracked as a, so a policy change (or limit, if above 0)
// can end it.
func (l *link) bridge(a ask, limit time.Duration, newCh gossh.NewChannel, other gossh.Conn) {
	to, toReqs, err := other.OpenChannel(newCh.ChannelType(), newCh.ExtraData())
	if err != nil {
		reject(newCh, "", err)
		return
	}
	from, fromReqs, err := newCh.Accept()
	if err != nil {
		to.Close()
		return
	}
	go gossh.DiscardRequests(toReqs)
	go gossh.DiscardRequests(fromReqs)
	var reason atomic.Pointer[string]
	defer l.track(a, limit, func(msg string) { reason.CompareAndSwap(nil, &msg); from.Close(); to.Close() })()
	act := audit.Activity{ChannelID: l.front.channelN.Add(1), Kind: newCh.ChannelType(), Host: cut(a.host, 255), Port: a.port, Socket: cut(a.socket, 255)}
	began := time.Now()
	start := act
	ev := l.event().With(audit.ForwardStart, string(a.kind), "", "")
	ev.Activity = &start
	l.srv.audit(ev)
	// Up and down are the person's view: what they send towards the VM's
	// side, whichever side opened the channel.
	var sent, received atomic.Int64
	done := make(chan error, 2)
	go copier{dst: to, src: from, closeWrite: to.CloseWrite, count: &sent}.run(done)
	go copier{dst: from, src: to, closeWrite: from.CloseWrite, count: &received}.run(done)
	<-done
	<-done
	from.Close()
	to.Close()
	act.Seconds = seconds(time.Since(began))
	act.BytesUp, act.BytesDown = sent.Load(), received.Load()
	if other != l.up.conn { // opened by the VM (-R, agent, X11): from is the VM's side
		act.BytesUp, act.BytesDown = act.BytesDown, act.BytesUp
	}
	l.addBytes(act.BytesUp, act.BytesDown)
	ev = l.event().With(audit.ForwardEnd, string(a.kind), "", "")
	if r := reason.Load(); r != nil {
		ev.Reason = *r
	}
	ev.Activity = &act
	l.srv.audit(ev)
}

// copier copies one direction of a channel until EOF, then half-closes
// the destination if it can, and reports on done (if not nil).
type copier struct {
	dst        io.Writer
	src        io.Reader
	closeWrite func() error
	count      *atomic.Int64 // if set, counts the bytes written
}

func (c copier) run(done chan<- error) {
	dst := c.dst
	if c.count != nil {
		dst = countingWriter{dst, c.count}
	}
	err := pump(dst, c.src)
	if c.closeWrite != nil {
		c.closeWrite()
	}
	if done != nil {
		done <- err
	}
}

// countingWriter counts what is written through it.
type countingWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (c countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n.Add(int64(n))
	return n, err
}

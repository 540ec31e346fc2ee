package bastion_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/internal/testenv"
	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/policy"
	"github.com/bastionvm/bastion/vm"
)

// shareFixture is a fixture whose VM is reached through a TCP relay that
// counts the bastion's connections to it and can cut them, under a
// policy that could never allow remote forwarding, agent or X11 (so that
// links may share an upstream connection).
func shareFixture(t *testing.T, configure ...func(*bastion.Server)) (*fixture, *relay) {
	t.Helper()
	f := newFixture(t, configure...)
	f.policy.set(&policy.Policy{Rules: []policy.Rule{sessionsRule(f)}})
	up := web1Target(t, f)
	r := startRelay(t, up.Addr)
	up.Addr = r.addr
	f.fleet.Set("web1", up)
	return f, r
}

// web1Target is the target f's fleet resolves web1 to for f's login.
func web1Target(t *testing.T, f *fixture) keys.Upstream {
	t.Helper()
	d, err := f.fleet.Find(context.Background(), "web1")
	if err != nil {
		t.Fatal(err)
	}
	up, err := f.fleet.Resolve(context.Background(), d, f.login)
	if err != nil {
		t.Fatal(err)
	}
	return up
}

// sessionsRule lets group dev use sessions and local forwards on web*:
// nothing that needs a connection of its own.
func sessionsRule(f *fixture) policy.Rule {
	r := f.devRule()
	r.Name, r.Channels = "sessions", []policy.Channel{policy.Shell, policy.Exec, policy.SCP, policy.SFTP, policy.LocalForward}
	return r
}

// relay accepts TCP connections and copies them to and from an address,
// counting them and those still open; cut closes every one open.
type relay struct {
	addr  string
	mu    sync.Mutex
	n     int
	open  int
	conns []net.Conn
}

func startRelay(t *testing.T, to string) *relay {
	t.Helper()
	return startLaggingRelay(t, to, 0)
}

// startLaggingRelay is startRelay whose copies towards the VM wait lag
// after each read, so that what the bastion sends meanwhile reaches the
// VM in one piece: a VM slow to read (a guest under TCG) sees a channel's
// close and the next open together.
func startLaggingRelay(t *testing.T, to string, lag time.Duration) *relay {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &relay{addr: ln.Addr().String()}
	t.Cleanup(func() { ln.Close(); r.cut() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", to)
			if err != nil {
				c.Close()
				continue
			}
			r.mu.Lock()
			r.n++
			r.open++
			r.conns = append(r.conns, c, up)
			r.mu.Unlock()
			var halves sync.WaitGroup
			halves.Add(2)
			go func() { io.Copy(up, lagging{c, lag}); up.Close(); halves.Done() }()
			go func() { io.Copy(c, up); c.Close(); halves.Done() }()
			go func() {
				halves.Wait()
				r.mu.Lock()
				r.open--
				r.mu.Unlock()
			}()
		}
	}()
	return r
}

// lagging is a reader that waits lag after each read.
type lagging struct {
	r   io.Reader
	lag time.Duration
}

func (l lagging) Read(p []byte) (int, error) {
	n, err := l.r.Read(p)
	time.Sleep(l.lag)
	return n, err
}

// count is how many connections the relay has accepted.
func (r *relay) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n
}

func (r *relay) cut() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range r.conns {
		c.Close()
	}
	r.conns = nil
}

// echoing is an ssh running a loop on the VM that answers each line it
// reads, and exits 3 at the end of its input.
type echoing struct {
	stdin  io.WriteCloser
	out    *bufio.Reader
	stderr *testenv.LockedBuffer
	done   chan struct{}
	cmd    interface{ Wait() error }
	exit   int
}

const echoLoop = `echo started; while read l; do echo "got $l"; done; exit 3`

// hold starts `ssh args... echoLoop` with client c and waits for it to
// start.
func hold(t *testing.T, c *testenv.Client, args ...string) *echoing {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	cmd := c.Command(ctx, "ssh", append(args, echoLoop)...)
	e := &echoing{stderr: &testenv.LockedBuffer{}, done: make(chan struct{}), cmd: cmd}
	cmd.Stderr = e.stderr
	var err error
	if e.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	e.out = bufio.NewReader(out)
	if line, err := e.out.ReadString('\n'); line != "started\n" {
		t.Fatalf("the session did not start: %q %v; stderr %s", line, err, e.stderr.String())
	}
	go func() {
		// Wait closes stdout once ssh has exited: the lines a test reads
		// come before that.
		cmd.Wait()
		e.exit = cmd.ProcessState.ExitCode()
		close(e.done)
	}()
	t.Cleanup(func() { e.stdin.Close() })
	return e
}

// echo sends line and expects its answer.
func (e *echoing) echo(t *testing.T, line string) {
	t.Helper()
	if _, err := io.WriteString(e.stdin, line+"\n"); err != nil {
		t.Fatalf("writing %q: %v; stderr %s", line, err, e.stderr.String())
	}
	got := make(chan string, 1)
	go func() {
		s, _ := e.out.ReadString('\n')
		got <- s
	}()
	select {
	case s := <-got:
		if s != "got "+line+"\n" {
			t.Fatalf("answer to %q: %q; stderr %s", line, s, e.stderr.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("no answer to %q; stderr %s", line, e.stderr.String())
	}
}

// finish closes the input and returns the exit code.
func (e *echoing) finish(t *testing.T) int {
	t.Helper()
	e.stdin.Close()
	return e.ended(t)
}

// ended waits for the ssh to exit.
func (e *echoing) ended(t *testing.T) int {
	t.Helper()
	select {
	case <-e.done:
		return e.exit
	case <-time.After(30 * time.Second):
		t.Fatalf("the session did not end; stderr %s", e.stderr.String())
		return 0
	}
}

// reused counts the connected events that joined a shared connection.
func (a *auditLog) reused() (reused, dialled int) {
	for _, e := range a.all() {
		if e.Type != audit.Connected {
			continue
		}
		if e.Reused {
			reused++
		} else {
			dialled++
		}
	}
	return reused, dialled
}

// waitOpen waits for the relay to hold n connections open.
func (r *relay) waitOpen(t *testing.T, n int) {
	t.Helper()
	open := func() int {
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.open
	}
	waitFor(t, func() bool { return open() == n }, func() string { return fmt.Sprintf("%d connections to the VM open, want %d", open(), n) })
}

// waitCount waits for the relay to have accepted n connections.
func (r *relay) waitCount(t *testing.T, n int) {
	t.Helper()
	waitFor(t, func() bool { return r.count() == n }, func() string { return fmt.Sprintf("%d connections to the VM, want %d", r.count(), n) })
}

// agentGone tells f's server that web1's guest agent left, which drops
// its trusts and leaves its sessions alone.
func agentGone(t *testing.T, f *fixture) {
	t.Helper()
	web1, err := f.fleet.Find(context.Background(), "web1")
	if err != nil {
		t.Fatal(err)
	}
	f.srv.VMEvent(vm.Event{URI: web1.URI, UUID: web1.UUID, Name: web1.Name, Kind: vm.EventAgentGone})
}

// TestSharedUpstream: one person's links to the same login on the same VM,
// by ssh -J and login@vm@bastion, share one connection to the VM's sshd;
// closing one leaves the others working, and the connection closes with
// the last one.
func TestSharedUpstream(t *testing.T) {
	f, r := shareFixture(t)
	a := hold(t, f.client, "-J", "bastion", f.login+"@web1")
	b := hold(t, f.client, "-J", "bastion", f.login+"@web1")
	c := hold(t, f.client, f.login+"@web1@bastion")
	r.waitCount(t, 1)
	if reused, dialled := f.audit.reused(); reused != 2 || dialled != 1 {
		t.Fatalf("connected events: %d reused, %d dialled; want 2 and 1", reused, dialled)
	}
	for _, e := range []*echoing{a, b, c} {
		e.echo(t, "one")
	}
	if code := a.finish(t); code != 3 {
		t.Fatalf("the first session exited %d, want 3; stderr %s", code, a.stderr.String())
	}
	f.audit.wait(t, audit.Disconnected, "web1", 1)
	b.echo(t, "two")
	c.echo(t, "two")
	// A command on a link of its own, meanwhile: the same connection.
	if res := f.jump(nil, "echo more; exit 7"); res.Exit != 7 || string(res.Stdout) != "more\n" {
		t.Fatalf("another link: %v %q", res, res.Stdout)
	}
	if code := b.finish(t); code != 3 {
		t.Fatalf("the second session exited %d, want 3", code)
	}
	if code := c.finish(t); code != 3 {
		t.Fatalf("the third session exited %d, want 3", code)
	}
	r.waitCount(t, 1)
	f.audit.wait(t, audit.Disconnected, "web1", 4)
	// The last link gone, the connection closed: the next link dials.
	if res := f.jump(nil, "true"); res.Exit != 0 {
		t.Fatalf("after the last link: %v", res)
	}
	r.waitCount(t, 2)
}

// TestSharedUpstreamIsOnePersons: another account, another login, a policy
// that could allow remote forwarding or agent forwarding, and
// upstream_max_sessions = 1 each get a connection of their own.
func TestSharedUpstreamIsOnePersons(t *testing.T) {
	t.Run("another account", func(t *testing.T) {
		f, r := shareFixture(t)
		bob := testenv.NewClient(t, f.addr, "bob", f.host.KnownHostsLine())
		f.setAccounts(bastion.Account{Name: "alice", Groups: []string{"dev"}, Keys: []gossh.PublicKey{f.client.PublicKey}},
			bastion.Account{Name: "bob", Groups: []string{"dev"}, Keys: []gossh.PublicKey{bob.PublicKey}})
		a := hold(t, f.client, "-J", "bastion", f.login+"@web1")
		b := hold(t, bob, "-J", "bastion", f.login+"@web1")
		r.waitCount(t, 2)
		a.echo(t, "alice")
		b.echo(t, "bob")
	})
	t.Run("another login", func(t *testing.T) {
		f, r := shareFixture(t)
		rule := sessionsRule(f)
		rule.Logins = append(rule.Logins, "nobody")
		f.rules(rule)
		a := hold(t, f.client, "-J", "bastion", f.login+"@web1")
		// The VM's sshd lets in one user: this one's login fails there,
		// after a connection of its own.
		if res := f.ssh(nil, "-J", "bastion", "nobody@web1", "true"); res.Exit == 0 {
			t.Fatalf("nobody logged in to the VM: %v", res)
		}
		if r.count() < 2 {
			t.Fatalf("%d connections to the VM; another login shared one", r.count())
		}
		a.echo(t, "still")
	})
	for _, kind := range []policy.Channel{policy.RemoteForward, policy.Agent} {
		t.Run("policy could allow "+string(kind), func(t *testing.T) {
			f, r := shareFixture(t)
			rule := sessionsRule(f)
			rule.Channels = append(rule.Channels, kind)
			// Outside its window now: the link may need it later all the same.
			rule.Window = &policy.Window{From: time.Duration((time.Now().UTC().Hour()+12)%24) * time.Hour, To: time.Duration((time.Now().UTC().Hour()+13)%24) * time.Hour, Zone: time.UTC}
			f.rules(sessionsRule(f), rule)
			a := hold(t, f.client, "-J", "bastion", f.login+"@web1")
			b := hold(t, f.client, "-J", "bastion", f.login+"@web1")
			r.waitCount(t, 2)
			a.echo(t, "a")
			b.echo(t, "b")
		})
	}
	t.Run("upstream_max_sessions 1", func(t *testing.T) {
		f, r := shareFixture(t, func(s *bastion.Server) { s.UpstreamMaxSessions = 1 })
		a := hold(t, f.client, "-J", "bastion", f.login+"@web1")
		b := hold(t, f.client, f.login+"@web1@bastion")
		r.waitCount(t, 2)
		a.echo(t, "a")
		b.echo(t, "b")
		if reused, _ := f.audit.reused(); reused != 0 {
			t.Fatalf("%d links reused a connection", reused)
		}
	})
}

// TestSharedUpstreamFull: N+1 links make two connections; a link that
// ends frees its place.
func TestSharedUpstreamFull(t *testing.T) {
	f, r := shareFixture(t, func(s *bastion.Server) { s.UpstreamMaxSessions = 2 })
	a := hold(t, f.client, "-J", "bastion", f.login+"@web1")
	b := hold(t, f.client, "-J", "bastion", f.login+"@web1")
	r.waitCount(t, 1)
	c := hold(t, f.client, "-J", "bastion", f.login+"@web1")
	r.waitCount(t, 2)
	for _, e := range []*echoing{a, b, c} {
		e.echo(t, "x")
	}
	if code := a.finish(t); code != 3 {
		t.Fatalf("exit %d", code)
	}
	f.audit.wait(t, audit.Disconnected, "web1", 1)
	d := hold(t, f.client, f.login+"@web1@bastion")
	r.waitCount(t, 2)
	d.echo(t, "joined")
}

// TestSharedUpstreamDies: cutting the shared connection ends every session
// on it; the next link dials anew.
func TestSharedUpstreamDies(t *testing.T) {
	f, r := shareFixture(t)
	a := hold(t, f.client, "-J", "bastion", f.login+"@web1")
	b := hold(t, f.client, f.login+"@web1@bastion")
	r.waitCount(t, 1)
	r.cut()
	for name, e := range map[string]*echoing{"ssh -J": a, "login@vm@bastion": b} {
		if code := e.ended(t); code != 255 {
			t.Errorf("%s: exit %d after its upstream died, want 255; stderr %s", name, code, e.stderr.String())
		}
	}
	if res := f.jump(nil, "echo back"); res.Exit != 0 || string(res.Stdout) != "back\n" {
		t.Fatalf("after the cut: %v %q", res, res.Stdout)
	}
	r.waitCount(t, 2)
}

// TestSharedUpstreamEndsOneLink: what ends one link sharing a connection
// (a reload removing the key of its front-door connection, a policy change
// to its channel) leaves the other links on it alone.
func TestSharedUpstreamEndsOneLink(t *testing.T) {
	f, r := shareFixture(t)
	second := testenv.NewClient(t, f.addr, "alice", f.host.KnownHostsLine())
	f.setAccounts(bastion.Account{Name: "alice", Groups: []string{"dev"}, Keys: []gossh.PublicKey{f.client.PublicKey, second.PublicKey}})
	a := hold(t, f.client, "-J", "bastion", f.login+"@web1")
	b := hold(t, second, "-J", "bastion", f.login+"@web1")
	r.waitCount(t, 1)
	f.setAccounts(bastion.Account{Name: "alice", Groups: []string{"dev"}, Keys: []gossh.PublicKey{f.client.PublicKey}})
	f.srv.Revalidate()
	if code := b.ended(t); code != 255 || !strings.Contains(b.stderr.String(), "the key it logged in with was removed") {
		t.Fatalf("the removed key's session: exit %d, stderr %q", code, b.stderr.String())
	}
	a.echo(t, "kept")
	if code := a.finish(t); code != 3 {
		t.Fatalf("the kept session exited %d, want 3", code)
	}
}

// TestSharedUpstreamRetired: an event that drops the VM's trust without
// ending its sessions (the guest agent leaving) leaves them on their
// connection, which takes no new link.
func TestSharedUpstreamRetired(t *testing.T) {
	f, r := shareFixture(t)
	a := hold(t, f.client, "-J", "bastion", f.login+"@web1")
	agentGone(t, f)
	b := hold(t, f.client, "-J", "bastion", f.login+"@web1")
	r.waitCount(t, 2)
	c := hold(t, f.client, "-J", "bastion", f.login+"@web1")
	r.waitCount(t, 2) // the new connection is shared in turn
	for _, e := range []*echoing{a, b, c} {
		e.echo(t, "x")
	}
}

// TestSharedUpstreamRefusesConnectionKinds: a link on a shared connection
// that is asked for a remote forward or agent forwarding after a reload
// allowed them refuses both, as the policy would, and says why in the
// audit; a new link then has a connection of its own, and its forward
// works.
func TestSharedUpstreamRefusesConnectionKinds(t *testing.T) {
	f, r := shareFixture(t)
	c := f.goClient(f.login + "@web1")
	if out, err := mustSession(t, c).Output("echo linked"); err != nil || string(out) != "linked\n" {
		t.Fatalf("first session: %q %v", out, err)
	}
	r.waitCount(t, 1)
	// While the policy refuses them, the refusal is the policy's.
	if ln, err := c.Listen("tcp", "127.0.0.1:0"); err == nil {
		ln.Close()
		t.Fatal("a remote forward the policy refuses was granted")
	}
	for _, e := range f.audit.all() {
		if e.Type == audit.Denied && strings.Contains(e.Reason, "the link shares its upstream connection") {
			t.Fatalf("a refusal by policy audited as the sharing's: %q", e.Reason)
		}
	}
	if _, ok := f.audit.find(audit.Denied, "no rule allows it"); !ok {
		t.Fatalf("no policy denial for the remote forward: %q", f.audit.reasons())
	}
	all := sessionsRule(f)
	all.Channels = append(all.Channels, policy.RemoteForward, policy.Agent)
	f.rules(all)

	if ln, err := c.Listen("tcp", "127.0.0.1:0"); err == nil {
		ln.Close()
		t.Fatal("a remote forward was granted on a shared connection")
	}
	s := mustSession(t, c)
	if ok, err := s.SendRequest("auth-agent-req@openssh.com", true, nil); ok || err != nil {
		t.Fatalf("agent forwarding on a shared connection: %v %v", ok, err)
	}
	denied := 0
	for _, e := range f.audit.all() {
		if e.Type == audit.Denied && strings.Contains(e.Reason, "the link shares its upstream connection") {
			denied++
		}
	}
	if denied != 2 {
		t.Fatalf("%d denials saying why, want 2: %q", denied, f.audit.reasons())
	}
	if out, err := mustSession(t, c).Output("echo still"); err != nil || string(out) != "still\n" {
		t.Fatalf("a session after the refusals: %q %v", out, err)
	}

	// A new link has its own connection, and the forward.
	own := f.goClient(f.login + "@web1")
	ln, err := own.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("a remote forward on a link of its own: %v", err)
	}
	ln.Close()
	r.waitCount(t, 2)
}

func mustSession(t *testing.T, c *gossh.Client) *gossh.Session {
	t.Helper()
	s, err := c.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// TestSharedUpstreamTimeLimit: a session's time limit ends that session
// alone, not the other link's on the same connection.
func TestSharedUpstreamTimeLimit(t *testing.T) {
	f, r := shareFixture(t)
	rule := sessionsRule(f)
	rule.MaxTime = 4 * time.Second
	f.rules(rule)
	a := hold(t, f.client, "-J", "bastion", f.login+"@web1")
	time.Sleep(2 * time.Second)
	b := hold(t, f.client, f.login+"@web1@bastion")
	r.waitCount(t, 1)
	if code := a.ended(t); code != 255 || !strings.Contains(a.stderr.String(), "session time limit") {
		t.Fatalf("the first session: exit %d, stderr %q", code, a.stderr.String())
	}
	b.echo(t, "mine still")
	if code := b.ended(t); code != 255 {
		t.Fatalf("the second session: exit %d at its own limit", code)
	}
}

// TestSharedUpstreamBelowVMsMaxSessions: a VM whose sshd allows fewer
// sessions a connection than upstream_max_sessions refuses the one past
// them (as it would on a single connection); that connection then takes no
// more links, and the next link dials its own.
func TestSharedUpstreamBelowVMsMaxSessions(t *testing.T) {
	f, r := shareFixture(t)
	up := web1Target(t, f)
	small, err := testenv.StartSSHDWith(testenv.SSHDOptions{Dir: t.TempDir() + "/small", Authorized: []gossh.PublicKey{up.Signer.PublicKey()},
		Config: testenv.TestConfig + "MaxSessions 2\n"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { small.Stop() })
	r = startRelay(t, small.Addr)
	up.Addr, up.HostKeys = r.addr, []gossh.PublicKey{small.HostKey}
	f.fleet.Set("web1", up)

	a := hold(t, f.client, "-J", "bastion", f.login+"@web1")
	b := hold(t, f.client, "-J", "bastion", f.login+"@web1")
	r.waitCount(t, 1)
	if res := f.jump(nil, "true"); res.Exit != 255 || !strings.Contains(res.Stderr, "open failed") {
		t.Fatalf("a third session past the VM's MaxSessions: %v", res)
	}
	if res := f.jump(nil, "echo own"); res.Exit != 0 || string(res.Stdout) != "own\n" {
		t.Fatalf("the next link: %v %q", res, res.Stdout)
	}
	r.waitCount(t, 2)
	a.echo(t, "a")
	b.echo(t, "b")
}

// TestSharedUpstreamLingers: with upstream_linger, a shared connection
// outlives its last link for the account's next one to the same login,
// which opens a session on it and makes no handshake; it closes once the
// time is up, at once when the VM's trust is dropped, and when the server
// stops. A link that may not share never lingers.
func TestSharedUpstreamLingers(t *testing.T) {
	const linger = 2 * time.Second
	lingering := func(s *bastion.Server) { s.UpstreamLinger = linger }

	t.Run("one after another", func(t *testing.T) {
		f, r := shareFixture(t, lingering)
		for i := range 3 {
			if res := f.jump(nil, "echo", strconv.Itoa(i)); res.Exit != 0 || string(res.Stdout) != strconv.Itoa(i)+"\n" {
				t.Fatalf("command %d: %v %q", i, res, res.Stdout)
			}
		}
		if res := f.ssh(nil, f.login+"@web1@bastion", "echo direct"); res.Exit != 0 || string(res.Stdout) != "direct\n" {
			t.Fatalf("login@vm@bastion: %v %q", res, res.Stdout)
		}
		if reused, dialled := f.audit.reused(); r.count() != 1 || reused != 3 || dialled != 1 {
			t.Fatalf("%d connections to the VM, %d links reused one and %d dialled; want 1, 3 and 1", r.count(), reused, dialled)
		}
		r.waitOpen(t, 1)
		time.Sleep(linger + time.Second)
		r.waitOpen(t, 0)
		if res := f.jump(nil, "true"); res.Exit != 0 {
			t.Fatalf("after the linger: %v", res)
		}
		if r.count() != 2 {
			t.Fatalf("%d connections to the VM after the linger ran out, want 2", r.count())
		}
	})
	t.Run("trust dropped", func(t *testing.T) {
		f, r := shareFixture(t, func(s *bastion.Server) { s.UpstreamLinger = time.Hour })
		if res := f.jump(nil, "true"); res.Exit != 0 {
			t.Fatal(res)
		}
		r.waitOpen(t, 1)
		agentGone(t, f)
		r.waitOpen(t, 0)
		if res := f.jump(nil, "true"); res.Exit != 0 || r.count() != 2 {
			t.Fatalf("after the trust was dropped: %v, %d connections", res, r.count())
		}
	})
	t.Run("server stops", func(t *testing.T) {
		f, r := shareFixture(t, func(s *bastion.Server) { s.UpstreamLinger = time.Hour })
		if res := f.jump(nil, "true"); res.Exit != 0 {
			t.Fatal(res)
		}
		r.waitOpen(t, 1)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := f.srv.Shutdown(ctx); err != nil {
			t.Fatalf("shutdown with only a lingering connection: %v", err)
		}
		r.waitOpen(t, 0)
	})
	t.Run("not shared", func(t *testing.T) {
		f, r := shareFixture(t, lingering)
		rule := sessionsRule(f)
		rule.Channels = append(rule.Channels, policy.Agent)
		f.rules(rule)
		for range 2 {
			if res := f.jump(nil, "true"); res.Exit != 0 {
				t.Fatal(res)
			}
		}
		r.waitOpen(t, 0)
		if r.count() != 2 {
			t.Fatalf("%d connections to the VM, want one a link", r.count())
		}
	})
}

// TestSharedUpstreamManyAtOnce: many `ssh -J … true` at once, each ending
// as others begin, all succeed on shared connections. A VM slow to read
// (the lagging relay) sees a session's close and the next link's open
// together, and its sshd refuses the open before it frees the closed
// session's place; the bastion asks again.
func TestSharedUpstreamManyAtOnce(t *testing.T) {
	f, r := shareFixture(t)
	up := web1Target(t, f)
	r = startLaggingRelay(t, f.vm.Addr, 20*time.Millisecond)
	up.Addr = r.addr
	f.fleet.Set("web1", up)
	const logins, parallel = 60, 20
	results := make(chan testenv.Result, logins)
	turns := make(chan struct{}, parallel)
	var all sync.WaitGroup
	for range logins {
		all.Add(1)
		go func() {
			defer all.Done()
			turns <- struct{}{}
			defer func() { <-turns }()
			results <- f.jump(nil, "true")
		}()
	}
	all.Wait()
	close(results)
	failed := 0
	for res := range results {
		if res.Exit != 0 {
			failed++
			t.Logf("failed: %v", res)
		}
	}
	if failed > 0 {
		t.Fatalf("%d of %d logins failed", failed, logins)
	}
	if n := r.count(); n >= logins/2 {
		t.Fatalf("%d connections to the VM for %d logins: they were hardly shared", n, logins)
	}
}

package bastion_test

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/bastion/bastiontest"
	"github.com/bastionvm/bastion/internal/testenv"
	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/policy"
	"github.com/bastionvm/bastion/vm"
)

// fixture is a bastion in this process, a real sshd on 127.0.0.1 standing
// in for the VM "web1", and an OpenSSH client whose key belongs to alice.
type fixture struct {
	t      testing.TB
	vm     *testenv.SSHD
	srv    *bastion.Server
	addr   string
	host   *keys.Host
	client *testenv.Client
	fleet  *bastiontest.Fleet
	audit  *auditLog
	login  string
	policy *livePolicy
	// accounts are the server's accounts; setAccounts replaces them.
	accounts *liveAccounts

	upstreamKeyPath string // the bastion's key for the VM, for direct comparisons
}

func newFixture(t testing.TB, configure ...func(*bastion.Server)) *fixture {
	t.Helper()
	upstreamKey, upstreamPEM := testenv.NewKey(t)
	vm := testenv.StartSSHD(t, upstreamKey.PublicKey())
	host, err := keys.LoadOrCreate(t.TempDir() + "/state")
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, vm: vm, host: host, login: vm.Login, audit: &auditLog{}, policy: &livePolicy{}}
	f.policy.set(&policy.Policy{Rules: []policy.Rule{f.devRule()}})
	f.upstreamKeyPath = filepath.Join(t.TempDir(), "upstream_key")
	if err := os.WriteFile(f.upstreamKeyPath, upstreamPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	f.fleet = bastiontest.NewFleet()
	f.fleet.Set("web1", keys.Upstream{Addr: vm.Addr, HostKeys: []gossh.PublicKey{vm.HostKey}, Signer: upstreamKey})

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.addr = ln.Addr().String()
	f.client = testenv.NewClient(t, f.addr, "alice", host.KnownHostsLine())
	f.accounts = &liveAccounts{}
	f.setAccounts(bastion.Account{Name: "alice", Groups: []string{"dev"}, Keys: []gossh.PublicKey{f.client.PublicKey}})
	f.srv = &bastion.Server{
		HostKey:   host.Key,
		Certifier: host,
		Hostnames: []string{"127.0.0.1", "localhost"},
		Accounts:  f.accounts,
		VMs:       f.fleet,
		Resolver:  f.fleet,
		Policy:    f.policy,
		Logger:    testLogger(t),
		Audit:     f.audit.add,
	}
	for _, c := range configure {
		c(f.srv)
	}
	served := make(chan error, 1)
	go func() { served <- f.srv.Serve(ln) }()
	t.Cleanup(func() {
		f.srv.Close()
		<-served
	})
	return f
}

// devRule is the fixture's default rule: alice (group dev) may do
// everything but agent and X11 forwarding on web* as the sshd's login.
func (f *fixture) devRule() policy.Rule {
	return policy.Rule{
		Name: "dev", Effect: policy.Allow, Groups: []string{"dev"}, VMs: []string{"web*"}, Logins: []string{f.login},
		Channels: []policy.Channel{policy.Shell, policy.Exec, policy.SCP, policy.SFTP, policy.LocalForward, policy.RemoteForward},
	}
}

// rules replaces the policy, as a reload does, and revalidates open links.
func (f *fixture) rules(rules ...policy.Rule) {
	f.policy.set(&policy.Policy{Rules: rules})
	f.srv.Revalidate()
}

// setAccounts replaces the accounts, as a reload does; the caller
// revalidates.
func (f *fixture) setAccounts(accounts ...bastion.Account) {
	f.t.Helper()
	set, err := bastion.NewAccountSet(accounts)
	if err != nil {
		f.t.Fatal(err)
	}
	f.accounts.p.Store(set)
}

// liveAccounts are accounts that can be replaced while the server runs.
type liveAccounts struct {
	p atomic.Pointer[bastion.AccountSet]
}

func (l *liveAccounts) Identify(key gossh.PublicKey) (bastion.Account, bool) {
	return l.p.Load().Identify(key)
}

func (l *liveAccounts) IdentifyCert(cert *gossh.Certificate, account string, source netip.Addr, now time.Time) (bastion.Account, *bastion.CertLogin, error) {
	return l.p.Load().IdentifyCert(cert, account, source, now)
}

func (l *liveAccounts) Revoked(key gossh.PublicKey) string { return l.p.Load().Revoked(key) }

// livePolicy is a policy that can be replaced while the server runs.
type livePolicy struct{ p atomic.Pointer[policy.Policy] }

func (l *livePolicy) set(p *policy.Policy)                    { l.p.Store(p) }
func (l *livePolicy) Decide(r policy.Request) policy.Decision { return l.p.Load().Decide(r) }
func (l *livePolicy) Possible(r policy.Request, kinds ...policy.Channel) bool {
	return l.p.Load().Possible(r, kinds...)
}
func (l *livePolicy) Logins(account string, groups []string, source netip.Addr, d vm.Domain, t time.Time) []string {
	return l.p.Load().Logins(account, groups, source, d, t)
}

// ssh runs the client's ssh with args.
func (f *fixture) ssh(stdin []byte, args ...string) testenv.Result {
	f.t.Helper()
	return f.client.Run(stdin, "ssh", args...)
}

// jump runs `ssh -J bastion <login>@web1 args...`.
func (f *fixture) jump(stdin []byte, args ...string) testenv.Result {
	f.t.Helper()
	return f.ssh(stdin, append([]string{"-J", "bastion", f.login + "@web1"}, args...)...)
}

// auditLog collects audit events.
type auditLog struct {
	mu     sync.Mutex
	events []audit.Event
}

func (a *auditLog) add(e audit.Event) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.events = append(a.events, e)
}

// find returns the first event of type t whose reason contains reason.
func (a *auditLog) find(t audit.Type, reason string) (audit.Event, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, e := range a.events {
		if e.Type == t && strings.Contains(e.Reason, reason) {
			return e, true
		}
	}
	return audit.Event{}, false
}

// reasons lists the reasons of every event.
func (a *auditLog) reasons() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []string
	for _, e := range a.events {
		out = append(out, e.Reason)
	}
	return out
}

// count is how many events of type t about vm there are.
func (a *auditLog) count(t audit.Type, vm string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for _, e := range a.events {
		if e.Type == t && e.VM == vm {
			n++
		}
	}
	return n
}

// wait waits until there are n events of type t about vm: some are emitted
// as a connection winds down, after the client has exited.
func (a *auditLog) wait(t testing.TB, typ audit.Type, vm string, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for a.count(typ, vm) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d %s events about %s, want %d", a.count(typ, vm), typ, vm, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// testLogger logs through t, or discards with -short... it always logs
// to the test's output so a failing test shows the bastion's side.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// echoServer accepts TCP connections on 127.0.0.1 and echoes what it reads
// until EOF, then half-closes. It counts connections.
type echoServer struct {
	addr  string
	mu    sync.Mutex
	conns int
}

func startEcho(t *testing.T) *echoServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return serveEcho(t, ln)
}

// serveEcho echoes on ln (TCP or a unix socket) until the test ends.
func serveEcho(t *testing.T, ln net.Listener) *echoServer {
	e := &echoServer{addr: ln.Addr().String()}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			e.mu.Lock()
			e.conns++
			e.mu.Unlock()
			go func() {
				defer c.Close()
				io.Copy(c, c)
				c.(interface{ CloseWrite() error }).CloseWrite()
			}()
		}
	}()
	return e
}

func (e *echoServer) count() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.conns
}

func TestMain(m *testing.M) {
	os.Exit(m.Run())
}

func marshal(k gossh.PublicKey) string {
	return strings.TrimSpace(string(gossh.MarshalAuthorizedKey(k)))
}

// goClient logs in to the bastion as user with the client's key, using
// x/crypto's client, which exposes what OpenSSH's keeps to itself (the
// name of an exit signal). It trusts the bastion's host CA only.
func (f *fixture) goClient(user string, ciphers ...string) *gossh.Client {
	f.t.Helper()
	data, err := os.ReadFile(f.client.Key)
	if err != nil {
		f.t.Fatal(err)
	}
	signer, err := gossh.ParsePrivateKey(data)
	if err != nil {
		f.t.Fatal(err)
	}
	c, err := gossh.Dial("tcp", f.addr, &gossh.ClientConfig{
		User:            user,
		Auth:            []gossh.AuthMethod{gossh.PublicKeys(signer)},
		HostKeyCallback: f.hostCAChecker().CheckHostKey,
		Timeout:         10 * time.Second,
		Config:          gossh.Config{Ciphers: ciphers}, // none: x/crypto's defaults
	})
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { c.Close() })
	return c
}

// hostCAChecker accepts host certificates signed by the bastion's host CA.
func (f *fixture) hostCAChecker() *gossh.CertChecker {
	ca := f.host.CA.PublicKey()
	return &gossh.CertChecker{IsHostAuthority: func(auth gossh.PublicKey, _ string) bool {
		return bytes.Equal(auth.Marshal(), ca.Marshal())
	}}
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// all returns a copy of the events so far.
func (a *auditLog) all() []audit.Event {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]audit.Event(nil), a.events...)
}

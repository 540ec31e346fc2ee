package bastion_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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

func TestHostKeyMismatchRefused(t *testing.T) {
	f := newFixture(t)
	impostor, _ := testenv.NewKey(t)
	up, _ := f.fleet.Resolve(context.Background(), vm.Domain{Name: "web1"}, "")
	up.HostKeys = []gossh.PublicKey{impostor.PublicKey()}
	f.fleet.Set("web1", up)
	res := f.jump(nil, "echo secret")
	if res.Exit != 255 || !strings.Contains(res.Stderr, "bastion: web1: host key does not match the pinned key") {
		t.Fatalf("want a refusal naming the host key, got %v", res)
	}
	if len(res.Stdout) != 0 {
		t.Fatalf("command ran: %q", res.Stdout)
	}
	if _, ok := f.audit.find(audit.UpstreamFailed, "host key does not match"); !ok {
		t.Error("no audit event for the mismatch")
	}
	// The login@vm form says the same.
	res = f.ssh(nil, "-l", f.login+"@web1", "bastion", "echo secret")
	if res.Exit != 255 || !strings.Contains(res.Stderr, "host key does not match the pinned key") {
		t.Fatalf("login@web1@bastion: got %v", res)
	}
}

func TestUnknownKeyRefused(t *testing.T) {
	f := newFixture(t)
	stranger := testenv.NewClient(t, f.addr, "alice", f.host.KnownHostsLine())
	for _, args := range [][]string{{"bastion", "true"}, {"-J", "bastion", f.login + "@web1", "true"}} {
		res := stranger.Run(nil, "ssh", args...)
		if res.Exit != 255 || !strings.Contains(res.Stderr, "Permission denied") {
			t.Fatalf("ssh %v with a key of no account: got %v", args, res)
		}
	}
	if _, ok := f.audit.find(audit.LoginFailed, "unknown key"); !ok {
		t.Error("no audit event for the unknown key")
	}
}

func TestAccountNameMustMatchKey(t *testing.T) {
	f := newFixture(t)
	res := f.ssh(nil, "-l", "bob", "bastion", "true")
	if res.Exit != 255 || !strings.Contains(res.Stderr, "Permission denied") {
		t.Fatalf("alice's key as bob: got %v", res)
	}
}

func TestNoneAuthenticationRefused(t *testing.T) {
	f := newFixture(t)
	_, err := gossh.Dial("tcp", f.addr, &gossh.ClientConfig{
		User:            "alice",
		HostKeyCallback: gossh.InsecureIgnoreHostKey(),
		Timeout:         10 * time.Second,
	})
	if err == nil || !strings.Contains(err.Error(), "unable to authenticate") {
		t.Fatalf("none authentication: got %v, want a refusal", err)
	}
}

func TestNotAnOpenProxy(t *testing.T) {
	f := newFixture(t)
	echo := startEcho(t)
	for _, dest := range []string{echo.addr, f.vm.Addr, "web1:2222", "localhost:22", "nosuchvm:22"} {
		res := f.ssh(nil, "-W", dest, "bastion")
		if res.Exit != 255 || !strings.Contains(res.Stderr, "open failed") {
			t.Errorf("ssh -W %s bastion: got %v, want the channel refused", dest, res)
		}
	}
	res := f.ssh(nil, "-W", echo.addr, "bastion")
	if !strings.Contains(res.Stderr, "the bastion is not a proxy") {
		t.Errorf("refusal does not say why: %q", res.Stderr)
	}
	res = f.ssh(nil, "-W", "nosuchvm:22", "bastion")
	if !strings.Contains(res.Stderr, "bastion: nosuchvm: no such VM") {
		t.Errorf("unknown VM refusal: %q", res.Stderr)
	}
	if echo.count() != 0 {
		t.Fatalf("the bastion connected to %s", echo.addr)
	}
}

func TestPolicyDeniesLogin(t *testing.T) {
	f := newFixture(t)
	f.login = "nobody"
	res := f.jump(nil, "true")
	if res.Exit != 255 || !strings.Contains(res.Stderr, "bastion: web1: denied by policy") {
		t.Fatalf("login not allowed by any rule: got %v", res)
	}
	if _, ok := f.audit.find(audit.Denied, "no rule allows"); !ok {
		t.Error("no audit event for the denial")
	}
}

func TestPolicyDeniesChannel(t *testing.T) {
	f := newFixture(t)
	rule := f.devRule()
	rule.Channels = []policy.Channel{policy.Shell}
	f.rules(rule)
	res := f.jump(nil, "echo hi")
	if res.Exit != 255 || !strings.Contains(res.Stderr, "bastion: web1: exec denied by policy") || len(res.Stdout) != 0 {
		t.Fatalf("exec not allowed: got %v stdout %q", res, res.Stdout)
	}
	// A forward the policy refuses: the connection to the local end is
	// closed without reaching anything, and ssh says why.
	echo := startEcho(t)
	local := testenv.FreeAddr(t)
	stderr := f.background("-N", "-J", "bastion", "-L", local+":"+echo.addr, f.login+"@web1")
	testenv.WaitListening(t, local)
	c := testenv.Dial(t, local)
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if n, _ := c.Read(make([]byte, 1)); n != 0 {
		t.Fatal("read data through a refused forward")
	}
	c.Close()
	waitFor(t, func() bool { return strings.Contains(stderr.String(), "local-forward denied by policy") },
		func() string { return "ssh never said the forward was denied: " + stderr.String() })
	if echo.count() != 0 {
		t.Fatal("the refused forward reached its target")
	}
}

// TestFailedAuthenticationsSlowTheSourceDown: a source whose connections
// keep failing to authenticate waits before its next key exchange; a
// person behind the same address with a good key still gets in, later.
func TestFailedAuthenticationsSlowTheSourceDown(t *testing.T) {
	f := newFixture(t, func(s *bastion.Server) {
		s.AuthFailures = 3
		s.AuthRefill = 2 * time.Second
	})
	stranger := testenv.NewClient(t, f.addr, "alice", f.host.KnownHostsLine())
	for i := 0; i < 3; i++ {
		if res := stranger.Run(nil, "ssh", "bastion", "true"); res.Exit != 255 || !strings.Contains(res.Stderr, "Permission denied") {
			t.Fatalf("an unknown key: %v", res)
		}
	}
	res := f.ssh(nil, "bastion")
	if res.Exit != 0 {
		t.Fatalf("a good key from the same address after 3 failures: %v, want it in after a wait", res)
	}
	if _, ok := f.audit.find(audit.LoginFailed, "rate limited: too many failed authentications; delayed"); !ok {
		t.Error("no audit event for the delay")
	}
}

// TestManyKeysInAnAgentDoNotLockOut: a client that offers several keys the
// bastion does not know before the right one logs in every time; the keys
// it tried are not failures of its source.
func TestManyKeysInAnAgentDoNotLockOut(t *testing.T) {
	f := newFixture(t, func(s *bastion.Server) {
		s.AuthFailures = 3
		s.AuthRefill = time.Hour // a counted failure would show as an hour's wait
	})
	var args []string
	for i := 0; i < 5; i++ {
		other := testenv.NewClient(t, f.addr, "alice", "")
		args = append(args, "-i", other.Key)
	}
	args = append(args, "-i", f.client.Key, "bastion")
	for i := 0; i < 5; i++ {
		start := time.Now()
		if res := f.ssh(nil, args...); res.Exit != 0 {
			t.Fatalf("login %d, offering 5 unknown keys first: %v", i+1, res)
		}
		if d := time.Since(start); d > time.Minute {
			t.Fatalf("login %d waited %v", i+1, d)
		}
	}
}

// TestHugeUserNameDoesNotFloodTheLog: what a client sends before it
// authenticates reaches the log cut short, and failures are paced.
func TestHugeUserNameDoesNotFloodTheLog(t *testing.T) {
	var logged testenv.LockedBuffer
	f := newFixture(t, func(s *bastion.Server) {
		s.Logger = slog.New(slog.NewTextHandler(&logged, nil))
		s.AuthFailures = 100 // not slowed down: this is about the log
	})
	stranger, _ := testenv.NewKey(t)
	for i := 0; i < 20; i++ {
		c, err := gossh.Dial("tcp", f.addr, &gossh.ClientConfig{User: strings.Repeat("u", 200<<10),
			Auth: []gossh.AuthMethod{gossh.PublicKeys(stranger)}, HostKeyCallback: gossh.InsecureIgnoreHostKey(), Timeout: 10 * time.Second})
		if err == nil {
			c.Close()
			t.Fatal("a stranger logged in")
		}
	}
	if n := len(logged.String()); n > 8<<10 {
		t.Fatalf("20 attempts with a 200 KiB user name wrote %d bytes of log", n)
	}
	if !strings.Contains(logged.String(), "(204800 bytes)") {
		t.Fatalf("the log does not say how long the name was:\n%s", logged.String())
	}
}

func TestKnownHostsLineAvoidsPrompt(t *testing.T) {
	f := newFixture(t)
	res := f.ssh(nil, "-o", "LogLevel=INFO", "-J", "bastion", f.login+"@web1", "true")
	if res.Exit != 0 || res.Stderr != "" {
		t.Fatalf("with the @cert-authority line: got %v, want silence", res)
	}
	// Without it, StrictHostKeyChecking refuses: the check is live.
	bare := testenv.NewClient(t, f.addr, "alice", "")
	res = bare.Run(nil, "ssh", "-i", f.client.Key, "bastion", "true")
	if res.Exit != 255 || !strings.Contains(res.Stderr, "Host key verification failed") {
		t.Fatalf("without the line: got %v", res)
	}
}

// TestSHA1AndDSASignaturesRefused: like OpenSSH, the bastion takes an RSA
// key's signature only with SHA-2, and no DSA at all. A DSA key cannot
// even be given to an account (x/crypto no longer parses one; the
// configuration names it), so the DSA login offers a key the bastion
// cannot read.
func TestSHA1AndDSASignaturesRefused(t *testing.T) {
	f := newFixture(t)
	testenv.Need(t, "ssh-keygen")
	newKey := func(kind string) string {
		path := filepath.Join(t.TempDir(), "id_"+kind)
		if out, err := exec.Command("ssh-keygen", "-q", "-t", kind, "-N", "", "-f", path).CombinedOutput(); err != nil {
			t.Fatalf("ssh-keygen -t %s: %v\n%s", kind, err, out)
		}
		return path
	}
	rsaKey, dsaKey := newKey("rsa"), newKey("dsa")
	text, err := os.ReadFile(rsaKey + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	rsaPub, _, _, _, err := gossh.ParseAuthorizedKey(text)
	if err != nil {
		t.Fatal(err)
	}
	f.setAccounts(bastion.Account{Name: "alice", Groups: []string{"dev"}, Keys: []gossh.PublicKey{f.client.PublicKey, rsaPub}})
	login := func(key, algos string) testenv.Result {
		return f.ssh(nil, "-i", key, "-o", "IdentitiesOnly=yes", "-o", "PubkeyAcceptedAlgorithms="+algos, "bastion")
	}
	if res := login(rsaKey, "rsa-sha2-512,rsa-sha2-256"); res.Exit != 0 {
		t.Fatalf("an RSA key with SHA-2 signatures: %v", res)
	}
	for _, tc := range []struct{ key, algos string }{{rsaKey, "ssh-rsa"}, {dsaKey, "ssh-dss"}} {
		if res := login(tc.key, tc.algos); res.Exit != 255 || !strings.Contains(res.Stderr, "Permission denied") {
			t.Errorf("a %s signature: %v, want it refused", tc.algos, res)
		}
	}
}

// TestKeyOptionsFromAndExpiryEnforced: from= and expiry-time= on an
// account's key are honoured at login, with real OpenSSH.
func TestKeyOptionsFromAndExpiryEnforced(t *testing.T) {
	f := newFixture(t)
	fp := gossh.FingerprintSHA256(f.client.PublicKey)
	login := func(opts bastion.KeyOptions, args ...string) testenv.Result {
		f.setAccounts(bastion.Account{Name: "alice", Groups: []string{"dev"}, Keys: []gossh.PublicKey{f.client.PublicKey},
			KeyOptions: map[string]bastion.KeyOptions{fp: opts}})
		return f.ssh(nil, append(args, "bastion")...)
	}
	for _, tc := range []struct {
		name string
		opts bastion.KeyOptions
		args []string
		ok   bool
	}{
		{"from the allowed range", bastion.KeyOptions{From: []string{"127.0.0.0/8", "!127.0.0.2"}}, nil, true},
		{"from a negated address", bastion.KeyOptions{From: []string{"127.0.0.0/8", "!127.0.0.2"}}, []string{"-o", "BindAddress=127.0.0.2"}, false},
		{"from outside the range", bastion.KeyOptions{From: []string{"10.0.0.0/8"}}, nil, false},
		{"before its expiry", bastion.KeyOptions{Expires: time.Now().Add(time.Hour)}, nil, true},
		{"after its expiry", bastion.KeyOptions{Expires: time.Now().Add(-time.Minute)}, nil, false},
	} {
		res := login(tc.opts, tc.args...)
		if ok := res.Exit == 0; ok != tc.ok || (!ok && !strings.Contains(res.Stderr, "Permission denied")) {
			t.Errorf("%s: %v, want ok=%v", tc.name, res, tc.ok)
		}
	}
}

// TestStaleTrustHealsWithinTheLogin: when the VM refuses the trust's key
// (its authorized_keys rewritten) or presents another host key than the one
// pinned, the bastion drops the trust and verifies again, once, inside the
// same login: the user sees the command run, not an error.
func TestStaleTrustHealsWithinTheLogin(t *testing.T) {
	for _, tc := range []struct {
		name  string
		stale func(f *fixture, fresh keys.Upstream) keys.Upstream
	}{
		{"key refused", func(f *fixture, fresh keys.Upstream) keys.Upstream {
			unknown, _ := testenv.NewKey(t)
			fresh.Signer = unknown
			return fresh
		}},
		{"host key changed", func(f *fixture, fresh keys.Upstream) keys.Upstream {
			before, _ := testenv.NewKey(t)
			fresh.HostKeys = []gossh.PublicKey{before.PublicKey()}
			return fresh
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			fresh, _ := f.fleet.Resolve(context.Background(), vm.Domain{Name: "web1"}, "")
			f.fleet.SetStale("web1", tc.stale(f, fresh), fresh)
			if res := f.jump(nil, "echo healed"); res.Exit != 0 || string(res.Stdout) != "healed\n" {
				t.Fatalf("a login over a stale trust: %v %q", res, res.Stdout)
			}
			if n := f.fleet.Forgotten(); n != 1 {
				t.Fatalf("the trust was forgotten %d times, want once", n)
			}
		})
	}
	// Once, not in a loop: a VM that refuses the new trust too is reported.
	f := newFixture(t)
	fresh, _ := f.fleet.Resolve(context.Background(), vm.Domain{Name: "web1"}, "")
	unknown, _ := testenv.NewKey(t)
	stale := fresh
	stale.Signer = unknown
	f.fleet.SetStale("web1", stale, stale)
	if res := f.jump(nil, "true"); res.Exit != 255 || !strings.Contains(res.Stderr, "the VM refused the bastion's key") {
		t.Fatalf("a VM refusing every trust: %v", res)
	}
	if n := f.fleet.Forgotten(); n != 1 {
		t.Fatalf("forgotten %d times, want once", n)
	}
}

// TestRestartingSSHDIsWaitedFor: a VM's sshd that refuses connections for
// a moment (restarting after a reload or an upgrade) is tried again, and
// the login goes through; one that stays closed is reported as such.
func TestRestartingSSHDIsWaitedFor(t *testing.T) {
	f := newFixture(t)
	vm := f.debugVM(t, "web2")
	pemBytes, err := os.ReadFile(f.upstreamKeyPath)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := gossh.ParsePrivateKey(pemBytes)
	if err != nil {
		t.Fatal(err)
	}
	// web2 is reached at an address nothing listens on yet; in a second
	// a forwarder to the real sshd opens there.
	addr := testenv.FreeAddr(t)
	f.fleet.Set("web2", keys.Upstream{Addr: addr, HostKeys: []gossh.PublicKey{vm.HostKey}, Signer: signer})
	go func() {
		time.Sleep(time.Second)
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Error(err)
			return
		}
		t.Cleanup(func() { ln.Close() })
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", vm.Addr)
			if err != nil {
				c.Close()
				continue
			}
			go func() { io.Copy(up, c); up.(*net.TCPConn).CloseWrite() }()
			go func() { io.Copy(c, up); c.(*net.TCPConn).CloseWrite() }()
		}
	}()
	if res := f.ssh(nil, f.login+"@web2@bastion", "echo after the restart"); res.Exit != 0 || string(res.Stdout) != "after the restart\n" {
		t.Fatalf("a login while the VM's sshd restarts: %v %q", res, res.Stdout)
	}
	// Closed for good: refused, with the reason.
	f.fleet.Set("web2", keys.Upstream{Addr: testenv.FreeAddr(t), HostKeys: []gossh.PublicKey{vm.HostKey}, Signer: signer})
	if res := f.ssh(nil, f.login+"@web2@bastion", "true"); res.Exit != 255 || !strings.Contains(res.Stderr, "the VM's sshd cannot be reached") {
		t.Fatalf("a VM whose sshd stays closed: %v", res)
	}
	if ev, ok := f.audit.find(audit.UpstreamFailed, "connection refused"); !ok || ev.Cause != "unreachable" {
		t.Fatalf("no upstream_failed event naming the refusal: %+v %q", ev, f.audit.reasons())
	}
}

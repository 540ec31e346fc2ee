package trust

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/internal/testenv"
	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/vm"
)

// localGuest is an out-of-band channel onto this machine, standing in for
// a guest agent: files are this machine's (the host key files map to a
// real sshd's), and authorized keys go into that sshd's authorized_keys.
// The in-band half is real: the check logs in to that sshd and moves the
// nonces over SFTP. Faults are injected per test.
type localGuest struct {
	t    testing.TB
	sshd *testenv.SSHD

	mu          sync.Mutex
	hostKey     ssh.PublicKey // reported as the guest's host key
	extraKey    ssh.PublicKey // if set, reported as a second host key the sshd does not hold
	pingErr     error
	corruptOB   bool              // write a different nonce than asked
	corruptRead bool              // read back a different nonce than is there
	files       map[string][]byte // if set, what the guest's /etc/ssh files hold
	planted     []string          // authorized_keys lines the guest wrote itself
	added       []string
	removed     []string
	written     []string
}

func newLocalGuest(t testing.TB) *localGuest {
	g := &localGuest{t: t, sshd: testenv.StartSSHD(t)}
	g.hostKey = g.sshd.HostKey
	return g
}

func (g *localGuest) port() int {
	_, p, _ := net.SplitHostPort(g.sshd.Addr)
	n, _ := strconv.Atoi(p)
	return n
}

func (g *localGuest) manager() *Manager {
	return &Manager{OOB: g, Instance: "test", SSHPort: g.port(), Timeout: 30 * time.Second}
}

func (g *localGuest) Find(_ context.Context, name string) (vm.Domain, error) {
	if name != "vm1" && name != "uuid-1" {
		return vm.Domain{}, fmt.Errorf("%w: %s", vm.ErrNoSuchVM, name)
	}
	return vm.Domain{URI: "test:///", Name: "vm1", UUID: "uuid-1", Running: true}, nil
}

func (g *localGuest) Ping(context.Context, vm.Domain) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.pingErr
}

func (g *localGuest) Address(context.Context, vm.Domain) (vm.Address, error) {
	return vm.Address{IP: netip.MustParseAddr("127.0.0.1")}, nil
}

func (g *localGuest) ReadFile(_ context.Context, _ vm.Domain, path string) ([]byte, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.files != nil && strings.HasPrefix(path, "/etc/ssh/") {
		if data, ok := g.files[path]; ok {
			return data, nil
		}
		return nil, errors.New("no such file")
	}
	if path == hostKeyFiles[0] {
		return ssh.MarshalAuthorizedKey(g.hostKey), nil
	}
	if path == hostKeyFiles[1] && g.extraKey != nil {
		return ssh.MarshalAuthorizedKey(g.extraKey), nil
	}
	if strings.HasPrefix(path, "/etc/ssh/") {
		return nil, errors.New("no such file")
	}
	data, err := os.ReadFile(path)
	if g.corruptRead {
		data = append(data, 'x')
	}
	return data, err
}

func (g *localGuest) WriteFile(_ context.Context, _ vm.Domain, path string, data []byte) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.written = append(g.written, path)
	if g.corruptOB {
		data = []byte(strings.Repeat("0", len(data)))
	}
	return os.WriteFile(path, data, 0o600)
}

func (g *localGuest) RemoveFile(_ context.Context, _ vm.Domain, path string) error {
	err := os.Remove(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

func (g *localGuest) Chown(context.Context, vm.Domain, string, string) error { return nil }

func (g *localGuest) AddAuthorizedKey(_ context.Context, _ vm.Domain, _ string, line string) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.added = append(g.added, line)
	return g.writeKeys()
}

func (g *localGuest) RemoveAuthorizedKey(_ context.Context, _ vm.Domain, _ string, line string) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.removed = append(g.removed, line)
	return g.writeKeys()
}

func (g *localGuest) AuthorizedKeys(context.Context, vm.Domain, string) ([]string, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.linesLocked(), nil
}

// linesLocked are the planted and added lines not removed.
func (g *localGuest) linesLocked() []string {
	var lines []string
	for _, l := range append(slices.Clip(g.planted), g.added...) {
		if !contains(g.removed, l) {
			lines = append(lines, l)
		}
	}
	return lines
}

// writeKeys writes the added and not removed lines as authorized_keys.
func (g *localGuest) writeKeys() error {
	lines := g.linesLocked()
	return os.WriteFile(g.sshd.Dir+"/authorized_keys", []byte(strings.Join(lines, "\n")+"\n"), 0o600)
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func (g *localGuest) counts() (added, removed int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.added), len(g.removed)
}

// errAgentSilent stands for the hypervisor's sentinel of a silent agent.
var errAgentSilent = errors.New("guest agent is not responding")

var vm1 = vm.Domain{URI: "test:///", Name: "vm1", UUID: "uuid-1"}

func TestCheckEstablishesTrust(t *testing.T) {
	g := newLocalGuest(t)
	m := g.manager()
	tr, err := m.Get(context.Background(), vm1, g.sshd.Login)
	if err != nil {
		t.Fatal(err)
	}
	if tr.Addr != g.sshd.Addr || tr.Fingerprint() != ssh.FingerprintSHA256(g.sshd.HostKey) {
		t.Fatalf("trust %+v", tr)
	}
	if len(tr.Modes) != 2 || tr.Modes[0] != OBIB || tr.Modes[1] != IBOB {
		t.Fatalf("modes %v", tr.Modes)
	}
	if !strings.HasPrefix(tr.KeyLine, `expiry-time="`) || !strings.Contains(tr.KeyLine, " bastion:test:epoch-") {
		t.Fatalf("key line %q", tr.KeyLine)
	}
	// The epoch key logs in to the real sshd.
	c, err := ssh.Dial("tcp", tr.Addr, &ssh.ClientConfig{User: g.sshd.Login, Auth: []ssh.AuthMethod{ssh.PublicKeys(tr.Signer)},
		HostKeyCallback: ssh.FixedHostKey(g.sshd.HostKey), Timeout: 10 * time.Second})
	if err != nil {
		t.Fatalf("the epoch key does not log in: %v", err)
	}
	c.Close()
	// Nonces were removed.
	for _, path := range g.written {
		if _, err := os.Stat(path); err == nil {
			t.Errorf("nonce file %s left behind", path)
		}
	}
	// A second request uses the same trust.
	again, err := m.Get(context.Background(), vm1, g.sshd.Login)
	if err != nil || again != tr {
		t.Fatalf("second Get: %v, same trust %v", err, again == tr)
	}
	if added, _ := g.counts(); added != 1 {
		t.Fatalf("%d keys installed for two requests", added)
	}
	if len(m.Trusts()) != 1 {
		t.Fatalf("Trusts: %v", m.Trusts())
	}
}

func TestConcurrentRequestsShareOneCheck(t *testing.T) {
	g := newLocalGuest(t)
	m := g.manager()
	var wg sync.WaitGroup
	errs := make(chan error, 10)
	for i := 0; i < 10; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := m.Get(context.Background(), vm1, g.sshd.Login)
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if added, _ := g.counts(); added != 1 {
		t.Fatalf("10 concurrent requests ran %d checks", added)
	}
}

func TestCheckFailures(t *testing.T) {
	other, _ := testenv.NewKey(t)
	for _, tc := range []struct {
		name   string
		break_ func(g *localGuest)
		want   error
		step   string
		msg    string // the cause the user is told
	}{
		{"agent silent", func(g *localGuest) { g.pingErr = fmt.Errorf("%w: timed out", errAgentSilent) }, errAgentSilent, "guest agent",
			"guest agent is not responding"},
		{"impostor host key", func(g *localGuest) { g.hostKey = other.PublicKey() }, keys.ErrHostKeyMismatch, "in-band connection",
			"the VM's host key is not the one read through the hypervisor"},
		{"OB-IB value altered", func(g *localGuest) { g.corruptOB = true }, ErrNonceMismatch, "nonce ob-ib",
			"the value read back does not match the value written"},
		{"IB-OB value altered", func(g *localGuest) { g.corruptRead = true }, ErrNonceMismatch, "nonce ib-ob",
			"the value read back does not match the value written"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newLocalGuest(t)
			tc.break_(g)
			m := g.manager()
			tr, err := m.Get(context.Background(), vm1, g.sshd.Login)
			var te *Error
			if tr != nil || !errors.As(err, &te) || te.Step != tc.step || (tc.want != nil && !errors.Is(err, tc.want)) {
				t.Fatalf("got %v, %v; want step %q and %v", tr, err, tc.step, tc.want)
			}
			if want := "could not verify the VM (" + tc.step + ": " + tc.msg + ")"; te.UserMessage() != want {
				t.Errorf("user message %q, want %q", te.UserMessage(), want)
			}
			if len(m.Trusts()) != 0 {
				t.Fatal("trust recorded after a failed check")
			}
			// A key installed for the check is removed again.
			if added, removed := g.counts(); added != removed {
				t.Fatalf("%d keys installed, %d removed", added, removed)
			}
			for _, path := range g.written {
				if _, err := os.Stat(path); err == nil {
					t.Errorf("nonce file %s left behind", path)
				}
			}
		})
	}
}

func TestDropAndRefresh(t *testing.T) {
	g := newLocalGuest(t)
	m := g.manager()
	m.TTL = 4 * time.Second
	first, err := m.Get(context.Background(), vm1, g.sshd.Login)
	if err != nil {
		t.Fatal(err)
	}
	m.Drop("uuid-1", "rebooted")
	if len(m.Trusts()) != 0 {
		t.Fatal("trust survived Drop")
	}
	second, err := m.Get(context.Background(), vm1, g.sshd.Login)
	if err != nil || second == first {
		t.Fatalf("after Drop: %v, new trust %v", err, second != first)
	}
	// In the last quarter of its life a trust is served and refreshed:
	// a new key is installed and the old one removed.
	time.Sleep(time.Until(second.Expires) - time.Second/2)
	served, err := m.Get(context.Background(), vm1, g.sshd.Login)
	if err != nil || served != second {
		t.Fatalf("near expiry: %v, same trust %v", err, served == second)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		trusts := m.Trusts()
		if len(trusts) == 1 && trusts[0].KeyLine != second.KeyLine {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("trust was not refreshed")
		}
		time.Sleep(50 * time.Millisecond)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if !contains(g.removed, second.KeyLine) {
		t.Fatal("the superseded key was not removed")
	}
}

// TestExpiredKeyRefusedBySSHD shows the expiry-time in the key line is
// enforced by sshd itself.
func TestExpiredKeyRefusedBySSHD(t *testing.T) {
	g := newLocalGuest(t)
	signer, _ := testenv.NewKey(t)
	for _, tc := range []struct {
		expires time.Time
		ok      bool
	}{{time.Now().Add(time.Hour), true}, {time.Now().Add(-time.Minute), false}} {
		g.AddAuthorizedKey(context.Background(), vm1, g.sshd.Login, AuthorizedKeyLine(signer.PublicKey(), tc.expires, "test", time.Now()))
		c, err := ssh.Dial("tcp", g.sshd.Addr, &ssh.ClientConfig{User: g.sshd.Login, Auth: []ssh.AuthMethod{ssh.PublicKeys(signer)},
			HostKeyCallback: ssh.FixedHostKey(g.sshd.HostKey), Timeout: 10 * time.Second})
		if (err == nil) != tc.ok {
			t.Fatalf("key expiring %v: login error %v", tc.expires, err)
		}
		if c != nil {
			c.Close()
		}
		g.mu.Lock()
		g.added = nil
		g.mu.Unlock()
	}
}

// TestReconnectedHypervisorDropsItsTrusts: while the connection to a
// hypervisor was down its events went unheard, so when it comes back every
// trust on it is checked again; a trust on another hypervisor stays.
func TestReconnectedHypervisorDropsItsTrusts(t *testing.T) {
	g := newLocalGuest(t)
	m := g.manager()
	if _, err := m.Get(context.Background(), vm1, g.sshd.Login); err != nil {
		t.Fatal(err)
	}
	m.HandleEvent(vm.Event{URI: "qemu+ssh://elsewhere/system", Kind: vm.EventReconnected})
	time.Sleep(200 * time.Millisecond)
	if len(m.Trusts()) != 1 {
		t.Fatal("another hypervisor's reconnection dropped the trust")
	}
	m.HandleEvent(vm.Event{URI: vm1.URI, Kind: vm.EventReconnected})
	deadline := time.Now().Add(5 * time.Second)
	for len(m.Trusts()) != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the trust survived its hypervisor's reconnection")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestInBandCiphers: the check's connection to the VM prefers the
// manager's ciphers, in order, as the VM's sshd logging at DEBUG1 sees.
func TestInBandCiphers(t *testing.T) {
	for _, tc := range []struct {
		ciphers []string
		want    string
	}{
		{nil, "aes128-gcm@openssh.com"}, // x/crypto's first
		{[]string{"aes256-ctr", "aes128-gcm@openssh.com"}, "aes256-ctr"},
	} {
		sshd, err := testenv.StartSSHDWith(testenv.SSHDOptions{Dir: t.TempDir(), Config: testenv.TestConfig + "LogLevel DEBUG1\n"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sshd.Stop() })
		g := &localGuest{t: t, sshd: sshd, hostKey: sshd.HostKey}
		m := g.manager()
		m.Ciphers = tc.ciphers
		if _, err := m.Get(context.Background(), vm1, sshd.Login); err != nil {
			t.Fatalf("ciphers %q: %v", tc.ciphers, err)
		}
		log, _ := os.ReadFile(sshd.Log)
		var seen []string
		for _, line := range strings.Split(string(log), "\n") {
			if _, c, ok := strings.Cut(line, "kex: client->server cipher: "); ok {
				seen = append(seen, strings.Fields(c)[0])
			}
		}
		if len(seen) == 0 || slices.ContainsFunc(seen, func(c string) bool { return c != tc.want }) {
			t.Errorf("ciphers %q: the VM's sshd saw %q, want %s on every connection", tc.ciphers, seen, tc.want)
		}
	}
}

// TestCheckWaitsForRestartingSSHD: a guest whose sshd refuses connections
// for a moment, as while it restarts (a reload re-executes it), is
// verified once it listens again.
func TestCheckWaitsForRestartingSSHD(t *testing.T) {
	g := newLocalGuest(t)
	addr := testenv.FreeAddr(t)
	listening := make(chan net.Listener, 1)
	t.Cleanup(func() {
		if ln := <-listening; ln != nil {
			ln.Close()
		}
	})
	go func() {
		time.Sleep(300 * time.Millisecond)
		ln, err := net.Listen("tcp", addr)
		listening <- ln
		if err != nil {
			return
		}
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", g.sshd.Addr)
			if err != nil {
				c.Close()
				continue
			}
			go func() { io.Copy(up, c); up.Close() }()
			go func() { io.Copy(c, up); c.Close() }()
		}
	}()
	m := g.manager()
	_, port, _ := net.SplitHostPort(addr)
	m.SSHPort, _ = strconv.Atoi(port)
	tr, err := m.Get(context.Background(), vm1, g.sshd.Login)
	if err != nil {
		t.Fatalf("a check while the sshd restarts: %v", err)
	}
	if tr.Addr != addr {
		t.Fatalf("trust at %s, want %s", tr.Addr, addr)
	}
}

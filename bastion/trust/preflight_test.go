package trust

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/internal/testenv"
	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/vm"
)

// Preflight reports each step that changes nothing in the guest, stops at
// the first that fails, and leaves the guest as it found it.
func TestPreflight(t *testing.T) {
	g := newLocalGuest(t)
	d := vm.Domain{URI: "test:///", Name: "vm1", UUID: "uuid-1", Running: true}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	steps := func(found []Finding) (names []string) {
		for _, f := range found {
			names = append(names, f.Step)
		}
		return names
	}

	found := g.manager().Preflight(ctx, d)
	if got := strings.Join(steps(found), ","); got != "guest agent,address,host keys,sshd" {
		t.Fatalf("steps: %s (%v)", got, found)
	}
	for _, f := range found {
		if f.Err != nil {
			t.Fatalf("%s: %v", f.Step, f.Err)
		}
	}
	if sshd := found[3].Detail; !strings.HasPrefix(sshd, "SSH-2.0-OpenSSH") || !strings.Contains(sshd, ssh.FingerprintSHA256(g.hostKey)) {
		t.Fatalf("sshd finding %q: want the sshd's version and its host key %s", sshd, ssh.FingerprintSHA256(g.hostKey))
	}
	if len(g.added)+len(g.removed)+len(g.written) != 0 {
		t.Fatalf("preflight changed the guest: added %v removed %v wrote %v", g.added, g.removed, g.written)
	}

	// The guest claims a host key its sshd does not hold.
	other, _ := testenv.NewKey(t)
	g.hostKey = other.PublicKey()
	found = g.manager().Preflight(ctx, d)
	if last := found[len(found)-1]; last.Step != "sshd" || !errors.Is(last.Err, keys.ErrHostKeyMismatch) {
		t.Fatalf("a claimed host key the sshd does not hold: %v", found)
	}
	g.hostKey = g.sshd.HostKey

	// The agent is silent: nothing after it is tried.
	g.pingErr = errors.New("guest agent is not responding")
	found = g.manager().Preflight(ctx, d)
	if len(found) != 1 || found[0].Err == nil {
		t.Fatalf("a silent agent: %v", found)
	}
	g.pingErr = nil

	// Nothing speaks SSH at the port: a listener that closes at once.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("HTTP/1.0 400 Bad Request\r\n\r\n"))
			c.Close()
		}
	}()
	m := g.manager()
	m.SSHPort = ln.Addr().(*net.TCPAddr).Port
	found = m.Preflight(ctx, d)
	if last := found[len(found)-1]; last.Step != "sshd" || !errors.Is(last.Err, ErrInBand) || !strings.Contains(last.Err.Error(), "no SSH version line") {
		t.Fatalf("a port that is not sshd: %v", found)
	}
}

func TestVersionLine(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n\x00\x00\x01", "SSH-2.0-OpenSSH_9.2p1 Debian-2"},
		{"SSH-2.0-evil\x1b[2J\r\n", "SSH-2.0-evil?[2J"},
		{"HTTP/1.0 400 Bad Request\r\n", ""},
		{"", ""},
	} {
		if got := VersionLine([]byte(tc.in)); got != tc.want {
			t.Errorf("VersionLine(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

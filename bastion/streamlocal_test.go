package bastion_test

import (
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/internal/testenv"
	"github.com/bastionvm/bastion/policy"
)

// startUnixEcho echoes on a unix socket at path until the test ends.
func startUnixEcho(t *testing.T, path string) {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	serveEcho(t, ln)
}

// dialUnix waits for a unix socket to accept and returns the connection.
func dialUnix(t *testing.T, path string) net.Conn {
	t.Helper()
	var c net.Conn
	waitFor(t, func() bool {
		var err error
		c, err = net.DialTimeout("unix", path, time.Second)
		return err == nil
	}, func() string { return "nothing listens on " + path })
	return c
}

// TestSocketForwards: unix-socket forwards (VS Code Remote-SSH's socket
// mode; ssh -L and -R with paths) through -J and login@vm@bastion, allowed
// by a forward_sockets glob; a socket outside it is refused and audited.
func TestSocketForwards(t *testing.T) {
	f := newFixture(t)
	// The fixture's "VM" sshd shares this machine's file system: the
	// socket it connects to is ours.
	dir, err := os.MkdirTemp("", "sl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	vmSock := filepath.Join(dir, "app.sock")
	startUnixEcho(t, vmSock)
	sockets := f.devRule()
	sockets.Name, sockets.Channels, sockets.ForwardSockets = "sockets", []policy.Channel{policy.LocalForward, policy.RemoteForward}, []string{dir + "/*.sock"}
	f.rules(f.devRule(), sockets)

	for _, mode := range []struct {
		name string
		args []string
	}{
		{"-J", []string{"-J", "bastion", f.login + "@web1"}},
		{"login@vm", []string{f.login + "@web1@bastion"}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			local := filepath.Join(t.TempDir(), "l.sock")
			f.background(append([]string{"-N", "-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindUnlink=yes", "-L", local + ":" + vmSock}, mode.args...)...)
			testenv.EchoThrough(t, dialUnix(t, local))

			// -R: the VM's sshd listens on a socket in the allowed directory
			// and brings its connections back to our echo server.
			echo := startEcho(t)
			remote := filepath.Join(dir, strings.TrimPrefix(mode.name, "-")+"-r.sock")
			f.background(append([]string{"-N", "-o", "ExitOnForwardFailure=yes", "-R", remote + ":" + echo.addr}, mode.args...)...)
			testenv.EchoThrough(t, dialUnix(t, remote))
			if echo.count() < 1 {
				t.Fatal("the echo server behind the client saw no connection")
			}

			// A socket no rule allows: the channel is refused.
			other := filepath.Join(t.TempDir(), "other.sock")
			startUnixEcho(t, other)
			denied := filepath.Join(t.TempDir(), "d.sock")
			f.background(append([]string{"-N", "-L", denied + ":" + other}, mode.args...)...)
			c := dialUnix(t, denied)
			c.SetDeadline(time.Now().Add(30 * time.Second))
			c.Write([]byte("hello"))
			if got, _ := io.ReadAll(c); len(got) != 0 {
				t.Fatalf("a socket outside forward_sockets answered %q", got)
			}
			waitFor(t, func() bool {
				for _, e := range f.audit.all() {
					if e.Type == audit.Denied && e.Detail == other && e.Channel == string(policy.LocalForward) {
						return true
					}
				}
				return false
			}, func() string { return "no denied event for " + other })
		})
	}
	var started []audit.Event
	for _, e := range f.audit.all() {
		if e.Type == audit.ForwardStart && e.Activity != nil && e.Socket != "" {
			started = append(started, e)
		}
	}
	kinds := map[string]int{}
	for _, e := range started {
		kinds[e.Kind+" "+e.Socket]++
	}
	if kinds["direct-streamlocal@openssh.com "+vmSock] != 2 || kinds["forwarded-streamlocal@openssh.com "+filepath.Join(dir, "J-r.sock")] != 1 ||
		kinds["forwarded-streamlocal@openssh.com "+filepath.Join(dir, "login@vm-r.sock")] != 1 {
		t.Fatalf("forward_start events with a socket: %v", kinds)
	}

	// A reload that takes forward_sockets away cancels the -R sockets on
	// the VM: its sshd stops listening there.
	remote := filepath.Join(dir, "J-r.sock")
	f.rules(f.devRule())
	waitFor(t, func() bool {
		ended := slices.ContainsFunc(f.audit.all(), func(e audit.Event) bool { return e.Type == audit.Ended && e.Detail == remote })
		c, err := net.DialTimeout("unix", remote, time.Second)
		if err == nil {
			c.Close()
		}
		return ended && err != nil
	}, func() string {
		return "the -R socket still listens after the reload: " + strings.Join(f.audit.reasons(), "; ")
	})
}

// TestSocketForwardNeedsARule: without forward_sockets, the default rule
// that allows -L to the VM's loopback allows no socket.
func TestSocketForwardNeedsARule(t *testing.T) {
	f := newFixture(t)
	dir := t.TempDir()
	vmSock := filepath.Join(dir, "app.sock")
	startUnixEcho(t, vmSock)
	local := filepath.Join(dir, "l.sock")
	f.background("-N", "-J", "bastion", "-L", local+":"+vmSock, f.login+"@web1")
	c := dialUnix(t, local)
	c.SetDeadline(time.Now().Add(30 * time.Second))
	c.Write([]byte("hello"))
	if got, _ := io.ReadAll(c); len(got) != 0 {
		t.Fatalf("a socket forward under a rule without forward_sockets answered %q", got)
	}
	if _, ok := f.audit.find(audit.Denied, "no rule allows it"); !ok {
		t.Fatalf("no denied event for the socket: %q", f.audit.reasons())
	}
	res := f.ssh(nil, "-o", "ExitOnForwardFailure=yes", "-R", filepath.Join(dir, "r.sock")+":"+testenv.FreeAddr(t), "-J", "bastion", f.login+"@web1", "true")
	if res.Exit == 0 {
		t.Fatalf("-R to a socket without forward_sockets: %v", res)
	}
}

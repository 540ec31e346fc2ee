package bastion_test

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/internal/testenv"
)

// dialIdle opens a TCP connection to addr from local (if set), sends an SSH
// version line and, if partial, the first bytes of a packet it never
// finishes, and reports whether the bastion answered with its own version
// (the connection was let in) or closed it.
func dialIdle(t *testing.T, addr string, partial bool) (net.Conn, bool) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.Write([]byte("SSH-2.0-idle\r\n"))
	if partial {
		c.Write([]byte{0, 0, 0x80, 0}) // a 32 KiB packet, of which nothing follows
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 8)
	n, _ := io.ReadFull(c, buf)
	c.SetReadDeadline(time.Time{})
	return c, n == 8 && string(buf) == "SSH-2.0-"
}

// closedWithin reports whether the bastion closes c within d.
func closedWithin(c net.Conn, d time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c) // returns at EOF, or at the deadline with a timeout
	var ne net.Error
	return err == nil || !(errorsAs(err, &ne) && ne.Timeout())
}

func errorsAs(err error, target *net.Error) bool {
	ne, ok := err.(net.Error)
	if ok {
		*target = ne
	}
	return ok
}

func TestLoginGraceTimeClosesUnauthenticatedConnections(t *testing.T) {
	f := newFixture(t, func(s *bastion.Server) { s.LoginGraceTime = time.Second })
	for _, partial := range []bool{false, true} {
		c, admitted := dialIdle(t, f.addr, partial)
		if !admitted {
			t.Fatalf("partial=%v: the connection was not let in", partial)
		}
		if !closedWithin(c, 15*time.Second) {
			t.Fatalf("partial=%v: still open 15s after a login grace time of 1s", partial)
		}
	}
	// An authenticated session outlives the grace time.
	if res := f.jump(nil, "sleep 3; echo done"); res.Exit != 0 || string(res.Stdout) != "done\n" {
		t.Fatalf("a session longer than the grace time: %v %q", res, res.Stdout)
	}
}

func TestFloodFromOneAddressHeldToItsCap(t *testing.T) {
	f := newFixture(t)
	// 1000 connections that send a version line (half of them the start
	// of a packet too) and nothing more, all at once.
	conns := make([]net.Conn, 1000)
	for i := range conns {
		c, err := net.Dial("tcp", f.addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.Write([]byte("SSH-2.0-idle\r\n"))
		if i%2 == 1 {
			c.Write([]byte{0, 0, 0x80, 0})
		}
		conns[i] = c
	}
	// Let in: the bastion answers with its version. Waiting for a place:
	// nothing comes. Refused: closed.
	deadline := time.Now().Add(3 * time.Second)
	var mu sync.Mutex
	var wg sync.WaitGroup
	admitted, closed := 0, 0
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.SetReadDeadline(deadline)
			buf := make([]byte, 8)
			n, err := io.ReadFull(c, buf)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case n == 8 && string(buf) == "SSH-2.0-":
				admitted++
			case err != nil && !isTimeout(err):
				closed++
			}
		}()
	}
	wg.Wait()
	t.Logf("1000 idle connections from 127.0.0.1: %d let in, %d waiting for a place, %d closed", admitted, 1000-admitted-closed, closed)
	if admitted == 0 || admitted > 10 {
		t.Fatalf("%d idle connections from one address let in, want at most the per-source cap of 10", admitted)
	}
	if waiting := 1000 - admitted - closed; waiting > 40 {
		t.Fatalf("%d connections held waiting, want at most four for each place", waiting)
	}
	// A person behind another address logs in and works meanwhile.
	start := time.Now()
	res := f.ssh(nil, "-o", "BindAddress=127.0.0.2", "-l", f.login+"@web1", "bastion", "echo in")
	t.Logf("a login from 127.0.0.2 during the flood took %v", time.Since(start).Round(time.Millisecond))
	if res.Exit != 0 || string(res.Stdout) != "in\n" {
		t.Fatalf("login from another address during the flood: %v %q", res, res.Stdout)
	}
	if !bytes.Contains([]byte(strings.Join(f.audit.reasons(), "\n")), []byte("too many unauthenticated connections from this source")) {
		t.Error("no audit event names the refusal")
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errorsAs(err, &ne) && ne.Timeout()
}

// TestFiftyParallelJumpsFromOneMachine: a burst of logins from one client
// machine, more than the per-source cap of unauthenticated connections at
// the front door and more than the VM's sshd starts at once, all go
// through: the front door lets them in in turn, and the upstream
// handshakes with the VM wait their turn too.
func TestFiftyParallelJumpsFromOneMachine(t *testing.T) {
	f := newFixture(t)
	allSay(t, 50, "ok\n", func(int) testenv.Result { return f.jump(nil, "echo ok") })
}

// allSay runs n at once and fails the test unless every one exits 0 with
// want on its output.
func allSay(t *testing.T, n int, want string, run func(i int) testenv.Result) {
	t.Helper()
	var wg sync.WaitGroup
	results := make([]testenv.Result, n)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = run(i)
		}()
	}
	wg.Wait()
	failed := 0
	for _, res := range results {
		if res.Exit != 0 || string(res.Stdout) != want {
			failed++
			t.Logf("failed: %v", res)
		}
	}
	if failed > 0 {
		t.Fatalf("%d of %d at once failed", failed, n)
	}
}

// TestFiftyParallelLoginsToOneVMFromManyMachines: fifty logins at once to
// one VM, from five addresses, with the front door's own MaxStartups
// raised so that it lets them all start: the VM's sshd (MaxStartups
// 10:30:100) would drop some, but the bastion starts at most
// UpstreamHandshakes at a time with it and retries one dropped before
// authentication.
func TestFiftyParallelLoginsToOneVMFromManyMachines(t *testing.T) {
	f := newFixture(t, func(s *bastion.Server) { s.MaxStartups = bastion.MaxStartups{Start: 100, Rate: 30, Full: 200} })
	allSay(t, 50, "ok\n", func(i int) testenv.Result {
		return f.ssh(nil, "-o", fmt.Sprintf("BindAddress=127.0.0.%d", 2+i%5), "-l", f.login+"@web1", "bastion", "echo ok")
	})
}

package bastion_test

import (
	"bytes"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/bastionvm/bastion/bastion"
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
	admitted := 0
	for i := 0; i < 1000; i++ {
		if _, ok := dialIdle(t, f.addr, i%2 == 1); ok {
			admitted++
		}
	}
	t.Logf("1000 idle connections from 127.0.0.1: %d let in", admitted)
	if admitted == 0 || admitted > 10 {
		t.Fatalf("%d idle connections from one address let in, want at most the per-source cap of 10", admitted)
	}
	// A person behind another address logs in and works meanwhile.
	start := time.Now()
	res := f.ssh(nil, "-o", "BindAddress=127.0.0.2", "-l", f.login+"@web1", "bastion", "echo in")
	t.Logf("a login from 127.0.0.2 during the flood took %v", time.Since(start).Round(time.Millisecond))
	if res.Exit != 0 || string(res.Stdout) != "in\n" {
		t.Fatalf("login from another address during the flood: %v %q", res, res.Stdout)
	}
	// One more from the flooding address is still refused.
	if _, ok := dialIdle(t, f.addr, false); ok {
		t.Fatal("the flooding address got past its cap")
	}
	if !bytes.Contains([]byte(strings.Join(f.audit.reasons(), "\n")), []byte("too many unauthenticated connections from this source")) {
		t.Error("no audit event names the refusal")
	}
}

package bastion_test

import (
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bastionvm/bastion/bastion"
)

// TestChannelsPerConnectionCapped: one connection cannot hold more than
// MaxChannels channels, here inner hops that never start their handshake.
func TestChannelsPerConnectionCapped(t *testing.T) {
	f := newFixture(t, func(s *bastion.Server) { s.MaxChannels = 5 })
	c := f.goClient("alice")
	var hops []io.Closer
	for i := 0; i < 5; i++ {
		hop, err := c.Dial("tcp", "web1:22")
		if err != nil {
			t.Fatalf("hop %d: %v", i+1, err)
		}
		hops = append(hops, hop)
	}
	if _, err := c.Dial("tcp", "web1:22"); err == nil || !strings.Contains(err.Error(), "too many channels") {
		t.Fatalf("a sixth hop: %v, want it refused", err)
	}
	hops[0].Close()
	waitFor(t, func() bool {
		hop, err := c.Dial("tcp", "web1:22")
		if err == nil {
			hop.Close()
		}
		return err == nil
	}, func() string { return "a closed hop did not give back its place" })
}

// TestInnerHopHandshakeHasADeadline: an inner hop whose client never
// speaks is closed once the connect and request timeouts have passed.
func TestInnerHopHandshakeHasADeadline(t *testing.T) {
	f := newFixture(t, func(s *bastion.Server) {
		s.ConnectTimeout = 500 * time.Millisecond
		s.RequestTimeout = 500 * time.Millisecond
	})
	hop, err := f.goClient("alice").Dial("tcp", "web1:22")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		io.Copy(io.Discard, hop) // the bastion's version line, then EOF when it gives up
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("a silent inner hop was still open after 30s")
	}
}

// TestLinksBeingSetUpPerAccountCapped: an account cannot have more than
// MaxPending links to VMs being verified at once; the one past the cap is
// told to try again, the others go through.
func TestLinksBeingSetUpPerAccountCapped(t *testing.T) {
	f := newFixture(t, func(s *bastion.Server) { s.MaxPending = 2 })
	f.fleet.SetDelay(3 * time.Second)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var ok, busy int
	for i := 0; i < 3; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res := f.jump(nil, "true")
			mu.Lock()
			defer mu.Unlock()
			switch {
			case res.Exit == 0:
				ok++
			case strings.Contains(res.Stderr, "too many connections to VMs are being set up"):
				busy++
			default:
				t.Errorf("neither through nor told to try again: %v", res)
			}
		}()
	}
	wg.Wait()
	if ok != 2 || busy != 1 {
		t.Fatalf("%d through, %d told to try again; want 2 and 1", ok, busy)
	}
}

// TestRemoteForwardsCapped: a connection holds at most 64 remote forwards
// (ports and sockets together); one closed gives its place back.
func TestRemoteForwardsCapped(t *testing.T) {
	f := newFixture(t)
	c := f.goClient(f.login + "@web1")
	var held []io.Closer
	for i := range 64 {
		ln, err := c.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("remote forward %d: %v", i+1, err)
		}
		held = append(held, ln)
	}
	if ln, err := c.Listen("tcp", "127.0.0.1:0"); err == nil {
		ln.Close()
		t.Fatal("a 65th remote forward was granted")
	}
	held[0].Close()
	waitFor(t, func() bool {
		ln, err := c.Listen("tcp", "127.0.0.1:0")
		if err == nil {
			held[0] = ln
		}
		return err == nil
	}, func() string { return "a cancelled forward did not give back its place" })
	for _, ln := range held {
		ln.Close()
	}
}

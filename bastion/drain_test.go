package bastion_test

import (
	"context"
	"errors"
	"io"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bastionvm/bastion/bastion"
)

func TestShutdownDrains(t *testing.T) {
	f := newFixture(t)
	type outcome struct {
		out  string
		exit int
	}
	session := make(chan outcome, 1)
	marker := t.TempDir() + "/started"
	go func() {
		res := f.client.Run(nil, "ssh", "-J", "bastion", f.login+"@web1", "touch "+marker+"; sleep 2; echo finished")
		session <- outcome{string(res.Stdout), res.Exit}
	}()
	waitFor(t, func() bool { return fileExists(marker) }, func() string { return "the session never started" })

	drained := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		drained <- f.srv.Shutdown(ctx)
	}()
	time.Sleep(100 * time.Millisecond)
	// No new connections while draining.
	if res := f.jump(nil, "true"); res.Exit != 255 || !strings.Contains(res.Stderr, "Connection refused") {
		t.Errorf("a new connection while draining: %v", res)
	}
	got := <-session
	if got.exit != 0 || got.out != "finished\n" {
		t.Fatalf("the open session was cut: exit %d, output %q", got.exit, got.out)
	}
	if err := <-drained; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

func TestShutdownGracePeriodEnds(t *testing.T) {
	f := newFixture(t)
	session := make(chan int, 1)
	marker := t.TempDir() + "/started"
	go func() {
		session <- f.client.Run(nil, "ssh", "-J", "bastion", f.login+"@web1", "touch "+marker+"; sleep 60").Exit
	}()
	waitFor(t, func() bool { return fileExists(marker) }, func() string { return "the session never started" })
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	if err := f.srv.Shutdown(ctx); err == nil {
		t.Fatal("Shutdown reported a clean drain with a session still open")
	}
	select {
	case exit := <-session:
		if exit != 255 {
			t.Fatalf("session ended with %d, want 255 (connection closed)", exit)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the session outlived the grace period")
	}
}

// TestKeepaliveClosesASilentClient stops a client (SIGSTOP) in the middle
// of a session: after three unanswered keepalives the bastion closes the
// connection, and the client, resumed, finds it gone well before its
// command would have ended.
func TestKeepaliveClosesASilentClient(t *testing.T) {
	f := newFixture(t, func(s *bastion.Server) {
		s.KeepAlive = 200 * time.Millisecond
		s.RequestTimeout = 200 * time.Millisecond
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := f.client.Command(ctx, "ssh", "-o", "ServerAliveInterval=0", f.login+"@web1@bastion", "echo started; sleep 30")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line := make([]byte, 8)
	if _, err := io.ReadFull(out, line); err != nil || string(line) != "started\n" {
		t.Fatalf("session did not start: %q %v", line, err)
	}
	cmd.Process.Signal(syscall.SIGSTOP)
	time.Sleep(2 * time.Second) // three probes of 200 ms, each waiting 200 ms
	cmd.Process.Signal(syscall.SIGCONT)
	io.Copy(io.Discard, out)
	err = cmd.Wait()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 255 {
		t.Fatalf("ssh ended with %v; want exit 255 (connection closed by the bastion)", err)
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("ssh took %v: the silent connection was not closed", d)
	}
}

package bastion_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/internal/testenv"
)

// of returns the events of type t, in the order emitted.
func (a *auditLog) of(t audit.Type) []audit.Event {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []audit.Event
	for _, e := range a.events {
		if e.Type == t {
			out = append(out, e)
		}
	}
	return out
}

// TestAuditPerChannel: an exec through ProxyJump with OpenSSH's ssh, with
// a pty and an environment variable, and a -W forward to the VM's sshd.
// The trail has session_start and session_end with the command, the pty,
// the variable's name, the exit status and the bytes, and forward_start
// and forward_end with the destination and the bytes; every event of a
// connection carries its login's session id, and disconnected its totals.
func TestAuditPerChannel(t *testing.T) {
	f := newFixture(t)
	res := f.ssh(nil, "-tt", "-o", "SetEnv=LC_PROBE=x", "-J", "bastion", f.login+"@web1", "printf hello; exit 3")
	if res.Exit != 3 || !strings.Contains(string(res.Stdout), "hello") {
		t.Fatalf("exec: %v", res)
	}
	f.audit.wait(t, audit.SessionEnd, "web1", 1)
	f.audit.wait(t, audit.Disconnected, "web1", 1)
	start, end := f.audit.of(audit.SessionStart)[0], f.audit.of(audit.SessionEnd)[0]
	login := f.audit.of(audit.Login)[0]
	if login.Session == "" || start.Session != login.Session || end.Session != login.Session {
		t.Fatalf("session ids: login %q, start %q, end %q", login.Session, start.Session, end.Session)
	}
	s := start.Activity
	if s == nil || s.Kind != "exec" || s.Command != "printf hello; exit 3" || s.ChannelID == 0 || s.Term == "" || !slices.Contains(s.Env, "LC_PROBE") {
		t.Fatalf("session_start: %+v", s)
	}
	e := end.Activity
	if e == nil || e.ChannelID != s.ChannelID || e.ExitStatus == nil || *e.ExitStatus != 3 || e.BytesDown < int64(len("hello")) || e.Seconds <= 0 {
		t.Fatalf("session_end: %+v", e)
	}
	d := f.audit.of(audit.Disconnected)[0]
	if d.Session != login.Session || d.Activity == nil || d.BytesDown != e.BytesDown || d.Seconds <= 0 {
		t.Fatalf("disconnected: %+v %+v", d, d.Activity)
	}

	// -W to the VM's own sshd: its banner comes back, nothing goes.
	host, port, _ := net.SplitHostPort(f.vm.Addr)
	res = f.ssh(nil, "-J", "bastion", "-W", f.vm.Addr, f.login+"@web1")
	if !strings.HasPrefix(string(res.Stdout), "SSH-2.0-") {
		t.Fatalf("-W: %v", res)
	}
	f.audit.wait(t, audit.ForwardEnd, "web1", 1)
	fs, fe := f.audit.of(audit.ForwardStart), f.audit.of(audit.ForwardEnd)
	if len(fs) != 1 || fs[0].Activity == nil || fs[0].Kind != "direct-tcpip" || fs[0].Host != host || port != strconv.Itoa(int(fs[0].Port)) {
		t.Fatalf("forward_start: %+v %+v (want %s %s)", fs, fs[0].Activity, host, port)
	}
	// What the client printed is what the sshd sent: its banner, and its
	// key exchange offer without waiting for ours.
	if fe[0].Session == login.Session || fe[0].Session != fs[0].Session || fe[0].BytesDown != int64(len(res.Stdout)) || fe[0].BytesUp != 0 {
		t.Fatalf("forward_end: %+v %+v (stdout %d bytes)", fe[0], fe[0].Activity, len(res.Stdout))
	}
}

// TestAuditOwnCommand: `ssh bastion hello world` runs one of the
// bastion's own commands, between a session_start and a session_end that
// name no VM and carry the exit status and the bytes of its output.
func TestAuditOwnCommand(t *testing.T) {
	f := newFixture(t, func(s *bastion.Server) {
		s.Commands = map[string]bastion.CommandFunc{"hello": func(_ context.Context, _ bastion.Account, _ net.Addr, args []string, out io.Writer) int {
			fmt.Fprintf(out, "hi %s\n", strings.Join(args, ","))
			return 4
		}}
	})
	res := f.ssh(nil, "bastion", "hello world")
	if res.Exit != 4 || string(res.Stdout) != "hi world\n" {
		t.Fatalf("ssh bastion hello world: %v %q", res, res.Stdout)
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(f.audit.of(audit.SessionEnd)) == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	starts, ends := f.audit.of(audit.SessionStart), f.audit.of(audit.SessionEnd)
	if len(starts) != 1 || len(ends) != 1 {
		t.Fatalf("%d session_start, %d session_end", len(starts), len(ends))
	}
	s, e := starts[0], ends[0]
	if s.Channel != "command" || s.VM != "" || s.Kind != "exec" || s.Command != "hello world" || s.Account != "alice" || s.Session == "" {
		t.Fatalf("session_start: %+v %+v", s, s.Activity)
	}
	if e.ExitStatus == nil || *e.ExitStatus != 4 || e.BytesDown != int64(len("hi world\n")) || e.Session != s.Session {
		t.Fatalf("session_end: %+v", e.Activity)
	}
}

// fullDisk stands for the audit file's disk: while full is set, every
// write fails as one on a full file system does.
type fullDisk struct {
	full    atomic.Bool
	written atomic.Int64
}

func (d *fullDisk) Write(p []byte) (int, error) {
	if d.full.Load() {
		return 0, syscall.ENOSPC
	}
	d.written.Add(int64(len(p)))
	return len(p), nil
}

// TestAuditRequired: with AuditRequired, while the trail cannot be
// written, OpenSSH's ssh is refused with the reason on both entry paths
// (ProxyJump and login@vm@bastion), a session already open runs on to its
// end, and once the disk takes writes again the next login works.
func TestAuditRequired(t *testing.T) {
	disk := &fullDisk{}
	f := newFixture(t, func(s *bastion.Server) {
		trail, seen := audit.NewWriter(disk), s.Audit
		s.Audit = func(e audit.Event) { seen(e); trail.Emit(e) }
		s.AuditRequired = trail.Err
	})
	if res := f.jump(nil, "echo before"); res.Exit != 0 || string(res.Stdout) != "before\n" {
		t.Fatalf("before the disk filled: %v %q", res, res.Stdout)
	}

	// A session open when the disk fills goes on.
	open := make(chan testenv.Result, 1)
	go func() { open <- f.jump(nil, "echo started; sleep 2; echo still") }()
	f.audit.wait(t, audit.SessionStart, "web1", 2)
	disk.full.Store(true)

	const refusal = "bastion: the audit trail cannot be written, so no session may start; tell the bastion's operators"
	for _, args := range [][]string{
		{"-J", "bastion", f.login + "@web1", "echo during"},
		{"-l", f.login + "@web1", "bastion", "echo during"},
	} {
		res := f.ssh(nil, args...)
		if res.Exit != 255 || len(res.Stdout) != 0 || !strings.Contains(string(res.Stderr), refusal) {
			t.Fatalf("ssh %s while the trail cannot be written: %v %q", strings.Join(args, " "), res, res.Stdout)
		}
	}
	if res := <-open; res.Exit != 0 || string(res.Stdout) != "started\nstill\n" {
		t.Fatalf("the session open when the disk filled: %v %q", res, res.Stdout)
	}

	disk.full.Store(false)
	before := disk.written.Load()
	if res := f.jump(nil, "echo after"); res.Exit != 0 || string(res.Stdout) != "after\n" {
		t.Fatalf("after the disk had room again: %v %q", res, res.Stdout)
	}
	if disk.written.Load() == before {
		t.Fatal("nothing was written to the trail after the disk had room again")
	}
}

package bastion_test

import (
	"net"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/bastionvm/bastion/bastion/audit"
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

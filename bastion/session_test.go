package bastion_test

import (
	"bytes"
	"slices"
	"strings"
	"testing"

	"github.com/bastionvm/bastion/bastion/audit"
)

func TestExitStatusThroughJump(t *testing.T) {
	f := newFixture(t)
	res := f.jump(nil, "exit 42")
	if res.Exit != 42 {
		t.Fatalf("ssh -J … 'exit 42': got %v, want exit 42", res)
	}
	res = f.jump(nil, "echo out; echo err >&2")
	if res.Exit != 0 || string(res.Stdout) != "out\n" || !strings.Contains(res.Stderr, "err\n") {
		t.Fatalf("got %v stdout %q", res, res.Stdout)
	}
}

func TestExitStatusTargetInUserName(t *testing.T) {
	f := newFixture(t)
	res := f.ssh(nil, "-l", f.login+"@web1", "bastion", "echo hello; exit 7")
	if res.Exit != 7 || string(res.Stdout) != "hello\n" {
		t.Fatalf("ssh login@web1@bastion: got %v stdout %q, want exit 7 and hello", res, res.Stdout)
	}
}

func TestStdinToEOF(t *testing.T) {
	f := newFixture(t)
	var in bytes.Buffer
	var lines []string
	for i := 0; i < 50000; i++ {
		line := strings.Repeat("x", i%17) + string(rune('a'+i%26))
		lines = append(lines, line)
		in.WriteString(line + "\n")
	}
	slices.Sort(lines)
	want := strings.Join(lines, "\n") + "\n"
	res := f.jump(in.Bytes(), "LC_ALL=C sort")
	if res.Exit != 0 {
		t.Fatalf("sort: %v", res)
	}
	if string(res.Stdout) != want {
		t.Fatalf("sort through the bastion: got %d bytes, want %d", len(res.Stdout), len(want))
	}
}

// TestDisconnectedOnEveryPath: every link that connected is audited as
// disconnected when it ends, whether it came through ProxyJump, a
// login@vm user name, or the menu (TestMenuConnectsToPickedVM).
func TestDisconnectedOnEveryPath(t *testing.T) {
	f := newFixture(t)
	if res := f.jump(nil, "true"); res.Exit != 0 {
		t.Fatalf("ssh -J: %v", res)
	}
	f.audit.wait(t, audit.Disconnected, "web1", 1)
	if res := f.ssh(nil, "-l", f.login+"@web1", "bastion", "true"); res.Exit != 0 {
		t.Fatalf("ssh login@web1@bastion: %v", res)
	}
	f.audit.wait(t, audit.Disconnected, "web1", 2)
	if c, d := f.audit.count(audit.Connected, "web1"), f.audit.count(audit.Disconnected, "web1"); c != 2 || d != 2 {
		t.Fatalf("%d connected and %d disconnected events, want 2 of each", c, d)
	}
}

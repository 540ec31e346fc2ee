package bastion_test

import (
	"bytes"
	"slices"
	"strings"
	"testing"
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

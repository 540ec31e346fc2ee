package bastion_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/internal/testenv"
	"github.com/bastionvm/bastion/policy"
)

// recordTo makes a fixture's bastion record into dir, capping each
// recording at max bytes (0: the default).
func recordTo(dir string, max int64) func(*bastion.Server) {
	return func(s *bastion.Server) { s.Recordings, s.RecordingMaxBytes = dir, max }
}

// castEvents reads a recording: its header and its events.
func castEvents(t *testing.T, path string) (map[string]any, [][3]any) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	s.Buffer(nil, 4<<20)
	var head map[string]any
	var evs [][3]any
	for s.Scan() {
		if head == nil {
			if err := json.Unmarshal(s.Bytes(), &head); err != nil {
				t.Fatalf("cast header %q: %v", s.Text(), err)
			}
			continue
		}
		var ev [3]any
		if err := json.Unmarshal(s.Bytes(), &ev); err != nil {
			t.Fatalf("cast event %q: %v", s.Text(), err)
		}
		evs = append(evs, ev)
	}
	return head, evs
}

// of joins the data of the cast's events with code.
func of(evs [][3]any, code string) string {
	var b strings.Builder
	for _, ev := range evs {
		if ev[1] == code {
			b.WriteString(ev[2].(string))
		}
	}
	return b.String()
}

// sealed checks the recording session_end names: there, read-only, with
// the SHA-256 the event gives; it returns the file's path.
func sealed(t *testing.T, dir string, end audit.Event) string {
	t.Helper()
	if end.Activity == nil || end.Recording == "" {
		t.Fatalf("session_end names no recording: %+v", end.Activity)
	}
	path := filepath.Join(dir, end.Recording+".cast")
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if sum := sha256.Sum256(data); hex.EncodeToString(sum[:]) != end.RecordingSHA256 {
		t.Fatalf("session_end says sha256 %s; the file's is %x", end.RecordingSHA256, sum)
	}
	if info, _ := os.Stat(path); info.Mode().Perm() != 0o400 {
		t.Fatalf("the sealed recording's mode is %v", info.Mode())
	}
	return path
}

// TestRecordingShell: a shell through ProxyJump with OpenSSH's ssh on a
// terminal, under a rule that records input: a command typed, the
// terminal resized, exit. The cast holds the typed line, the command's
// output and the new size, ends with the exit status, and Debian's
// asciinema plays it back.
func TestRecordingShell(t *testing.T) {
	dir := t.TempDir()
	f := newFixture(t, recordTo(dir, 0))
	rule := f.devRule()
	rule.Record = "input"
	f.rules(rule)

	p, err := testenv.OpenPty(24, 80)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := f.client.Command(ctx, "ssh", "-tt", "-J", "bastion", f.login+"@web1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = p.Slave, p.Slave, p.Slave
	cmd.SysProcAttr = p.Attr()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p.Slave.Close()
	screen := watchScreen(p)
	p.Master.Write([]byte("echo sum=$((40+2))\r"))
	screen.wait(t, "sum=42")
	p.Resize(30, 100)
	p.Master.Write([]byte("stty size\r"))
	screen.wait(t, "30 100")
	p.Master.Write([]byte("exit 4\r"))
	if err := cmd.Wait(); cmd.ProcessState.ExitCode() != 4 {
		t.Fatalf("ssh: %v", err)
	}

	f.audit.wait(t, audit.SessionEnd, "web1", 1)
	path := sealed(t, dir, f.audit.of(audit.SessionEnd)[0])
	head, evs := castEvents(t, path)
	if head["version"] != 2.0 || head["width"] != 80.0 || head["height"] != 24.0 {
		t.Fatalf("cast header: %v", head)
	}
	if out := of(evs, "o"); !strings.Contains(out, "sum=42") || !strings.Contains(out, "30 100") {
		t.Fatalf("the cast's output lacks the commands' output:\n%q", out)
	}
	if in := of(evs, "i"); !strings.Contains(in, "echo sum=$((40+2))") || !strings.Contains(in, "exit 4") {
		t.Fatalf("the cast's input lacks the typed line: %q", in)
	}
	if r := of(evs, "r"); r != "100x30" {
		t.Fatalf("resize events: %q", r)
	}
	if last := evs[len(evs)-1]; last[1] != "m" || last[2] != "exit status 4" {
		t.Fatalf("the last event: %v", last)
	}

	// Debian's asciinema reads it back (with no terminal of its own, it
	// plays to stdout).
	asciinema, err := exec.LookPath("asciinema")
	if err != nil {
		t.Fatalf("asciinema is not installed (testbed/install-host.sh installs it): %v", err)
	}
	play := exec.Command("setsid", asciinema, "play", "-s", "100", "-i", "0.1", path)
	out, err := play.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "sum=42") {
		t.Fatalf("asciinema play: %v\n%s", err, out)
	}
}

// screen follows what a terminal shows.
type screen struct {
	updates chan string
	last    string
}

func watchScreen(p *testenv.Pty) *screen {
	s := &screen{updates: make(chan string, 4096)}
	go func() {
		var sb strings.Builder
		buf := make([]byte, 4096)
		for {
			n, err := p.Master.Read(buf)
			if err != nil {
				close(s.updates)
				return
			}
			sb.Write(buf[:n])
			s.updates <- sb.String()
		}
	}()
	return s
}

func (s *screen) wait(t *testing.T, want string) {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for !strings.Contains(s.last, want) {
		select {
		case u, ok := <-s.updates:
			if !ok {
				t.Fatalf("terminal closed before %q; the screen:\n%s", want, s.last)
			}
			s.last = u
		case <-timeout:
			t.Fatalf("never saw %q; the screen:\n%s", want, s.last)
		}
	}
}

// TestRecordingCapped: 100 MiB written to a terminal all reach the user,
// and the recording stops at its cap with a marker: the session goes on
// to its exit status.
func TestRecordingCapped(t *testing.T) {
	dir := t.TempDir()
	const max = 1 << 20
	f := newFixture(t, recordTo(dir, max))
	res := f.jump(nil, "-tt", "head -c 104857600 /dev/zero | tr '\\0' a; echo; echo done")
	if res.Exit != 0 || strings.Count(string(res.Stdout), "a") != 100<<20 || !strings.Contains(string(res.Stdout), "done") {
		t.Fatalf("ssh -tt: %v, %d bytes of output", res.Exit, len(res.Stdout))
	}
	f.audit.wait(t, audit.SessionEnd, "web1", 1)
	end := f.audit.of(audit.SessionEnd)[0]
	path := sealed(t, dir, end)
	if !end.RecordingCapped || end.BytesDown < 100<<20 {
		t.Fatalf("session_end: %+v", end.Activity)
	}
	if info, _ := os.Stat(path); info.Size() > max+max/2 {
		t.Fatalf("the capped recording is %d bytes", info.Size())
	}
	_, evs := castEvents(t, path)
	if out := of(evs, "o"); len(out) != max {
		t.Fatalf("the cast holds %d bytes of output, want the cap, %d", len(out), max)
	}
	if m := of(evs, "m"); !strings.Contains(m, "recording stopped") || !strings.HasSuffix(m, "exit status 0") {
		t.Fatalf("markers: %q", m)
	}
}

// TestRecordingUnwritable: with the recordings directory gone, a session
// with a terminal is refused with the reason, on ProxyJump and on
// login@vm@bastion, and nothing reaches the VM; exec without a terminal
// is not recorded, so it runs. With record = "none" the terminal runs too.
func TestRecordingUnwritable(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "gone")
	f := newFixture(t, recordTo(dir, 0))
	const refusal = "bastion: this session must be recorded, and the recording cannot be written, so it may not start; tell the bastion's operators"
	for _, args := range [][]string{
		{"-tt", "-J", "bastion", f.login + "@web1", "echo ran"},
		{"-tt", "-l", f.login + "@web1", "bastion", "echo ran"},
	} {
		res := f.ssh(nil, args...)
		if res.Exit != 255 || strings.Contains(string(res.Stdout), "ran") || !strings.Contains(string(res.Stdout)+string(res.Stderr), refusal) {
			t.Fatalf("ssh %s: %v %q", strings.Join(args, " "), res, res.Stdout)
		}
	}
	denied := f.audit.of(audit.Denied)
	if len(denied) != 2 || !strings.HasPrefix(denied[0].Reason, "the recording cannot be written: ") {
		t.Fatalf("denied events: %+v", denied)
	}
	if res := f.jump(nil, "echo ran"); res.Exit != 0 || string(res.Stdout) != "ran\n" {
		t.Fatalf("exec without a terminal: %v %q", res, res.Stdout)
	}
	rule := f.devRule()
	rule.Record = "none"
	f.rules(rule)
	if res := f.jump(nil, "-tt", "echo ran"); res.Exit != 0 || !strings.Contains(string(res.Stdout), "ran") {
		t.Fatalf("a terminal under record = none: %v %q", res, res.Stdout)
	}
}

// TestRecordingExec: record_exec records a command without a terminal;
// its cast has the output and the exit status.
func TestRecordingExec(t *testing.T) {
	dir := t.TempDir()
	f := newFixture(t, recordTo(dir, 0))
	rule := f.devRule()
	rule.RecordExec = true
	f.rules(rule, policy.Rule{Name: "other", Effect: policy.Allow, Groups: []string{"ops"}, VMs: []string{"*"}, Logins: []string{"*"}})
	if res := f.jump(nil, "echo out; echo err >&2; exit 2"); res.Exit != 2 {
		t.Fatalf("exec: %v", res)
	}
	f.audit.wait(t, audit.SessionEnd, "web1", 1)
	_, evs := castEvents(t, sealed(t, dir, f.audit.of(audit.SessionEnd)[0]))
	if out := of(evs, "o"); !strings.Contains(out, "out\n") || !strings.Contains(out, "err\n") || of(evs, "m") != "exit status 2" {
		t.Fatalf("the exec's cast: %v", evs)
	}
}

package vmtest

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bastionvm/bastion/internal/testenv"
)

// bgSession is an ssh through the bastion running in the background, with
// its stdin open for the test to steer it.
type bgSession struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan string // stdout, line by line
	stderr *testenv.LockedBuffer
	done   chan struct{}
}

// start runs ssh -J bastion target script in the background and waits for
// its first line of output, which must be "started".
func (b *bastionProc) start(target, script string) *bgSession {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	b.t.Cleanup(cancel)
	s := &bgSession{cmd: b.client.Command(ctx, "ssh", "-J", "bastion", target, script), lines: make(chan string, 100),
		stderr: &testenv.LockedBuffer{}, done: make(chan struct{})}
	s.cmd.Stderr = s.stderr
	s.stdin, _ = s.cmd.StdinPipe()
	out, _ := s.cmd.StdoutPipe()
	if err := s.cmd.Start(); err != nil {
		b.t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			s.lines <- sc.Text()
		}
		s.cmd.Wait()
		close(s.done)
	}()
	s.expect(b.t, "started")
	return s
}

// expect waits for the session's next line of output to be want.
func (s *bgSession) expect(t *testing.T, want string) {
	t.Helper()
	select {
	case line := <-s.lines:
		if line != want {
			t.Fatalf("session printed %q, want %q; stderr %s", line, want, s.stderr.String())
		}
	case <-s.done:
		t.Fatalf("session ended before printing %q: stderr %s", want, s.stderr.String())
	case <-time.After(2 * time.Minute):
		t.Fatalf("session did not print %q: stderr %s", want, s.stderr.String())
	}
}

// ended waits for the session to end and returns its exit code.
func (s *bgSession) ended(t *testing.T, within time.Duration) int {
	t.Helper()
	select {
	case <-s.done:
		return s.cmd.ProcessState.ExitCode()
	case <-time.After(within):
		t.Fatalf("the session did not end within %v; stderr %s", within, s.stderr.String())
		return 0
	}
}

// TestLibvirtdRestart: libvirtd restarted under a running bastion. The
// open session goes on; logins while libvirtd is away fail saying so; the
// first login once it answers again, one that needs a new check through a
// guest agent libvirt is only now reconnecting to, works without the
// bastion being restarted; and the trusts verified before the outage are
// verified again, since the events of the outage went unheard.
func TestLibvirtdRestart(t *testing.T) {
	b := startBastion(t, "")
	s := b.start("root@"+web1, "echo started; read line; echo still here")
	before := len(b.auditEvents("trust_verified"))

	stopLibvirtd(t)
	refused(t, b, "user@"+web1, "hypervisor is unreachable")
	startLibvirtd(t)

	if res := b.ssh(nil, "user@"+web1, "echo after"); res.Exit != 0 || string(res.Stdout) != "after\n" {
		t.Fatalf("the first login after libvirtd came back: %v %q", res, res.Stdout)
	}
	if res := b.ssh(nil, "root@"+web1, "echo root after"); res.Exit != 0 || string(res.Stdout) != "root after\n" {
		t.Fatalf("root's login after libvirtd came back: %v %q", res, res.Stdout)
	}
	io.WriteString(s.stdin, "go on\n")
	s.expect(t, "still here")
	if code := s.ended(t, time.Minute); code != 0 {
		t.Fatalf("the session open across the restart: exit %d, stderr %s", code, s.stderr.String())
	}
	if got := len(b.auditEvents("trust_verified")) - before; got != 2 {
		t.Errorf("%d checks after the restart, want 2 (user's new trust, root's verified again)", got)
	}
	if !strings.Contains(b.stderr.String(), "hypervisor reconnected") {
		t.Errorf("the bastion did not log its reconnection:\n%s", b.stderr.String())
	}
}

// stopLibvirtd stops libvirtd and waits for it to be gone; the test's end
// starts it again whatever happened.
func stopLibvirtd(t *testing.T) {
	t.Helper()
	t.Cleanup(func() { startLibvirtd(t) })
	data, err := os.ReadFile("/run/libvirtd.pid")
	if err != nil {
		t.Fatalf("libvirtd's pid file: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		t.Fatalf("libvirtd's pid file: %q", data)
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		t.Fatalf("stopping libvirtd: %v", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for syscall.Kill(pid, 0) == nil {
		if time.Now().After(deadline) {
			t.Fatal("libvirtd did not stop")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// startLibvirtd starts libvirtd as the test bed does and waits until it
// answers, returning at once: the login that follows comes while libvirt
// is still reconnecting to the guests.
func startLibvirtd(t *testing.T) {
	t.Helper()
	if exec.Command("virsh", "-q", "-c", "qemu:///system", "version").Run() == nil {
		return
	}
	if out, err := exec.Command("libvirtd", "-d").CombinedOutput(); err != nil {
		t.Fatalf("libvirtd -d: %v\n%s", err, out)
	}
	waitFor(t, func() bool { return exec.Command("virsh", "-q", "-c", "qemu:///system", "version").Run() == nil }, "libvirtd to answer")
}

// TestKilledBastionRestarts: the bastion killed with SIGKILL leaves nothing
// that stops it starting again on the same state directory and address;
// the next login works, and the key of the killed bastion's epoch, which
// carries its expiry in the guest, is removed at that login's check.
func TestKilledBastionRestarts(t *testing.T) {
	b := startBastion(t, "")
	if res := b.ssh(nil, "root@"+web1, "true"); res.Exit != 0 {
		t.Fatalf("before the kill: %v", res)
	}
	old := bastionKeys(t, web1, "root")
	if len(old) != 1 {
		t.Fatalf("the guest holds %d keys of the bastion, want 1: %q", len(old), old)
	}
	if !regexp.MustCompile(`^expiry-time="\d{14}Z" `).MatchString(old[0]) {
		t.Fatalf("the bastion's key has no expiry: %q", old[0])
	}
	b.proc.Kill()
	b.proc.Wait()
	// The same address, which a supervisor's restart would use too.
	write(t, b.config, strings.Replace(b.base, `listen = "127.0.0.1:0"`, `listen = "`+b.addr+`"`, 1)+defaultRule)
	b.launch()
	if res := b.ssh(nil, "root@"+web1, "echo again"); res.Exit != 0 || string(res.Stdout) != "again\n" {
		t.Fatalf("the first login after the restart: %v %q", res, res.Stdout)
	}
	now := bastionKeys(t, web1, "root")
	if len(now) != 1 || now[0] == old[0] {
		t.Fatalf("after the restart the guest holds %q; want only the new epoch's key (the old was %q)", now, old[0])
	}
}

// bastionKeys lists the authorized_keys lines of any bastion in login's
// file on guest.
func bastionKeys(t *testing.T, guest, login string) []string {
	t.Helper()
	var out []string
	for _, line := range strings.Split(virsh(t, "get-user-sshkeys", guest, login), "\n") {
		if strings.Contains(line, " bastion:") {
			out = append(out, strings.TrimSpace(line))
		}
	}
	return out
}

// TestStateDiskFull: the state directory on a file system that fills up.
// The state file stays whole (the last that could be written), the log
// says what failed, and the bastion goes on serving; once there is room
// again the next change is recorded.
func TestStateDiskFull(t *testing.T) {
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", mnt).Run() })
	b := newBastionProc(t, filepath.Join(mnt, "state"), defaultRule)
	b.launch()
	if res := b.ssh(nil, "root@"+web1, "true"); res.Exit != 0 {
		t.Fatalf("before the disk filled: %v", res)
	}
	statePath := filepath.Join(mnt, "state", "trust.json")
	waitFor(t, func() bool { return len(readState(t, statePath)) == 1 }, "the first trust in the state file")

	// Fill the file system.
	fill, err := os.Create(filepath.Join(mnt, "fill"))
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	for {
		if _, err := fill.Write(buf); err != nil {
			break
		}
	}
	fill.Close()

	if res := b.ssh(nil, "user@"+web1, "echo served"); res.Exit != 0 || string(res.Stdout) != "served\n" {
		t.Fatalf("a login on a full disk: %v %q", res, res.Stdout)
	}
	waitFor(t, func() bool { return strings.Contains(b.stderr.String(), "no space left on device") }, "the log naming the full disk")
	if got := readState(t, statePath); len(got) != 1 || got[0]["login"] != "root" {
		t.Fatalf("the state file on a full disk: %v; want the last whole one (root's trust)", got)
	}
	entries, _ := os.ReadDir(filepath.Join(mnt, "state"))
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp") {
			t.Errorf("a temporary file left behind: %s", e.Name())
		}
	}

	// Once there is room, the state file catches up by itself.
	os.Remove(filepath.Join(mnt, "fill"))
	waitFor(t, func() bool { return len(readState(t, statePath)) == 2 }, "the state file to catch up")
	if out := b.trustLs(); !strings.Contains(out, "user") || !strings.Contains(out, "root") {
		t.Fatalf("trust ls once there was room:\n%s", out)
	}
}

// readState reads the trust state file as JSON records; it fails the test
// if the file is not whole.
func readState(t *testing.T, path string) []map[string]any {
	t.Helper()
	data, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var records []map[string]any
	if err := json.Unmarshal(data, &records); err != nil {
		t.Fatalf("the state file is not whole: %v\n%s", err, data)
	}
	return records
}

// waitFor polls cond for up to 90 seconds.
func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

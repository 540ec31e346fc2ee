package bastion_test

import (
	"bufio"
	"context"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/internal/testenv"
	"github.com/bastionvm/bastion/policy"
)

// session is an ssh command running in the background.
type session struct {
	cmd    *exec.Cmd
	stdout *testenv.LockedBuffer // what follows "started"
	stderr *testenv.LockedBuffer
	done   chan error
}

// startSession starts `ssh args...` and waits until its first line of
// output is "started".
func (f *fixture) startSession(t *testing.T, args ...string) *session {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	s := &session{cmd: f.client.Command(ctx, "ssh", args...), stdout: &testenv.LockedBuffer{}, stderr: &testenv.LockedBuffer{}, done: make(chan error, 1)}
	s.cmd.Stderr = s.stderr
	out, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(out)
	line, err := r.ReadString('\n')
	if err != nil || line != "started\n" {
		t.Fatalf("the session did not start: %q %v; stderr %s", line, err, s.stderr.String())
	}
	go func() {
		io.Copy(s.stdout, r)
		s.done <- s.cmd.Wait()
	}()
	return s
}

// ended waits for the session to end and returns its exit code.
func (s *session) ended(t *testing.T) int {
	t.Helper()
	select {
	case <-s.done:
		return s.cmd.ProcessState.ExitCode()
	case <-time.After(30 * time.Second):
		t.Fatalf("the session did not end; stderr %s", s.stderr.String())
		return 0
	}
}

func TestReloadEndsConnectionsOfARemovedKey(t *testing.T) {
	for _, tc := range []struct {
		name     string
		accounts func(f *fixture) []bastion.Account
		reason   string
	}{
		{"account removed", func(f *fixture) []bastion.Account { return nil }, "the key it logged in with was removed"},
		{"key moved to another account", func(f *fixture) []bastion.Account {
			return []bastion.Account{{Name: "mallory", Groups: []string{"dev"}, Keys: []gossh.PublicKey{f.client.PublicKey}}}
		}, `the key it logged in with now belongs to account "mallory"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			jump := f.startSession(t, "-J", "bastion", f.login+"@web1", "echo started; sleep 60")
			named := f.startSession(t, f.login+"@web1@bastion", "echo started; sleep 60")
			// A ControlMaster connection to the bastion with no session:
			// what ControlPersist leaves behind to open new hops later.
			sock := filepath.Join(t.TempDir(), "cm")
			master := f.client.Command(context.Background(), "ssh", "-o", "ControlMaster=yes", "-o", "ControlPath="+sock, "-N", "bastion")
			if err := master.Start(); err != nil {
				t.Fatal(err)
			}
			masterDone := make(chan error, 1)
			go func() { masterDone <- master.Wait() }()
			waitFor(t, func() bool { _, err := os.Stat(sock); return err == nil }, func() string { return "the master never listened" })

			f.setAccounts(tc.accounts(f)...)
			f.srv.Revalidate()

			for name, s := range map[string]*session{"ssh -J": jump, "ssh login@vm@bastion": named} {
				if code := s.ended(t); code != 255 || !strings.Contains(s.stderr.String(), "bastion: access ended: "+tc.reason) {
					t.Errorf("%s: exit %d, stderr %q; want 255 and the reason", name, code, s.stderr.String())
				}
			}
			select {
			case <-masterDone:
			case <-time.After(30 * time.Second):
				t.Fatal("the ControlMaster connection was not closed")
			}
			// Nothing new through the old master's path: it is gone.
			res := f.ssh(nil, "-o", "ControlPath="+sock, "-o", "ControlMaster=no", "-J", "bastion", f.login+"@web1", "echo reached")
			if res.Exit == 0 || strings.Contains(string(res.Stdout), "reached") {
				t.Fatalf("a new hop after the reload: %v %q", res, res.Stdout)
			}
			if _, ok := f.audit.find(audit.Ended, "reload: "+tc.reason); !ok {
				t.Error("no audit event for the ended connection")
			}
		})
	}
}

func TestReloadRefreshesGroupsBeforeAskingThePolicy(t *testing.T) {
	f := newFixture(t) // the policy lets group dev in
	s := f.startSession(t, "-J", "bastion", f.login+"@web1", "echo started; sleep 60")
	f.setAccounts(bastion.Account{Name: "alice", Groups: []string{"ops"}, Keys: []gossh.PublicKey{f.client.PublicKey}})
	f.srv.Revalidate()
	if code := s.ended(t); code != 255 || !strings.Contains(s.stderr.String(), "access ended by a policy change") {
		t.Fatalf("after alice left group dev: exit %d, stderr %q", code, s.stderr.String())
	}
	// Her key still names her: a new connection gets in, and is refused by
	// the policy, not by the key.
	res := f.jump(nil, "true")
	if res.Exit != 255 || !strings.Contains(res.Stderr, "denied by policy") {
		t.Fatalf("a new connection after the reload: %v", res)
	}
}

// TestReloadWithdrawingRemoteForwardCancelsIt: a reload that withdraws
// remote-forward makes the VM stop listening on an -R already granted; the
// session goes on.
func TestReloadWithdrawingRemoteForwardCancelsIt(t *testing.T) {
	f := newFixture(t)
	echo := startEcho(t)
	remote := testenv.FreeAddr(t) // bound by the VM's sshd, which here shares the host's loopback
	s := f.startSession(t, "-o", "ExitOnForwardFailure=yes", "-J", "bastion", "-R", remote+":"+echo.addr, f.login+"@web1",
		"echo started; sleep 60")
	testenv.WaitListening(t, remote)
	testenv.EchoThrough(t, testenv.Dial(t, remote))
	reached := echo.count()
	rule := f.devRule()
	rule.Channels = []policy.Channel{policy.Shell, policy.Exec}
	f.rules(rule)
	waitFor(t, func() bool {
		c, err := net.Dial("tcp", remote)
		if err != nil {
			return true
		}
		c.Close()
		return false
	}, func() string { return "the VM still listens on the withdrawn forward " + remote })
	if echo.count() != reached {
		t.Fatal("a connection reached the client through the withdrawn forward")
	}
	select {
	case <-s.done:
		t.Fatalf("the session ended with its forward: %s", s.stderr.String())
	default:
	}
	if _, ok := f.audit.find(audit.Ended, "policy change"); !ok {
		t.Error("no audit event for the cancelled forward")
	}
}

// TestReloadWithdrawingAgentStopsTheVMsAgentChannels: after a reload that
// withdraws agent forwarding, the VM's ssh-add no longer reaches the
// client's agent, though the session that asked for it goes on.
func TestReloadWithdrawingAgentStopsTheVMsAgentChannels(t *testing.T) {
	f := newFixture(t)
	rule := f.devRule()
	rule.Channels = append(rule.Channels, policy.Agent)
	f.rules(rule)
	sock := f.startAgent(t)
	marker := filepath.Join(t.TempDir(), "reloaded")
	s := f.startSession(t, "-A", "-o", "IdentityAgent="+sock, "-J", "bastion", f.login+"@web1",
		"echo started; ssh-add -l >/dev/null && echo before=listed; while [ ! -e "+marker+" ]; do sleep 0.1; done; ssh-add -l >/dev/null; echo after=$?")
	waitFor(t, func() bool { return strings.Contains(s.stdout.String(), "before=listed") },
		func() string {
			return "the agent was not reachable before the reload: " + s.stdout.String() + s.stderr.String()
		})
	f.rules(f.devRule()) // no agent
	os.WriteFile(marker, nil, 0o600)
	if code := s.ended(t); code != 0 || strings.Contains(s.stdout.String(), "after=0") || !strings.Contains(s.stdout.String(), "after=") {
		t.Fatalf("after the reload: exit %d, stdout %q; want ssh-add to fail and the session to finish", code, s.stdout.String())
	}
}

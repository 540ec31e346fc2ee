package bastion_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bastionvm/bastion/internal/testenv"
	"github.com/bastionvm/bastion/policy"
)

func TestEnvAllowList(t *testing.T) {
	f := newFixture(t)
	// The stand-in VM's sshd accepts LANG, LC_* and BASTION_TEST_*; the
	// bastion passes only its allow-list (LANG, LC_*, ...).
	res := f.ssh(nil, "-o", "SetEnv=LC_PROBE=passed BASTION_TEST_PROBE=leaked", "-J", "bastion", f.login+"@web1",
		`echo "$LC_PROBE,$BASTION_TEST_PROBE"`)
	if res.Exit != 0 || string(res.Stdout) != "passed,\n" {
		t.Fatalf("env through the bastion: %v %q, want %q", res, res.Stdout, "passed,\n")
	}
}

func TestUnknownRequestsAnsweredFalse(t *testing.T) {
	f := newFixture(t)
	c := f.goClient(f.login + "@web1")
	done := make(chan struct{})
	go func() {
		defer close(done)
		ok, _, err := c.SendRequest("nonsense@example.com", true, nil)
		if err != nil || ok {
			t.Errorf("unknown global request: ok %v, err %v", ok, err)
		}
		s, err := c.NewSession()
		if err != nil {
			t.Error(err)
			return
		}
		defer s.Close()
		ok, err = s.SendRequest("nonsense@example.com", true, nil)
		if err != nil || ok {
			t.Errorf("unknown session request: ok %v, err %v", ok, err)
		}
		if _, _, err := c.OpenChannel("nonsense@example.com", nil); err == nil {
			t.Error("unknown channel type accepted")
		}
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("an unknown request was never answered")
	}
}

// TestManyChannelsOneConnection is what IDE remote extensions do: many
// sessions and forwards at once on one connection. Ten sessions is what
// sshd allows on one connection by default (MaxSessions); the bastion
// passes the VM's refusal beyond that on, as a direct connection would.
func TestManyChannelsOneConnection(t *testing.T) {
	f := newFixture(t)
	echo := startEcho(t)
	c := f.goClient(f.login + "@web1")
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := c.Dial("tcp", echo.addr)
			if err != nil {
				t.Errorf("forward %d: %v", i, err)
				return
			}
			defer conn.Close()
			msg := fmt.Sprintf("forward %d", i)
			conn.Write([]byte(msg))
			buf := make([]byte, len(msg))
			if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != msg {
				t.Errorf("forward %d: %q %v", i, buf, err)
			}
		}()
	}
	for i := 0; i < 10; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := c.NewSession()
			if err != nil {
				t.Errorf("session %d: %v", i, err)
				return
			}
			defer s.Close()
			out, err := s.Output(fmt.Sprintf("sleep 0.2; echo %d", i))
			if err != nil || strings.TrimSpace(string(out)) != fmt.Sprint(i) {
				t.Errorf("session %d: %q %v", i, out, err)
			}
		}()
	}
	wg.Wait()
	for i := 0; i < 10; i++ {
		s, err := c.NewSession()
		if err != nil {
			t.Fatalf("held session %d: %v", i, err)
		}
		defer s.Close()
	}
	if _, err := c.NewSession(); err == nil || !strings.Contains(err.Error(), "open failed") {
		t.Fatalf("an 11th session: %v, want the VM's refusal", err)
	}
}

// TestAgentForwarding: with policy allowing it, `ssh -A` gives the VM the
// client's agent; without, the VM sees none.
func TestAgentForwarding(t *testing.T) {
	f := newFixture(t)
	sock := f.startAgent(t)
	listKeys := func() testenv.Result {
		cmd := f.client.Command(context.Background(), "ssh", "-A", "-o", "IdentityAgent="+sock, "-J", "bastion", f.login+"@web1", "ssh-add -l")
		var out, errb strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		res := testenv.Result{Stdout: []byte(out.String()), Stderr: errb.String()}
		if e, ok := err.(*exec.ExitError); ok {
			res.Exit = e.ExitCode()
		}
		return res
	}
	if res := listKeys(); res.Exit == 0 {
		t.Fatalf("agent forwarded without the policy allowing it: %v %q", res, res.Stdout)
	}
	rule := f.devRule()
	rule.Channels = append(rule.Channels, policy.Agent)
	f.rules(rule)
	res := listKeys()
	if res.Exit != 0 || !strings.Contains(string(res.Stdout), "ED25519") {
		t.Fatalf("ssh -A with agent allowed: %v %q", res, res.Stdout)
	}
}

// startAgent runs an ssh-agent holding the client's key for the test and
// returns its socket.
func (f *fixture) startAgent(t *testing.T) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "agent.sock")
	agent := exec.Command("ssh-agent", "-D", "-a", sock)
	if err := agent.Start(); err != nil {
		t.Fatalf("ssh-agent: %v", err)
	}
	t.Cleanup(func() { agent.Process.Kill(); agent.Wait() })
	testenv.WaitUnix(t, sock)
	add := exec.Command("ssh-add", f.client.Key)
	add.Env = append(os.Environ(), "SSH_AUTH_SOCK="+sock)
	if out, err := add.CombinedOutput(); err != nil {
		t.Fatalf("ssh-add: %v %s", err, out)
	}
	return sock
}

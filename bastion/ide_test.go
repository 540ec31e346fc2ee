package bastion_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bastionvm/bastion/internal/testenv"
)

// The flows IDEs and automation run over SSH, each through both of the
// bastion's modes, with the real clients where they exist here (OpenSSH,
// Debian's ansible-core and git) and, for what an IDE's own SSH library
// does, OpenSSH driven the same way.

// modes are the two ways to name the VM: ssh -J and login@vm@bastion.
// Each gives the ssh arguments before the command and the target for
// tools that take a host.
func (f *fixture) modes() []struct {
	name string
	args []string
} {
	return []struct {
		name string
		args []string
	}{
		{"jump", []string{"-J", "bastion", f.login + "@web1"}},
		{"login@vm", []string{f.login + "@web1@bastion"}},
	}
}

// TestVSCodeFlow is what VS Code Remote-SSH does: bash with no terminal
// and its install script on stdin, reporting a port; then a -D connection
// with many channels at once to that loopback port on the VM; and a second
// connection within a second of the first to the same VM.
func TestVSCodeFlow(t *testing.T) {
	f := newFixture(t)
	server := startEcho(t) // the "VS Code server", on the VM's loopback
	_, port, _ := net.SplitHostPort(server.addr)
	script := "set -e\necho \"uname==$(uname -s)==\"\ntest ! -t 0 && echo no-tty\necho listeningOn==" + port + "==\nexit 0\n"
	for _, mode := range f.modes() {
		t.Run(mode.name, func(t *testing.T) {
			res := f.ssh([]byte(script), append(append([]string{"-T", "-o", "ConnectTimeout=15"}, mode.args...), "bash")...)
			out := string(res.Stdout)
			if res.Exit != 0 || !strings.Contains(out, "uname==Linux==") || !strings.Contains(out, "no-tty") || !strings.Contains(out, "listeningOn=="+port+"==") {
				t.Fatalf("bash with the script on stdin: %v %q", res, out)
			}
			socks := testenv.FreeAddr(t)
			f.background(append([]string{"-N", "-T", "-o", "ExitOnForwardFailure=yes", "-D", socks}, mode.args...)...)
			testenv.WaitListening(t, socks)
			// The second connection, at once: the same VM, a command.
			if res := f.ssh(nil, append(mode.args, "echo second")...); res.Exit != 0 || string(res.Stdout) != "second\n" {
				t.Fatalf("a second connection: %v %q", res, res.Stdout)
			}
			before := server.count()
			var wg sync.WaitGroup
			for range 24 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					testenv.EchoThrough(t, testenv.SOCKSConnect(t, socks, server.addr))
				}()
			}
			wg.Wait()
			if got := server.count() - before; got != 24 {
				t.Fatalf("the server saw %d connections through -D, want 24", got)
			}
		})
	}
}

// TestJetBrainsFlow is what JetBrains Gateway does on one connection: a
// burst of thirty short execs, an sftp upload of a 50 MB binary that is
// then made executable and run, and a local forward held with keepalives
// (ten minutes in the full suite, BASTION_VMTEST=1; half a minute in the
// inner loop).
func TestJetBrainsFlow(t *testing.T) {
	f := newFixture(t)
	hold := 30 * time.Second
	if os.Getenv("BASTION_VMTEST") == "1" {
		hold = 10 * time.Minute
	}
	dir := t.TempDir()
	// A "binary": a script that exits before the 50 MB that follow it.
	bin := filepath.Join(dir, "backend")
	payload := make([]byte, 50<<20)
	rand.Read(payload)
	data := append([]byte("#!/bin/sh\necho \"backend $1\"\nexit 0\n"), payload...)
	if err := os.WriteFile(bin, data, 0o644); err != nil {
		t.Fatal(err)
	}
	sum := fmt.Sprintf("%x", sha256.Sum256(data))
	echo := startEcho(t)
	for _, mode := range f.modes() {
		t.Run(mode.name, func(t *testing.T) {
			master := f.master(t, mode.args)
			var wg sync.WaitGroup
			errs := make(chan string, 30)
			sem := make(chan struct{}, 8) // under the VM sshd's MaxSessions
			for i := range 30 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					sem <- struct{}{}
					defer func() { <-sem }()
					// A fresh slice each: goroutines appending to master's would share it.
					res := f.ssh(nil, slices.Concat(master, []string{fmt.Sprintf("echo exec-%d; exit %d", i, i%3)})...)
					if res.Exit != i%3 || string(res.Stdout) != fmt.Sprintf("exec-%d\n", i) {
						errs <- fmt.Sprintf("exec %d: %v %q", i, res, res.Stdout)
					}
				}()
			}
			wg.Wait()
			close(errs)
			for e := range errs {
				t.Error(e)
			}

			remote := filepath.Join(f.vm.Home, "backend-"+mode.name)
			batch := "put " + bin + " " + remote + "\nchmod 755 " + remote + "\n"
			if res := f.client.Run([]byte(batch), "sftp", append([]string{"-b", "-", "-o", "ControlPath=" + master[1]}, mode.args...)...); res.Exit != 0 {
				t.Fatalf("sftp upload: %v", res)
			}
			res := f.ssh(nil, slices.Concat(master, []string{remote + " started && sha256sum " + remote})...)
			if res.Exit != 0 || string(res.Stdout) != "backend started\n"+sum+"  "+remote+"\n" {
				t.Fatalf("running the upload: %v %q", res, res.Stdout)
			}
		})
	}
	t.Run("held forward", func(t *testing.T) {
		t.Parallel()
		local := testenv.FreeAddr(t)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		cmd := f.client.Command(ctx, "ssh", "-N", "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=2",
			"-L", local+":"+echo.addr, "-J", "bastion", f.login+"@web1")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		testenv.WaitListening(t, local)
		testenv.EchoThrough(t, testenv.Dial(t, local))
		// One connection open across the hold, as an IDE's would be.
		open := testenv.Dial(t, local)
		select {
		case err := <-exited:
			t.Fatalf("the forward ended during the hold: %v\n%s", err, stderr.String())
		case <-time.After(hold):
		}
		testenv.EchoThrough(t, open)
		testenv.EchoThrough(t, testenv.Dial(t, local))
	})
}

// master starts an OpenSSH ControlMaster to the VM in mode and returns the
// ssh arguments that open sessions on it (ControlPath first).
func (f *fixture) master(t *testing.T, mode []string) []string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "cm")
	f.background(append([]string{"-N", "-o", "ControlMaster=yes", "-o", "ControlPath=" + sock}, mode...)...)
	waitFor(t, func() bool { _, err := os.Stat(sock); return err == nil }, func() string { return "the master never listened" })
	return append([]string{"-S", sock, "-o", "ControlMaster=no"}, mode...)
}

// TestAnsibleFlow runs Debian's ansible-core against the VM as its
// defaults do: a ControlMaster connection with ControlPersist, -tt for
// modules, sftp -b - transfers, and, set to scp, the scp fallback; ten
// hosts that are the one VM, with ten forks, make ten session channels on
// the one connection at once.
func TestAnsibleFlow(t *testing.T) {
	f := newFixture(t)
	for _, mode := range f.modes() {
		t.Run(mode.name, func(t *testing.T) {
			var hosts []string
			for i := range 10 {
				if mode.name == "jump" {
					hosts = append(hosts, fmt.Sprintf("vm%d ansible_host=web1 ansible_user=%s", i, f.login))
				} else {
					hosts = append(hosts, fmt.Sprintf("vm%d ansible_host=bastion ansible_user=%s@web1", i, f.login))
				}
			}
			sshArgs := "-F " + f.client.Config
			if mode.name == "jump" {
				sshArgs += " -J bastion"
			}
			a := testenv.NewAnsible(t, hosts, sshArgs, f.vm.Home)
			file := filepath.Join(a.Dir, "payload")
			os.WriteFile(file, []byte("from ansible "+mode.name+"\n"), 0o600)
			out := a.Run("vms", "-m", "ping")
			if strings.Count(out, "SUCCESS") != 10 || !strings.Contains(out, `"ping": "pong"`) {
				t.Fatalf("ansible -m ping:\n%s", out)
			}
			// Ten at once on one connection: each sleeps, so they overlap.
			out = a.Run("vms", "-m", "shell", "-a", "sleep 1; tty || true")
			if strings.Count(out, "CHANGED") != 10 || !strings.Contains(out, "/dev/pts/") {
				t.Fatalf("ansible shell with -tt, ten at once:\n%s", out)
			}
			for _, method := range []string{"sftp", "scp"} {
				dest := filepath.Join(f.vm.Home, "copied-"+mode.name+"-"+method)
				args := []string{"vm0", "-m", "copy", "-a", "src=" + file + " dest=" + dest, "-e", "ansible_ssh_transfer_method=" + method}
				if method == "scp" {
					args = append(args, "-e", "ansible_scp_extra_args=-O")
				}
				if out := a.Run(args...); !strings.Contains(out, "CHANGED") {
					t.Fatalf("ansible copy over %s:\n%s", method, out)
				}
				if got, _ := os.ReadFile(dest); string(got) != "from ansible "+mode.name+"\n" {
					t.Fatalf("copied over %s: %q", method, got)
				}
			}
			sockets := a.Sockets()
			if len(sockets) != 1 {
				t.Fatalf("%d ControlPersist sockets, want the one connection", len(sockets))
			}
			exec.Command("ssh", "-F", f.client.Config, "-o", "ControlPath="+sockets[0], "-O", "exit", "web1").Run()
		})
	}
}

// TestGitFlow clones from and pushes to a repository on the VM with git
// over SSH, protocol v2 through GIT_PROTOCOL, exact exit codes included.
func TestGitFlow(t *testing.T) {
	f := newFixture(t)
	repo := filepath.Join(f.vm.Home, "repo.git")
	if out, code := testenv.Git(t, t.TempDir(), nil, "init", "-q", "--bare", "-b", "main", repo); code != 0 {
		t.Fatalf("git init: %s", out)
	}
	for _, mode := range f.modes() {
		t.Run(mode.name, func(t *testing.T) {
			ssh := "ssh -F " + f.client.Config
			url := "ssh://" + f.login + "@web1" + repo
			if mode.name == "jump" {
				ssh += " -J bastion"
			} else {
				url = "ssh://" + f.login + "@web1@bastion" + repo
			}
			testenv.GitRoundTrip(t, []string{"GIT_SSH_COMMAND=" + ssh}, url, mode.name)
		})
	}
	out, _ := testenv.Git(t, t.TempDir(), nil, "--git-dir", repo, "log", "--format=%s", "main")
	if out != "login@vm\njump\n" {
		t.Fatalf("the repository's history: %q", out)
	}
}

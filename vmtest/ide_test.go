package vmtest

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bastionvm/bastion/internal/testenv"
)

// The flows IDEs and automation run over SSH (bastion/ide_test.go has
// them in process, in detail), here against a real guest through the
// bastion binary, each through -J and through login@vm@bastion.

// guestEcho is a TCP echo server the VS Code flow starts on the guest's
// loopback, as VS Code starts its server: python3, detached.
const guestEcho = `import socket, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", %d))
s.listen(64)
def echo(c):
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.shutdown(socket.SHUT_WR)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
`

// modes are the ssh arguments that reach login on vm each way.
func (b *bastionProc) modes(login, vm string) []struct {
	name string
	args []string
} {
	return []struct {
		name string
		args []string
	}{
		{"jump", []string{"-J", "bastion", login + "@" + vm}},
		{"login@vm", []string{login + "@" + vm + "@bastion"}},
	}
}

// hold starts ssh args... in the background, and returns its stderr and
// a function that stops it, which the test's end calls too.
func (b *bastionProc) hold(t *testing.T, args ...string) (*testenv.LockedBuffer, func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := b.client.Command(ctx, "ssh", args...)
	var stderr testenv.LockedBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	stop := sync.OnceFunc(func() { cancel(); cmd.Wait() })
	t.Cleanup(stop)
	return &stderr, stop
}

func TestIDEFlowsOnGuest(t *testing.T) {
	b := startBastion(t, "")
	const port = 47123
	script := fmt.Sprintf("set -e\necho \"uname==$(uname -s)==\"\ntest ! -t 0 && echo no-tty\n"+
		"if ! pgrep -f ide-echo >/dev/null; then setsid python3 -c '%s' ide-echo </dev/null >/dev/null 2>&1 & fi\n"+
		"for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/%d) 2>/dev/null && break; sleep 0.1; done\necho listeningOn==%d==\n",
		strings.ReplaceAll(fmt.Sprintf(guestEcho, port), "'", `'"'"'`), port, port)
	target := fmt.Sprintf("127.0.0.1:%d", port)

	t.Run("vscode", func(t *testing.T) {
		for _, mode := range b.modes("root", web1) {
			t.Run(mode.name, func(t *testing.T) {
				res := b.client.Run([]byte(script), "ssh", append(append([]string{"-T"}, mode.args...), "bash")...)
				out := string(res.Stdout)
				if res.Exit != 0 || !strings.Contains(out, "uname==Linux==") || !strings.Contains(out, "no-tty") || !strings.Contains(out, fmt.Sprintf("listeningOn==%d==", port)) {
					t.Fatalf("bash with the script on stdin: %v %q", res, out)
				}
				socks := testenv.FreeAddr(t)
				b.hold(t, append([]string{"-N", "-T", "-o", "ExitOnForwardFailure=yes", "-D", socks}, mode.args...)...)
				testenv.WaitListening(t, socks)
				if res := b.client.Run(nil, "ssh", append(slices.Clone(mode.args), "echo second")...); res.Exit != 0 || string(res.Stdout) != "second\n" {
					t.Fatalf("a second connection at once: %v %q", res, res.Stdout)
				}
				var wg sync.WaitGroup
				for range 24 {
					wg.Add(1)
					go func() {
						defer wg.Done()
						testenv.EchoThrough(t, testenv.SOCKSConnect(t, socks, target))
					}()
				}
				wg.Wait()
			})
		}
	})

	t.Run("jetbrains", func(t *testing.T) {
		dir := t.TempDir()
		bin := filepath.Join(dir, "backend")
		payload := make([]byte, 50<<20)
		rand.Read(payload)
		data := append([]byte("#!/bin/sh\necho \"backend $1\"\nexit 0\n"), payload...)
		write(t, bin, string(data))
		sum := fmt.Sprintf("%x", sha256.Sum256(data))
		for _, mode := range b.modes("root", web1) {
			t.Run(mode.name, func(t *testing.T) {
				sock := filepath.Join(t.TempDir(), "cm")
				b.hold(t, append([]string{"-N", "-o", "ControlMaster=yes", "-o", "ControlPath=" + sock}, mode.args...)...)
				waitFor(t, func() bool { _, err := os.Stat(sock); return err == nil }, "the master's socket")
				master := append([]string{"-S", sock, "-o", "ControlMaster=no"}, mode.args...)
				var wg sync.WaitGroup
				turns := make(chan struct{}, 8) // under the guest sshd's MaxSessions
				for i := range 30 {
					wg.Add(1)
					go func() {
						defer wg.Done()
						turns <- struct{}{}
						defer func() { <-turns }()
						res := b.client.Run(nil, "ssh", slices.Concat(master, []string{fmt.Sprintf("echo exec-%d; exit %d", i, i%3)})...)
						if res.Exit != i%3 || string(res.Stdout) != fmt.Sprintf("exec-%d\n", i) {
							t.Errorf("exec %d on the master: %v %q", i, res, res.Stdout)
						}
					}()
				}
				wg.Wait()
				remote := "/root/backend-" + mode.name
				batch := "put " + bin + " " + remote + "\nchmod 755 " + remote + "\n"
				if res := b.client.Run([]byte(batch), "sftp", append([]string{"-b", "-", "-o", "ControlPath=" + sock}, mode.args...)...); res.Exit != 0 {
					t.Fatalf("sftp upload: %v", res)
				}
				res := b.client.Run(nil, "ssh", slices.Concat(master, []string{remote + " started && sha256sum " + remote})...)
				if res.Exit != 0 || string(res.Stdout) != "backend started\n"+sum+"  "+remote+"\n" {
					t.Fatalf("running the upload: %v %q", res, res.Stdout)
				}
			})
		}
		t.Run("held forward", func(t *testing.T) {
			local := testenv.FreeAddr(t)
			stderr, _ := b.hold(t, "-N", "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=2",
				"-L", local+":"+target, "-J", "bastion", "root@"+web1)
			testenv.WaitListening(t, local)
			open := testenv.Dial(t, local)
			time.Sleep(30 * time.Second) // six keepalives on every hop
			testenv.EchoThrough(t, open)
			testenv.EchoThrough(t, testenv.Dial(t, local))
			if s := stderr.String(); s != "" {
				t.Logf("ssh -L said: %s", s)
			}
		})
	})

	t.Run("ansible", func(t *testing.T) {
		for _, mode := range b.modes("root", web1) {
			t.Run(mode.name, func(t *testing.T) {
				var hosts []string
				sshArgs := "-F " + b.client.Config
				for i := range 10 {
					if mode.name == "jump" {
						hosts = append(hosts, fmt.Sprintf("vm%d ansible_host=%s ansible_user=root", i, web1))
					} else {
						hosts = append(hosts, fmt.Sprintf("vm%d ansible_host=bastion ansible_user=root@%s", i, web1))
					}
				}
				if mode.name == "jump" {
					sshArgs += " -J bastion"
				}
				a := testenv.NewAnsible(t, hosts, sshArgs, "/root")
				out := a.Run("vms", "-m", "ping")
				if strings.Count(out, "SUCCESS") != 10 || !strings.Contains(out, `"ping": "pong"`) {
					t.Fatalf("ansible -m ping, ten hosts on one connection:\n%s", out)
				}
				if out := a.Run("vm0", "-m", "shell", "-a", "tty"); !strings.Contains(out, "CHANGED") || !strings.Contains(out, "/dev/pts/") {
					t.Fatalf("ansible shell with -tt:\n%s", out)
				}
				file := filepath.Join(a.Dir, "payload")
				write(t, file, "from ansible "+mode.name+"\n")
				// Python modules on an emulated CPU are slow: one transfer
				// method a mode here, both in process.
				method := map[string]string{"jump": "sftp", "login@vm": "scp"}[mode.name]
				dest := "/root/copied-" + mode.name + "-" + method
				b.client.Run(nil, "ssh", append(slices.Clone(mode.args), "rm -f "+dest)...) // guests may be kept from an earlier run
				args := []string{"vm0", "-m", "copy", "-a", "src=" + file + " dest=" + dest, "-e", "ansible_ssh_transfer_method=" + method}
				if method == "scp" {
					args = append(args, "-e", "ansible_scp_extra_args=-O")
				}
				if out := a.Run(args...); !strings.Contains(out, "CHANGED") {
					t.Fatalf("ansible copy over %s:\n%s", method, out)
				}
				if res := b.client.Run(nil, "ssh", append(slices.Clone(mode.args), "cat "+dest)...); string(res.Stdout) != "from ansible "+mode.name+"\n" {
					t.Fatalf("copied over %s: %v %q", method, res, res.Stdout)
				}
				if n := len(a.Sockets()); n != 1 {
					t.Fatalf("%d ControlPersist sockets, want the one connection", n)
				}
				b.client.Run(nil, "ssh", "-o", "ControlPath="+a.Sockets()[0], "-O", "exit", web1)
			})
		}
	})

	t.Run("git", func(t *testing.T) {
		// defaultRule allows remote forwarding, so each link has a
		// connection of its own, made after the sshd reload below: a kept
		// connection would run sessions under the old configuration.
		const repo = "/root/repo.git"
		// Debian's sshd accepts LANG and LC_* only: a VM serving git adds
		// GIT_PROTOCOL for protocol v2.
		const accept = "/etc/ssh/sshd_config.d/git-protocol.conf"
		if res := b.ssh(nil, "root@"+web1, "rm -rf "+repo+" && git init -q --bare -b main "+repo+
			" && echo 'AcceptEnv GIT_PROTOCOL' > "+accept+" && systemctl reload ssh"); res.Exit != 0 {
			t.Fatalf("git init on the guest: %v", res)
		}
		t.Cleanup(func() { b.ssh(nil, "root@"+web1, "rm -f "+accept+" && systemctl reload ssh") })
		for _, mode := range b.modes("root", web1) {
			t.Run(mode.name, func(t *testing.T) {
				ssh := "ssh -F " + b.client.Config
				url := "ssh://root@" + web1 + repo
				if mode.name == "jump" {
					ssh += " -J bastion"
				} else {
					url = "ssh://root@" + web1 + "@bastion" + repo
				}
				testenv.GitRoundTrip(t, []string{"GIT_SSH_COMMAND=" + ssh}, url, mode.name)
			})
		}
		if res := b.ssh(nil, "root@"+web1, "git --git-dir "+repo+" log --format=%s main"); string(res.Stdout) != "login@vm\njump\n" {
			t.Fatalf("the guest repository's history: %v %q", res, res.Stdout)
		}
	})
}

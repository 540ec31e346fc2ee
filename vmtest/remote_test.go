package vmtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/internal/testenv"
)

// TestRemoteHypervisor: the bastion reaches libvirt through a qemu+ssh://
// URI, the path operators use for a fleet of hosts, to this machine's own
// libvirtd through an sshd the test starts. Logins, `vm ls` and the trust
// check all run through it; a dropped SSH transport is reopened.
func TestRemoteHypervisor(t *testing.T) {
	sshd, uri := startHypervisorSSHD(t)
	b := newBastionProc(t, "", defaultRule)
	b.hypervisor(uri)
	b.launch()

	if r := b.ssh(nil, "root@"+web1, "cat /etc/hostname; echo remote-ok"); r.Exit != 0 || !strings.HasSuffix(string(r.Stdout), "remote-ok\n") {
		t.Fatalf("ssh -J through a qemu+ssh hypervisor: %v", r)
	}
	if n := accepted(t, sshd); n < 1 {
		t.Fatalf("the hypervisor's sshd let nobody in: the bastion did not use the remote URI\n%s", readLog(sshd))
	}
	connected := b.auditEvents("connected")
	if len(connected) != 1 || connected[0]["vm"] != web1 {
		t.Fatalf("connected events: %v", connected)
	}

	out, err := exec.Command(binary, "vm", "ls", "--config", b.config).CombinedOutput()
	if err != nil || !strings.Contains(string(out), web1) || !strings.Contains(string(out), agent) {
		t.Fatalf("bastion vm ls through qemu+ssh: %v\n%s", err, out)
	}

	// Cut the SSH transport under the bastion: kill every session sshd
	// runs for it. The other guest, not trusted yet, needs the hypervisor
	// for its trust check, through a new transport.
	before := accepted(t, sshd)
	if out, err := exec.Command("pkill", "-KILL", "-P", fmt.Sprint(sshd.Pid())).CombinedOutput(); err != nil {
		t.Fatalf("pkill the hypervisor sshd's sessions: %v %s", err, out)
	}
	deadline := time.Now().Add(time.Minute)
	for {
		if r := b.ssh(nil, "root@"+agent, "echo reopened"); r.Exit == 0 && string(r.Stdout) == "reopened\n" {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("the first bastion did not reopen its hypervisor transport: %v\n%s", r, b.stderr.String())
		}
		time.Sleep(time.Second)
	}
	if n := accepted(t, sshd); n <= before {
		t.Fatalf("no new SSH transport after the cut (%d logins, %d before)", n, before)
	}
}

// startHypervisorSSHD starts an sshd that lets root in with a key of its
// own, and returns it with a qemu+ssh URI to this machine's libvirtd
// through it. The URI's command is ssh with a configuration that pins the
// sshd's host key and uses that key: what the bastion user's ~/.ssh holds
// on a real deployment.
func startHypervisorSSHD(t *testing.T) (*testenv.SSHD, string) {
	t.Helper()
	dir := t.TempDir()
	signer, pemBytes := testenv.NewKey(t)
	sshd, err := testenv.StartSSHDWith(testenv.SSHDOptions{
		Dir:        filepath.Join(dir, "sshd"),
		Authorized: []gossh.PublicKey{signer.PublicKey()},
		Config:     "LogLevel INFO\n", // its log says who logged in
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sshd.Stop() })
	host, port, _ := strings.Cut(sshd.Addr, ":")
	key := filepath.Join(dir, "id_ed25519")
	write(t, key, string(pemBytes))
	knownHosts := filepath.Join(dir, "known_hosts")
	write(t, knownHosts, fmt.Sprintf("[%s]:%s %s", host, port, marshalAuthorized(sshd.HostKey)))
	config := filepath.Join(dir, "ssh_config")
	write(t, config, fmt.Sprintf(`Host *
  IdentityFile %s
  IdentitiesOnly yes
  UserKnownHostsFile %s
  StrictHostKeyChecking yes
  BatchMode yes
`, key, knownHosts))
	command := filepath.Join(dir, "ssh")
	if err := os.WriteFile(command, []byte(fmt.Sprintf("#!/bin/sh\nexec ssh -F %s \"$@\"\n", config)), 0o700); err != nil {
		t.Fatal(err)
	}
	uri := fmt.Sprintf("qemu+ssh://root@%s/system?command=%s&no_tty=1", sshd.Addr, command)
	// The URI works for libvirt's own client before the bastion is tried.
	if out, err := exec.Command("virsh", "-c", uri, "list", "--name").CombinedOutput(); err != nil || !strings.Contains(string(out), web1) {
		t.Fatalf("virsh -c %s list: %v\n%s\nsshd:\n%s", uri, err, out, readLog(sshd))
	}
	return sshd, uri
}

// hypervisor replaces b's hypervisor URI; call it before launch.
func (b *bastionProc) hypervisor(uri string) {
	b.t.Helper()
	from, to := `uri = "qemu:///system"`, fmt.Sprintf("uri = %q", uri)
	b.base = strings.Replace(b.base, from, to, 1)
	cfg, err := os.ReadFile(b.config)
	if err != nil {
		b.t.Fatal(err)
	}
	write(b.t, b.config, strings.Replace(string(cfg), from, to, 1))
}

// accepted counts the logins sshd's log records.
func accepted(t *testing.T, sshd *testenv.SSHD) int {
	t.Helper()
	return strings.Count(readLog(sshd), "Accepted publickey for root")
}

func readLog(sshd *testenv.SSHD) string {
	data, _ := os.ReadFile(sshd.Log)
	return string(data)
}

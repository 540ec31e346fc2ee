package vmtest

import (
	"io"
	"net"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/bastionvm/bastion/internal/testenv"
)

// hostIP is this host's address on the test bed's network (testbed/net.sh).
const hostIP = "192.168.214.1"

// refused checks that ssh through b to target fails, shows the user want,
// ran nothing, and left a trust_failed (or denied) audit event.
func refused(t *testing.T, b *bastionProc, target, want string) {
	t.Helper()
	res := b.ssh(nil, target, "echo user-data-reached-the-vm")
	if res.Exit != 255 || !strings.Contains(res.Stderr, want) {
		t.Fatalf("ssh -J bastion %s: %v; want exit 255 and %q", target, res, want)
	}
	if strings.Contains(string(res.Stdout), "user-data-reached-the-vm") {
		t.Fatal("the command ran")
	}
	if !strings.Contains(b.trustLs(), "no trusts") && strings.Contains(b.trustLs(), strings.TrimPrefix(target, "root@")+" ") {
		t.Fatalf("trust ls shows a trust after a refusal:\n%s", b.trustLs())
	}
}

func TestUnknownVMRefused(t *testing.T) {
	b := startBastion(t, "")
	refused(t, b, "root@bt-nosuch", "bastion: bt-nosuch: no such VM")
}

func TestStoppedVMRefused(t *testing.T) {
	// A domain defined from web1's definition but never started.
	xml := virsh(t, "dumpxml", web1)
	xml = regexp.MustCompile(`<name>[^<]*</name>`).ReplaceAllString(xml, "<name>bt-stopped</name>")
	xml = regexp.MustCompile(`\s*<uuid>[^<]*</uuid>`).ReplaceAllString(xml, "")
	xml = regexp.MustCompile(`<mac address='[^']*'/>`).ReplaceAllString(xml, "<mac address='52:54:00:b7:01:ff'/>")
	path := t.TempDir() + "/stopped.xml"
	write(t, path, xml)
	virsh(t, "define", path)
	t.Cleanup(func() { exec.Command("virsh", "-c", "qemu:///system", "undefine", "bt-stopped").Run() })

	b := startBastion(t, "")
	refused(t, b, "root@bt-stopped", "VM is not running")
	if len(b.auditEvents("trust_failed")) == 0 {
		t.Error("no trust_failed audit event")
	}
}

// TestImpostorRefused sends the bastion's connections to web1's address
// and port 22 to an sshd with another host key on this host (a DNAT rule
// in the nat table's OUTPUT chain), as an impostor on the network would
// take them. The hypervisor's view (agent, lease, host keys) is
// unchanged: only the in-band half can tell.
func TestImpostorRefused(t *testing.T) {
	ip := guests[web1].IP
	ln, err := net.Listen("tcp", hostIP+":0")
	if err != nil {
		t.Fatal(err)
	}
	impostor := ln.Addr().String()
	ln.Close()
	testenv.StartSSHDOn(t, impostor)
	rule := []string{"OUTPUT", "-p", "tcp", "-d", ip, "--dport", "22", "-j", "DNAT", "--to-destination", impostor}
	if out, err := exec.Command("iptables", append([]string{"-t", "nat", "-A"}, rule...)...).CombinedOutput(); err != nil {
		t.Fatalf("iptables: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("iptables", append([]string{"-t", "nat", "-D"}, rule...)...).Run() })

	b := startBastion(t, "")
	refused(t, b, "root@"+web1, "the VM's host key is not the one read through the hypervisor")
	failed := b.auditEvents("trust_failed")
	if len(failed) == 0 || !strings.Contains(failed[0]["reason"].(string), "host key") {
		t.Fatalf("audit: %v", failed)
	}
}

// TestAgentFailuresRefused breaks and mends the agent guest in turn: a
// silent agent, file commands blocked, a clone of another VM's host keys,
// the agent stopped during a session, and a reset during one, which
// ends the session and drops the trust at once.
func TestAgentFailuresRefused(t *testing.T) {
	target := "root@" + agent
	t.Run("silent agent", func(t *testing.T) {
		// The agent is stopped from within for 45 seconds: connected to
		// libvirt, answering nothing.
		guestShell(t, agent, "sleep 1; kill -STOP $(pidof qemu-ga); sleep 30; kill -CONT $(pidof qemu-ga)", true)
		t.Cleanup(func() { waitAgent(t, agent, true) })
		time.Sleep(3 * time.Second)
		b := startBastion(t, "")
		refused(t, b, target, "guest agent is not responding")
	})
	t.Run("file commands blocked", func(t *testing.T) {
		// qemu-ga 7.2 ignores block-rpcs in its configuration file; -b
		// works. The drop-in lives in /run, so a reboot clears it too. The
		// restart ends the agent running the script: nothing to wait for.
		const dropIn = "/run/systemd/system/qemu-guest-agent.service.d"
		guestShell(t, agent, `mkdir -p `+dropIn+` && printf '[Service]\nExecStart=\nExecStart=-/usr/sbin/qemu-ga -b guest-file-open,guest-file-read,guest-file-write\n' > `+dropIn+`/block.conf && systemctl daemon-reload && systemctl --no-block restart qemu-guest-agent`, true)
		t.Cleanup(func() {
			guestShell(t, agent, "rm -rf "+dropIn+" && systemctl daemon-reload && systemctl --no-block restart qemu-guest-agent", true)
			waitAgent(t, agent, true)
		})
		waitAgent(t, agent, false)
		b := startBastion(t, "")
		refused(t, b, target, "guest agent command is disabled in the guest")
	})
	t.Run("clone", func(t *testing.T) {
		// The agent guest takes web1's host keys, as overlays of one image
		// do when nothing regenerates them.
		guestShell(t, agent, "mkdir -p /root/keys && cp -a /etc/ssh/ssh_host_* /root/keys/", false)
		t.Cleanup(func() {
			guestShell(t, agent, "cp -a /root/keys/* /etc/ssh/ && rm -rf /root/keys", false)
		})
		for _, kind := range []string{"ed25519", "ecdsa", "rsa"} {
			for _, suffix := range []string{"", ".pub"} {
				path := "/etc/ssh/ssh_host_" + kind + "_key" + suffix
				copyFile(t, web1, agent, path)
			}
		}
		b := startBastion(t, "")
		if res := b.ssh(nil, "root@"+web1, "true"); res.Exit != 0 {
			t.Fatalf("web1 before the clone is seen: %v", res)
		}
		refused(t, b, target, "another VM presents the same host key")
		// web1's trust is dropped too: the bastion cannot tell them apart.
		if strings.Contains(b.trustLs(), web1) {
			t.Fatalf("web1 still trusted beside its clone:\n%s", b.trustLs())
		}
		refused(t, b, "root@"+web1, "another VM presents the same host key")
	})
	t.Run("agent stopped during a session", func(t *testing.T) {
		// The session itself stops the agent, and starts it again when
		// the test says so.
		b := startBastion(t, "")
		s := b.start(target, "echo started; systemctl stop qemu-guest-agent; echo stopped; read line; systemctl start qemu-guest-agent; echo still here")
		t.Cleanup(func() { waitAgent(t, agent, true) })
		s.expect(t, "stopped")
		refused(t, b, "user@"+agent, "guest agent is not connected")
		io.WriteString(s.stdin, "go on\n")
		s.expect(t, "still here")
		if code := s.ended(t, time.Minute); code != 0 {
			t.Fatalf("the session across the agent's absence: exit %d, stderr %s", code, s.stderr.String())
		}
	})
	t.Run("reset during a session", func(t *testing.T) {
		// A hard reset: the guest's sshd says nothing, so the bastion ends
		// the session itself, on libvirt's event, and tells the user.
		b := startBastion(t, "")
		s := b.start(target, "echo started; sleep 600")
		if !strings.Contains(b.trustLs(), agent) {
			t.Fatalf("no trust before the reset:\n%s", b.trustLs())
		}
		virsh(t, "reset", agent)
		if code := s.ended(t, time.Minute); code != 255 || !strings.Contains(s.stderr.String(), "bastion: "+agent+" rebooted; the session ended") {
			t.Fatalf("the session on the reset VM: exit %d, stderr %q", code, s.stderr.String())
		}
		if strings.Contains(b.trustLs(), agent) {
			t.Fatalf("trust not dropped after the reset:\n%s", b.trustLs())
		}
		if len(b.auditEvents("trust_dropped")) == 0 {
			t.Error("no trust_dropped audit event")
		}
		waitAgent(t, agent, true)
		var res testenv.Result
		for i := 0; i < 30; i++ {
			if res = b.ssh(nil, target, "true"); res.Exit == 0 {
				break
			}
			time.Sleep(2 * time.Second)
		}
		if res.Exit != 0 || len(b.auditEvents("trust_verified")) < 2 {
			t.Fatalf("after the reset: %v, verified %d times", res, len(b.auditEvents("trust_verified")))
		}
	})
}

// copyFile copies a file from one guest to another through their agents.
func copyFile(t *testing.T, from, to, path string) {
	t.Helper()
	var handle int
	readJSON(t, agentCommand(t, from, "guest-file-open", map[string]any{"path": path, "mode": "r"}), &handle)
	var r struct {
		Buf string `json:"buf-b64"`
	}
	readJSON(t, agentCommand(t, from, "guest-file-read", map[string]any{"handle": handle, "count": 65536}), &r)
	agentCommand(t, from, "guest-file-close", map[string]any{"handle": handle})
	readJSON(t, agentCommand(t, to, "guest-file-open", map[string]any{"path": path, "mode": "w"}), &handle)
	agentCommand(t, to, "guest-file-write", map[string]any{"handle": handle, "buf-b64": r.Buf})
	agentCommand(t, to, "guest-file-close", map[string]any{"handle": handle})
}

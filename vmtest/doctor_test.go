package vmtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestDoctor: `bastion doctor` on real guests says each one's agent,
// address, host keys and sshd hold, and what the serving bastion's trust
// is; with the wrong sshd port it fails and says what to fix.
func TestDoctor(t *testing.T) {
	b := startBastion(t, "")
	if r := b.ssh(nil, "root@"+web1, "true"); r.Exit != 0 {
		t.Fatalf("ssh -J root@%s: %v", web1, r)
	}
	out, err := exec.Command(binary, "doctor", "--config", b.config, web1, agent).CombinedOutput()
	if err != nil {
		t.Fatalf("bastion doctor: %v\n%s", err, out)
	}
	text := string(out)
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`(?m)^ok    hypervisor qemu:///system: \d+ VMs$`),
		regexp.MustCompile(`(?m)^ok    vm ` + web1 + `: guest agent answers; address ` + regexp.QuoteMeta(guests[web1].IP) + ` \(lease\); host keys \d read through the agent; sshd SSH-2\.0-OpenSSH_\S+.* at ` + regexp.QuoteMeta(guests[web1].IP) + `:22 proves host key SHA256:\S+; trust verified for root until `),
		regexp.MustCompile(`(?m)^ok    vm ` + agent + `: guest agent answers; .*; trust not verified yet`),
		regexp.MustCompile(`(?m)^0 problems, `),
	} {
		if !want.MatchString(text) {
			t.Errorf("no line matching %s in:\n%s", want, text)
		}
	}

	// The VMs' sshd is said to listen where it does not.
	config := filepath.Join(t.TempDir(), "wrong-port.toml")
	data, _ := os.ReadFile(b.config)
	write(t, config, strings.Replace(string(data), "[trust]\n", "[trust]\nssh_port = 2200\n", 1))
	out, err = exec.Command(binary, "doctor", "--config", config, web1).CombinedOutput()
	text = string(out)
	if exit, ok := err.(*exec.ExitError); !ok || exit.ExitCode() != 1 {
		t.Fatalf("doctor with the wrong sshd port: %v, want exit 1\n%s", err, text)
	}
	for _, want := range []string{
		"FAIL  vm " + web1 + ": guest agent answers; address " + guests[web1].IP + " (lease); host keys ",
		"sshd: the VM's sshd could not be reached: dial tcp " + guests[web1].IP + ":2200: connect: connection refused",
		"      fix: run sshd in the guest on [trust] ssh_port",
		"1 problem, 0 warnings",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("no %q in:\n%s", want, text)
		}
	}
}

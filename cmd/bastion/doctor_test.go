package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bastionvm/bastion/internal/testenv"
)

// doctorRun runs `bastion doctor` on config and returns what it printed
// and its error.
func doctorRun(t *testing.T, config string, args ...string) (string, error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "bastion.toml")
	if err := os.WriteFile(path, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	err := run(append([]string{"doctor", "--config", path}, args...), &out, &out)
	return out.String(), err
}

// wantLines fails unless out has each line (a prefix of one of its lines).
func wantLines(t *testing.T, out string, lines ...string) {
	t.Helper()
	for _, want := range lines {
		found := false
		for _, line := range strings.Split(out, "\n") {
			if strings.HasPrefix(line, want) {
				found = true
			}
		}
		if !found {
			t.Errorf("no line %q in:\n%s", want, out)
		}
	}
}

func TestDoctorBadConfig(t *testing.T) {
	out, err := doctorRun(t, "[server]\nlisten = \"127.0.0.1:0\"\nlisen = \"x\"\n")
	if err == nil || err.Error() != "doctor found 1 problem" {
		t.Fatalf("err = %v", err)
	}
	wantLines(t, out, "FAIL  config: ", "      fix: correct what the message names", "1 problem, 0 warnings")
	if !strings.Contains(out, ":3: ") || !strings.Contains(out, "lisen") {
		t.Fatalf("the config line names neither the line nor the key:\n%s", out)
	}
}

// Each problem gets its FAIL line and a fix; the exit says how many.
func TestDoctorFindsProblems(t *testing.T) {
	state := t.TempDir()
	os.Chmod(state, 0o755)
	os.WriteFile(filepath.Join(state, "host_key"), []byte("x"), 0o644)
	sshd := testenv.StartSSHD(t) // an sshd where the bastion should listen
	out, err := doctorRun(t, `
[server]
listen = "`+sshd.Addr+`"
state_dir = "`+state+`"
audit = "/nonexistent-dir/audit.log"

[[hypervisor]]
uri = "qemu+unix:///system?socket=/nonexistent.sock"
[[hypervisor]]
uri = "test:///default"
`, "test", "web9")
	wantLines(t, out,
		"warn  policy: no rule: every request is denied",
		"warn  accounts: no account has a key",
		"FAIL  state directory "+state+": mode 0755", "      fix: chmod 700 "+state,
		"FAIL  "+filepath.Join(state, "host_key")+": mode 0644", "      fix: chmod 600 "+filepath.Join(state, "host_key"),
		"FAIL  listen "+sshd.Addr+": in use by another SSH server (SSH-2.0-OpenSSH",
		"FAIL  audit /nonexistent-dir/audit.log: its directory /nonexistent-dir does not exist",
		"FAIL  hypervisor qemu+unix:///system?socket=/nonexistent.sock: hypervisor is unreachable",
		"      fix: is libvirtd running?",
		"ok    hypervisor test:///default: 1 VM",
		"FAIL  vm web9: no such VM",
		"FAIL  vm test: guest agent: ",
		"      fix: the bastion reaches the guest through qemu-guest-agent",
		"7 problems, 2 warnings",
	)
	if err == nil || err.Error() != "doctor found 7 problems" {
		t.Fatalf("err = %v", err)
	}
}

// A configuration that can serve, with nothing to reach yet: warnings,
// exit 0.
func TestDoctorHealthy(t *testing.T) {
	example, err := os.ReadFile("../../bastion.toml.example")
	if err != nil {
		t.Fatal(err)
	}
	config := strings.Replace(string(example), `listen = "127.0.0.1:2222"`, `listen = "127.0.0.1:0"`, 1)
	config = strings.Replace(config, `state_dir = "state"`, `state_dir = "`+filepath.Join(t.TempDir(), "state")+`"`, 1)
	out, err := doctorRun(t, config)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	wantLines(t, out, "ok    config ", "ok    state directory ", "ok    listen 127.0.0.1:0: free to bind",
		"warn  hypervisors: none configured", "0 problems, 1 warning")
}

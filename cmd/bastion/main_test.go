package main

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// buildBastion builds this command into a temporary directory.
func buildBastion(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "bastion")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// TestServeExampleConfig starts `bastion serve` with the example
// configuration (on a free port, in a scratch directory), expects it to say
// where it listens and the known-hosts line, and stops it with SIGTERM.
func TestServeExampleConfig(t *testing.T) {
	bin := buildBastion(t)
	dir := t.TempDir()
	example, err := os.ReadFile("../../bastion.toml.example")
	if err != nil {
		t.Fatal(err)
	}
	config := strings.Replace(string(example), `listen = "127.0.0.1:2222"`, `listen = "127.0.0.1:0"`, 1)
	os.WriteFile(filepath.Join(dir, "bastion.toml"), []byte(config), 0o600)

	cmd := exec.Command(bin, "serve", "--config", "bastion.toml")
	cmd.Dir = dir
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	lines := make(chan string, 100)
	go func() {
		s := bufio.NewScanner(stderr)
		for s.Scan() {
			lines <- s.Text()
		}
		close(lines)
	}()
	var listening, knownHosts string
	timeout := time.After(30 * time.Second)
	for listening == "" || knownHosts == "" {
		select {
		case line := <-lines:
			if m := regexp.MustCompile(`^bastion: listening on (127\.0\.0\.1:\d+)$`).FindStringSubmatch(line); m != nil {
				listening = m[1]
			}
			if strings.HasPrefix(line, "@cert-authority * ssh-ed25519 ") {
				knownHosts = line
			}
		case <-timeout:
			t.Fatalf("serve did not print its address and known-hosts line (got %q, %q)", listening, knownHosts)
		}
	}
	for _, path := range []string{"state", "state/host_key", "state/host_ca"} {
		if _, err := os.Stat(filepath.Join(dir, path)); err != nil {
			t.Errorf("state: %v", err)
		}
	}

	// state_dir is relative to the working directory.
	keysCmd := exec.Command(bin, "keys", "known-hosts", "--config", "bastion.toml")
	keysCmd.Dir = dir
	out, err := keysCmd.Output()
	if err != nil || strings.TrimSpace(string(out)) != knownHosts {
		t.Fatalf("bastion keys known-hosts: %q, %v; serve printed %q", out, err, knownHosts)
	}

	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() {
		for range lines {
		}
		done <- cmd.Wait()
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("after SIGTERM: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop on SIGTERM")
	}
}

func TestConfigCheckReportsLine(t *testing.T) {
	bin := buildBastion(t)
	path := filepath.Join(t.TempDir(), "bad.toml")
	os.WriteFile(path, []byte("[server]\nlisten = \"127.0.0.1:2222\"\nlisen = \"x\"\n"), 0o600)
	out, err := exec.Command(bin, "config", "check", "--config", path).CombinedOutput()
	if err == nil || !strings.Contains(string(out), path+":3: unknown key server.lisen") {
		t.Fatalf("config check: %v\n%s", err, out)
	}
}

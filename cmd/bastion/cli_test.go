package main

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bastionvm/bastion/policy"
	"github.com/bastionvm/bastion/vm"
)

// TestHelp: every command answers --help on stdout with its synopsis, its
// flags and an example, and exits 0, in a directory with no bastion.toml
// (help never reads the configuration); so do `bastion --help`, `bastion
// help COMMAND` and a group's --help.
func TestHelp(t *testing.T) {
	bin := buildBastion(t)
	dir := t.TempDir()
	runIn := func(args ...string) (string, string, int) {
		t.Helper()
		cmd := exec.Command(bin, args...)
		cmd.Dir = dir
		var stdout, stderr strings.Builder
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		code := 0
		if exit, ok := err.(*exec.ExitError); ok {
			code = exit.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return stdout.String(), stderr.String(), code
	}
	for _, c := range commands {
		words := strings.Fields(c.name)
		for _, args := range [][]string{append(words, "--help"), append(words, "-h"), append([]string{"help"}, words...)} {
			out, errOut, code := runIn(args...)
			if code != 0 || !strings.HasPrefix(out, "usage: bastion "+c.name+" ") || !strings.Contains(out, "\nexample:\n  bastion ") || errOut != "" {
				t.Errorf("bastion %s: exit %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, out, errOut)
			}
		}
	}
	if out, _, _ := runIn("sessions", "ls", "--help"); !strings.Contains(out, "-since string") {
		t.Errorf("sessions ls --help lists no flags:\n%s", out)
	}
	for _, args := range [][]string{{"--help"}, {"help"}, {"-h"}} {
		out, errOut, code := runIn(args...)
		if code != 0 || !strings.Contains(out, "bastion sessions play") || errOut != "" {
			t.Errorf("bastion %v: exit %d\n%s%s", args, code, out, errOut)
		}
	}
	for _, group := range []string{"vm", "policy", "sessions", "keys", "trust", "config"} {
		out, errOut, code := runIn(group, "--help")
		if code != 0 || !strings.HasPrefix(out, "usage:\n  bastion "+group+" ") || errOut != "" {
			t.Errorf("bastion %s --help: exit %d\n%s%s", group, code, out, errOut)
		}
		// Without a command: the group's list, on stderr, and a failure.
		out, errOut, code = runIn(group)
		if code != 1 || out != "" || !strings.Contains(errOut, "bastion: "+group+": which command?") {
			t.Errorf("bastion %s: exit %d\n%s%s", group, code, out, errOut)
		}
	}
	if _, errOut, code := runIn("teleport"); code != 1 || !strings.Contains(errOut, `unknown command "teleport"`) {
		t.Errorf("an unknown command: exit %d\n%s", code, errOut)
	}
	if _, errOut, code := runIn("help", "teleport"); code != 1 || !strings.Contains(errOut, `no command "teleport"`) {
		t.Errorf("help of an unknown command: exit %d\n%s", code, errOut)
	}
	if _, err := os.Stat(filepath.Join(dir, "bastion.toml")); err == nil {
		t.Error("help made a bastion.toml")
	}
}

// TestCompletion: the bash script parses, and completes commands, their
// second words and their flags.
func TestCompletion(t *testing.T) {
	bin := buildBastion(t)
	script, err := exec.Command(bin, "completion", "bash").Output()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "bastion.bash")
	os.WriteFile(path, script, 0o644)
	for words, want := range map[string]string{
		"bastion ses":               "sessions",
		"bastion sessions p":        "play",
		"bastion sessions play --s": "--speed",
		"bastion vm destroy --f":    "--force",
		"bastion completion b":      "bash",
		"bastion policy test --lab": "--label",
	} {
		w := strings.Fields(words)
		probe := "source " + path + "; COMP_WORDS=(" + words + "); COMP_CWORD=" + string(rune('0'+len(w)-1)) + "; _bastion; echo \"${COMPREPLY[*]}\""
		out, err := exec.Command("bash", "-c", probe).CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != want {
			t.Errorf("completing %q: %v %q, want %q", words, err, out, want)
		}
	}
	if _, err := exec.Command(bin, "completion", "fish").Output(); err == nil {
		t.Error("completion fish: no error")
	}
}

// TestPolicyCheckOfConfiguration: `bastion policy check bastion.toml`
// checks the configuration's policy, not the whole file as rules.
func TestPolicyCheckOfConfiguration(t *testing.T) {
	dir := t.TempDir()
	example, err := os.ReadFile("../../bastion.toml.example")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "bastion.toml")
	os.WriteFile(path, example, 0o600)
	var out strings.Builder
	if err := run([]string{"policy", "check", path}, &out, &out); err != nil || !strings.HasPrefix(out.String(), path+": ok: ") || strings.Contains(out.String(), "unknown key") {
		t.Fatalf("policy check of a configuration: %v\n%s", err, out.String())
	}
	// A policy file still reads as one, and a bad one is refused.
	rules := filepath.Join(dir, "policy.toml")
	os.WriteFile(rules, []byte("[[rule]]\nname = \"a\"\naccounts = [\"alice\"]\nvms = [\"web*\"]\nlogins = [\"root\"]\nchannels = [\"shell\"]\n"), 0o600)
	out.Reset()
	if err := run([]string{"policy", "check", rules}, &out, &out); err != nil || out.String() != rules+": ok: 1 allow and 0 deny rules\n" {
		t.Fatalf("policy check of a policy file: %v\n%s", err, out.String())
	}
	os.WriteFile(rules, []byte("[[rule]]\nname = \"a\"\naccounts = [\"alice\"]\nvms = [\"web*\"]\nlogins = [\"root\"]\nchannels = [\"teleport\"]\n"), 0o600)
	if err := run([]string{"policy", "check", rules}, &out, &out); err == nil || !strings.Contains(err.Error(), "teleport") {
		t.Fatalf("a bad policy file: %v", err)
	}
}

// TestDemoRule: the rule scripts/demo.sh writes lets the demo user do what
// a new user tries first: a shell, a command, sftp, scp in both modes
// (scp -O is legacy scp), and -L and -R.
func TestDemoRule(t *testing.T) {
	script, err := os.ReadFile("../../scripts/demo.sh")
	if err != nil {
		t.Fatal(err)
	}
	s := string(script)
	start := strings.Index(s, "[[rule]]")
	end := strings.Index(s[max(start, 0):], "\nTOML")
	if start < 0 || end < 0 {
		t.Fatal("no [[rule]] in the demo's configuration")
	}
	p, err := policy.Parse("demo.sh", []byte(s[start:start+end]), true)
	if err != nil {
		t.Fatal(err)
	}
	d := vm.Domain{Name: "bt-demo", Running: true}
	for _, r := range []policy.Request{
		{Channel: policy.Shell},
		{Channel: policy.Exec, Command: "uname -a"},
		{Channel: policy.SFTP},
		{Channel: policy.SCP, Command: "scp -t /tmp"},
		{Channel: policy.SCP, Command: "scp -r -f /etc"},
		{Channel: policy.LocalForward, Host: "localhost", Port: 8080},
		{Channel: policy.RemoteForward, Host: "localhost", Port: 9000},
	} {
		r.Account, r.Groups, r.VM, r.Login, r.Time = "demo", []string{"demo"}, d, "root", time.Now()
		r.Source = netip.MustParseAddr("127.0.0.1")
		if dec := p.Decide(r); !dec.Allow {
			t.Errorf("the demo refuses %s %q: %s", r.Channel, r.Command, dec.Reason)
		}
	}
}

// TestFlagsBeforeSubcommand keeps `bastion GROUP --config F SUB` working,
// the order scripts written against earlier releases use.
func TestFlagsBeforeSubcommand(t *testing.T) {
	var out strings.Builder
	if err := run([]string{"config", "--config", "../../bastion.toml.example", "check"}, &out, &out); err != nil {
		t.Errorf("config --config FILE check: %v\n%s", err, out.String())
	}
	missing := filepath.Join(t.TempDir(), "missing.toml")
	for _, args := range [][]string{
		{"vm", "--config", missing, "ls"},
		{"vm", "--config=" + missing, "ls"},
		{"trust", "-config", missing, "ls"},
	} {
		out.Reset()
		err := run(args, &out, &out)
		if err == nil || !strings.Contains(err.Error(), "missing.toml") {
			t.Errorf("bastion %v: %v, want an error naming missing.toml\n%s", args, err, out.String())
		}
	}
}

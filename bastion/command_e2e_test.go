package bastion_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bastionvm/bastion/internal/testenv"
	"github.com/bastionvm/bastion/policy"
)

// refusedExec checks that res is the bastion refusing an exec (or kind)
// request: exit 255, the refusal on stderr, and nothing of the command's
// own output, in particular no "INJECTED".
func refusedExec(t *testing.T, what string, res testenv.Result, kind policy.Channel) {
	t.Helper()
	if res.Exit != 255 || !strings.Contains(res.Stderr, "bastion: web1: "+string(kind)+" denied by policy") {
		t.Errorf("%q: %v %q, want exit 255 and the refusal", what, res, res.Stdout)
	}
	if strings.Contains(string(res.Stdout), "INJECTED") || strings.Contains(res.Stderr, "INJECTED") {
		t.Errorf("%q: the injected command ran: %q %q", what, res.Stdout, res.Stderr)
	}
}

// TestExecPatternRefusesShellInjection runs, with real OpenSSH through the
// bastion, commands that a shell would make more of than the one echo
// the rule allows. Before commands were matched word by word, "echo
// status *" matched all of them and the VM's shell ran the extra part.
func TestExecPatternRefusesShellInjection(t *testing.T) {
	f := newFixture(t)
	rule := f.devRule()
	rule.Channels = []policy.Channel{policy.Exec}
	rule.Commands = []string{"echo status *"}
	f.rules(rule)

	if res := f.jump(nil, "echo status nginx"); res.Exit != 0 || string(res.Stdout) != "status nginx\n" {
		t.Fatalf("the allowed command: %v %q", res, res.Stdout)
	}
	out := filepath.Join(t.TempDir(), "out")
	for _, cmd := range []string{
		"echo status x; echo INJECTED-$(id -un)",
		"echo status x\necho INJECTED",
		"echo status x && echo INJECTED",
		"echo status x || echo INJECTED",
		"echo status x | sed s/x/INJECTED/",
		"echo status `echo INJECTED`",
		"echo status $(echo INJECTED)",
		"echo status ${HOME}INJECTED",
		"echo status x >" + out,
		"echo status 'x; echo INJECTED'",
		"echo status a b",
		"echo status x & echo INJECTED",
	} {
		refusedExec(t, cmd, f.jump(nil, cmd), policy.Exec)
	}
	if fileExists(out) {
		t.Error("a refused redirection created its file")
	}
	if e, ok := f.audit.find("denied", "not a plain command"); !ok || e.Channel != "exec" {
		t.Errorf("audit of a refused injection: %+v", e)
	}
}

// TestSCPRuleRefusesCommandsDressedAsSCP: a rule allowing only legacy
// scp used to allow any exec whose first word was scp and that had a -t
// or -f somewhere. Now only the exact forms scp sends are scp; the rest
// are exec, which the rule does not allow.
func TestSCPRuleRefusesCommandsDressedAsSCP(t *testing.T) {
	f := newFixture(t)
	rule := f.devRule()
	rule.Channels = []policy.Channel{policy.SCP}
	f.rules(rule)
	for _, cmd := range []string{
		"scp -f /nonexistent; echo INJECTED-$(id -un)",
		"scp -f /nonexistent\necho INJECTED",
		"scp -f /nonexistent || echo INJECTED",
		"/usr/bin/scp -f /nonexistent",
		"scp -f /etc/hostname /etc/passwd",
		"scp -S /bin/sh -f /nonexistent",
		"scp -t -f /tmp",
	} {
		refusedExec(t, cmd, f.jump(nil, cmd), policy.Exec)
	}
}

// TestSCPReadAllowsDownloadOnly: under scp-read, scp -O copies from the
// VM (plain, -r and -p) and may not copy to it.
func TestSCPReadAllowsDownloadOnly(t *testing.T) {
	f := newFixture(t)
	rule := f.devRule()
	rule.Channels = []policy.Channel{policy.SCPRead}
	f.rules(rule)
	remote, local := t.TempDir(), t.TempDir()
	os.WriteFile(filepath.Join(remote, "file"), []byte("from the VM\n"), 0o644)
	os.Mkdir(filepath.Join(remote, "dir"), 0o755)
	os.WriteFile(filepath.Join(remote, "dir", "inner"), []byte("inner\n"), 0o644)
	target := f.login + "@web1:"

	for _, tc := range []struct{ name, flag, from, to, want string }{
		{"download", "-q", remote + "/file", local + "/got", local + "/got"},
		{"download -p", "-p", remote + "/file", local + "/got-p", local + "/got-p"},
		{"download -r", "-r", remote + "/dir", local + "/got-r", local + "/got-r/inner"},
	} {
		res := f.client.Run(nil, "scp", "-O", tc.flag, "-J", "bastion", target+tc.from, tc.to)
		if res.Exit != 0 {
			t.Fatalf("scp -O %s under scp-read: %v", tc.name, res)
		}
		if _, err := os.Stat(tc.want); err != nil {
			t.Fatalf("scp -O %s: %v", tc.name, err)
		}
	}
	if got, _ := os.ReadFile(local + "/got"); string(got) != "from the VM\n" {
		t.Fatalf("downloaded %q", got)
	}

	res := f.client.Run(nil, "scp", "-O", "-J", "bastion", local+"/got", target+remote+"/uploaded")
	if res.Exit == 0 || !strings.Contains(res.Stderr, "bastion: web1: scp denied by policy") {
		t.Fatalf("scp -O upload under scp-read: %v", res)
	}
	if fileExists(remote + "/uploaded") {
		t.Fatal("an upload under scp-read reached the VM")
	}
	if e, ok := f.audit.find("denied", "no rule allows"); !ok || e.Channel != "scp" || !strings.Contains(e.Detail, "-t") {
		t.Fatalf("audit of the refused upload: %+v", e)
	}
}

package bastion_test

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/internal/testenv"
	"github.com/bastionvm/bastion/policy"
)

func TestPolicyExecPatterns(t *testing.T) {
	f := newFixture(t)
	rule := f.devRule()
	rule.Channels = []policy.Channel{policy.Exec}
	rule.Commands = []string{"echo allowed **"}
	f.rules(rule)
	if res := f.jump(nil, "echo allowed to run"); res.Exit != 0 || string(res.Stdout) != "allowed to run\n" {
		t.Fatalf("a command matching the pattern: %v %q", res, res.Stdout)
	}
	res := f.jump(nil, "id")
	if res.Exit != 255 || !strings.Contains(res.Stderr, "bastion: web1: exec denied by policy") || len(res.Stdout) != 0 {
		t.Fatalf("a command outside the patterns: %v %q", res, res.Stdout)
	}
	if e, ok := f.audit.find("denied", "no rule allows"); !ok || e.Detail != "id" || e.Channel != "exec" {
		t.Fatalf("audit: %+v", e)
	}
}

func TestPolicyDenyBeatsAllow(t *testing.T) {
	f := newFixture(t)
	deny := policy.Rule{Name: "no-exec", Effect: policy.Deny, Channels: []policy.Channel{policy.Exec}}
	f.rules(f.devRule(), deny)
	res := f.jump(nil, "true")
	if res.Exit != 255 || !strings.Contains(res.Stderr, "exec denied by policy") {
		t.Fatalf("exec with an allow and a deny rule: %v", res)
	}
	if e, ok := f.audit.find("denied", "deny rule"); !ok || e.Rule != "no-exec" {
		t.Fatalf("audit names %+v, want rule no-exec", e)
	}
}

func TestPolicyForwardPorts(t *testing.T) {
	f := newFixture(t)
	allowed, other := startEcho(t), startEcho(t)
	rule := f.devRule()
	rule.ForwardPorts = []policy.PortRange{{From: port(allowed.addr), To: port(allowed.addr)}}
	f.rules(rule)
	good, bad := testenv.FreeAddr(t), testenv.FreeAddr(t)
	stderr := f.background("-N", "-J", "bastion", "-L", good+":"+allowed.addr, "-L", bad+":"+other.addr, f.login+"@web1")
	testenv.WaitListening(t, good)
	testenv.EchoThrough(t, testenv.Dial(t, good))
	c := testenv.Dial(t, bad)
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if n, _ := c.Read(make([]byte, 1)); n != 0 {
		t.Fatal("data through a forward to a port outside the range")
	}
	waitFor(t, func() bool { return strings.Contains(stderr.String(), "local-forward denied by policy") },
		func() string { return "ssh never said the forward was denied: " + stderr.String() })
	if other.count() != 0 {
		t.Fatal("the refused forward reached its target")
	}
}

func TestPolicyTimeWindowClosed(t *testing.T) {
	f := newFixture(t)
	rule := f.devRule()
	now := time.Now().UTC()
	start := time.Duration(now.Add(2*time.Hour).Hour()) * time.Hour
	rule.Window = &policy.Window{From: start, To: start + time.Hour, Zone: time.UTC}
	f.rules(rule)
	if res := f.jump(nil, "true"); res.Exit != 255 || !strings.Contains(res.Stderr, "bastion: web1: denied by policy") {
		t.Fatalf("outside the time window: %v", res)
	}
	rule.Window = &policy.Window{From: time.Duration(now.Hour()) * time.Hour, To: time.Duration(now.Hour()+1) * time.Hour, Zone: time.UTC}
	f.rules(rule)
	if res := f.jump(nil, "true"); res.Exit != 0 {
		t.Fatalf("inside the time window: %v", res)
	}
}

func TestSFTPRefused(t *testing.T) {
	f := newFixture(t)
	rule := f.devRule()
	rule.Channels = []policy.Channel{policy.Shell}
	f.rules(rule)
	batch := filepath.Join(t.TempDir(), "batch")
	os.WriteFile(batch, []byte("ls /\n"), 0o600)
	res := f.client.Run(nil, "sftp", "-J", "bastion", "-b", batch, f.login+"@web1")
	if res.Exit == 0 || !strings.Contains(res.Stderr, "sftp denied by policy") {
		t.Fatalf("sftp not allowed: %v", res)
	}
}

func TestReadOnlySFTP(t *testing.T) {
	f := newFixture(t)
	rule := f.devRule()
	rule.Channels = []policy.Channel{policy.SFTPRead}
	f.rules(rule)
	remote := t.TempDir()
	os.WriteFile(filepath.Join(remote, "readme"), []byte("read me\n"), 0o644)
	os.Mkdir(filepath.Join(remote, "dir"), 0o755)
	local := t.TempDir()
	sftp := func(commands string) testenv.Result {
		batch := filepath.Join(local, "batch")
		os.WriteFile(batch, []byte(commands), 0o600)
		return f.client.Run(nil, "sftp", "-J", "bastion", "-b", batch, f.login+"@web1")
	}
	res := sftp("cd " + remote + "\nls\nget readme " + local + "/got\npwd\n")
	if res.Exit != 0 || !strings.Contains(string(res.Stdout), "readme") {
		t.Fatalf("reads under read-only sftp: %v %q", res, res.Stdout)
	}
	if got, _ := os.ReadFile(local + "/got"); string(got) != "read me\n" {
		t.Fatalf("get: %q", got)
	}
	// Each write is refused, and nothing changes on the VM.
	for _, cmd := range []string{"put " + local + "/got " + remote + "/new", "rm " + remote + "/readme", "mkdir " + remote + "/made",
		"rename " + remote + "/readme " + remote + "/moved", "rmdir " + remote + "/dir", "chmod 777 " + remote + "/readme"} {
		res := sftp(cmd + "\n")
		if res.Exit == 0 || !strings.Contains(strings.ToLower(res.Stderr), "permission denied") {
			t.Errorf("%s under read-only sftp: %v", cmd, res)
		}
	}
	entries, _ := os.ReadDir(remote)
	if len(entries) != 2 {
		t.Fatalf("the VM's files changed: %v", entries)
	}
	if info, _ := os.Stat(filepath.Join(remote, "readme")); info.Mode().Perm() != 0o644 {
		t.Fatalf("mode changed: %v", info.Mode())
	}
	// Each refusal is in the trail, with the path.
	var refused []string
	for _, e := range f.audit.of(audit.Denied) {
		if e.Channel == "sftp" && strings.HasPrefix(e.Reason, "sftp is read-only: ") {
			refused = append(refused, strings.TrimSuffix(strings.TrimPrefix(e.Reason, "sftp is read-only: "), " refused")+" "+e.Detail)
		}
	}
	if !slices.Contains(refused, "Put "+remote+"/new") || !slices.Contains(refused, "Remove "+remote+"/readme") || len(refused) < 6 {
		t.Fatalf("denied events of read-only sftp: %q", refused)
	}
}

func TestReloadEndsOnlyWhatItForbids(t *testing.T) {
	f := newFixture(t)
	marker := t.TempDir() + "/started"
	run := func() chan testenv.Result {
		done := make(chan testenv.Result, 1)
		os.Remove(marker)
		go func() { done <- f.jump(nil, "touch "+marker+"; sleep 3; echo finished") }()
		waitFor(t, func() bool { return fileExists(marker) }, func() string { return "the session never started" })
		return done
	}

	// A reload that still allows the session leaves it alone.
	done := run()
	kept := f.devRule()
	kept.Name = "dev-renamed"
	f.rules(kept)
	if res := <-done; res.Exit != 0 || string(res.Stdout) != "finished\n" {
		t.Fatalf("a reload that allows the session cut it: %v %q", res, res.Stdout)
	}

	// One that forbids it ends it, with a message.
	done = run()
	f.rules(policy.Rule{Name: "nobody", Effect: policy.Allow, Accounts: []string{"bob"}, VMs: []string{"*"}, Logins: []string{"*"}})
	res := <-done
	if res.Exit != 255 || !strings.Contains(res.Stderr, "bastion: web1: access ended by a policy change") || strings.Contains(string(res.Stdout), "finished") {
		t.Fatalf("a reload that forbids the session: %v %q", res, res.Stdout)
	}
	if _, ok := f.audit.find("ended", "policy change"); !ok {
		t.Fatal("no audit event for the ended session")
	}
}

func TestMaxSessionLength(t *testing.T) {
	f := newFixture(t)
	rule := f.devRule()
	rule.MaxTime = 1500 * time.Millisecond
	f.rules(rule)
	res := f.jump(nil, "sleep 20; echo finished")
	if res.Exit != 255 || !strings.Contains(res.Stderr, "session time limit (1.5s) reached") || strings.Contains(string(res.Stdout), "finished") {
		t.Fatalf("past max_session: %v %q", res, res.Stdout)
	}
}

func port(addr string) uint32 {
	_, p, _ := strings.Cut(addr, ":")
	var n uint32
	for _, c := range p {
		n = n*10 + uint32(c-'0')
	}
	return n
}

// TestMaxSessionComesFromTheRuleThatAllowsTheChannel: a forwarding rule
// with no limit, listed first, does not lift the limit of the rule that
// allows shells and commands.
func TestMaxSessionComesFromTheRuleThatAllowsTheChannel(t *testing.T) {
	f := newFixture(t)
	forwards := policy.Rule{Name: "forwards", Effect: policy.Allow, Groups: []string{"dev"}, VMs: []string{"web*"},
		Logins: []string{f.login}, Channels: []policy.Channel{policy.LocalForward}}
	sessions := f.devRule()
	sessions.Channels = []policy.Channel{policy.Shell, policy.Exec}
	sessions.MaxTime = 1500 * time.Millisecond
	f.rules(forwards, sessions)
	res := f.jump(nil, "sleep 20; echo finished")
	if res.Exit != 255 || !strings.Contains(res.Stderr, "session time limit (1.5s) reached") || strings.Contains(string(res.Stdout), "finished") {
		t.Fatalf("a command under a 1.5s rule, a limitless forwarding rule listed first: %v %q", res, res.Stdout)
	}
	if _, ok := f.audit.find(audit.Ended, "time limit 1.5s"); !ok {
		t.Error("no audit event for the limit")
	}
}

// TestSessionEndsWhenItsTimeWindowCloses: a time window that closes ends
// the sessions it allowed, without a reload.
func TestSessionEndsWhenItsTimeWindowCloses(t *testing.T) {
	f := newFixture(t, func(s *bastion.Server) { s.PolicyTick = time.Second })
	now := time.Now().UTC()
	since := time.Duration(now.Hour())*time.Hour + time.Duration(now.Minute())*time.Minute + time.Duration(now.Second())*time.Second
	if since > 24*time.Hour-10*time.Second {
		time.Sleep(15 * time.Second) // not across midnight
		now = time.Now().UTC()
		since = time.Duration(now.Hour())*time.Hour + time.Duration(now.Minute())*time.Minute + time.Duration(now.Second())*time.Second
	}
	rule := f.devRule()
	rule.Window = &policy.Window{From: 0, To: since + 3*time.Second, Zone: time.UTC}
	f.rules(rule)
	s := f.startSession(t, "-J", "bastion", f.login+"@web1", "echo started; sleep 30; echo finished")
	if code := s.ended(t); code != 255 || !strings.Contains(s.stderr.String(), "access ended by a policy change") {
		t.Fatalf("after its window closed: exit %d, stderr %q", code, s.stderr.String())
	}
	if _, ok := f.audit.find(audit.Ended, "policy change"); !ok {
		t.Error("no audit event")
	}
}

// TestPolicyForwardHostSpellingsOfLoopback checks that the policy judges
// the address the VM connects to, not the text the client sent: the
// default rule (the VM's loopback) lets a hexadecimal spelling of
// 127.0.0.1 through, and a deny rule on 127.0.0.0/8 stops every spelling.
func TestPolicyForwardHostSpellingsOfLoopback(t *testing.T) {
	f := newFixture(t)
	echo := startEcho(t)
	echoPort := fmt.Sprint(port(echo.addr))

	// The fixture's rule names no forward hosts: loopback in every form.
	local := testenv.FreeAddr(t)
	f.background("-N", "-o", "ExitOnForwardFailure=yes", "-J", "bastion", "-L", local+":0x7f000001:"+echoPort, f.login+"@web1")
	testenv.WaitListening(t, local)
	testenv.EchoThrough(t, testenv.Dial(t, local))
	reached := echo.count()
	if reached == 0 {
		t.Fatal("the echo server saw no connection through -L to 0x7f000001")
	}

	anywhere := f.devRule()
	anywhere.ForwardHosts = []string{"*"}
	deny := policy.Rule{Name: "no-loopback", Effect: policy.Deny, Channels: []policy.Channel{policy.LocalForward}, ForwardHosts: []string{"127.0.0.0/8"}}
	f.rules(anywhere, deny)
	var args []string
	var locals []string
	for _, host := range []string{"2130706433", "127.1", "LOCALHOST", "[::ffff:127.0.0.1]"} {
		l := testenv.FreeAddr(t)
		locals = append(locals, l)
		args = append(args, "-L", l+":"+host+":"+echoPort)
	}
	stderr := f.background(append(append([]string{"-N", "-J", "bastion"}, args...), f.login+"@web1")...)
	for i, l := range locals {
		testenv.WaitListening(t, l)
		c := testenv.Dial(t, l)
		c.SetDeadline(time.Now().Add(30 * time.Second))
		c.Write([]byte("x")) // echoed back if the forward went through
		if n, _ := c.Read(make([]byte, 1)); n != 0 {
			t.Fatalf("-L %s reached the echo server under a deny on 127.0.0.0/8", args[2*i+1])
		}
		c.Close()
	}
	waitFor(t, func() bool {
		return strings.Count(stderr.String(), "local-forward denied by policy") >= 2*len(locals)
	}, func() string { return "ssh did not report every open as denied: " + stderr.String() })
	if n := echo.count(); n != reached {
		t.Fatalf("the echo server saw %d connections under the deny rule", n-reached)
	}
	if e, ok := f.audit.find("denied", "deny rule"); !ok || e.Rule != "no-loopback" {
		t.Fatalf("audit: %+v", e)
	}
}

package policy

import (
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/bastionvm/bastion/vm"
)

var update = flag.Bool("update", false, "rewrite golden files")

func load(t testing.TB) *Policy {
	t.Helper()
	data, err := os.ReadFile("testdata/policy.toml")
	if err != nil {
		t.Fatal(err)
	}
	p, err := Parse("testdata/policy.toml", data, true)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

var (
	web1   = vm.Domain{Name: "web1", UUID: "11111111-1111-1111-1111-111111111111", URI: "qemu:///system", Labels: map[string]string{"env": "staging"}}
	webPrd = vm.Domain{Name: "web-prod", URI: "qemu:///system", Labels: map[string]string{"env": "prod"}}
	db1    = vm.Domain{Name: "db1", URI: "qemu+ssh://kvm2/system"}
	batch  = vm.Domain{Name: "b1", UUID: "0f8fad5b-d9cb-469f-a165-70867728950e"}
	office = netip.MustParseAddr("10.1.2.3")
	home   = netip.MustParseAddr("192.0.2.7")
	// Wednesday 2026-11-25, 10:00 in Berlin (09:00 UTC), and 20:00.
	workday = time.Date(2026, 11, 25, 9, 0, 0, 0, time.UTC)
	evening = time.Date(2026, 11, 25, 19, 0, 0, 0, time.UTC)
	sunday  = time.Date(2026, 11, 29, 9, 0, 0, 0, time.UTC)
)

func TestDecide(t *testing.T) {
	p := load(t)
	dev := func(d vm.Domain, login string, ch Channel) Request {
		return Request{Account: "carol", Groups: []string{"dev"}, Source: home, VM: d, Login: login, Channel: ch, Time: workday}
	}
	fwd := func(host string, port uint32) Request {
		r := dev(web1, "dev", LocalForward)
		r.Host, r.Port = host, port
		return r
	}
	auditor := func(ch Channel, cmd string) Request {
		return Request{Account: "ann", Groups: []string{"auditors"}, Source: home, VM: db1, Login: "audit", Channel: ch, Command: cmd, Time: workday}
	}
	ops := func(source netip.Addr, at time.Time) Request {
		return Request{Account: "oscar", Groups: []string{"ops"}, Source: source, VM: db1, Login: "postgres", Channel: Shell, Time: at}
	}
	for _, tc := range []struct {
		name     string
		req      Request
		rule     string
		allow    bool
		reason   error
		readOnly bool
	}{
		{"group, glob, login, channel", dev(web1, "dev", Shell), "dev-web", true, nil, false},
		{"login not listed", dev(web1, "postgres", Shell), "", false, ErrNoRule, false},
		{"vm outside glob", dev(db1, "dev", Shell), "", false, ErrNoRule, false},
		{"channel not listed", dev(web1, "dev", RemoteForward), "", false, ErrNoRule, false},
		{"deny beats allow: root on a prod label", dev(webPrd, "root", Shell), "no-prod-root", false, ErrDenyRule, false},
		{"deny stops connect", Request{Account: "carol", Groups: []string{"dev"}, VM: webPrd, Login: "root", Channel: Connect, Time: workday}, "no-prod-root", false, ErrDenyRule, false},
		{"the same rule allows dev on prod", dev(webPrd, "dev", Shell), "dev-web", true, nil, false},
		{"group deny on one channel", Request{Account: "cid", Groups: []string{"contractors"}, VM: web1, Login: "dev", Channel: SFTP, Time: workday}, "contractors-no-sftp", false, ErrDenyRule, false},
		{"group deny leaves other channels", Request{Account: "cid", Groups: []string{"contractors"}, VM: web1, Login: "dev", Channel: Shell, Time: workday}, "dev-web", true, nil, false},
		{"group deny does not stop connect", Request{Account: "cid", Groups: []string{"contractors"}, VM: web1, Login: "dev", Channel: Connect, Time: workday}, "dev-web", true, nil, false},
		{"forward to the VM's loopback in range", fwd("localhost", 8080), "dev-web", true, nil, false},
		{"forward to a listed single port", fwd("127.0.0.1", 5432), "dev-web", true, nil, false},
		{"forward outside the ranges", fwd("localhost", 22), "", false, ErrNoRule, false},
		{"forward off the VM's loopback", fwd("10.0.0.5", 8080), "", false, ErrNoRule, false},
		{"sftp-read gives read-only sftp", auditor(SFTP, ""), "auditors-read", true, nil, true},
		{"exec matching a pattern", auditor(Exec, "journalctl -u nginx --since today"), "auditors-read", true, nil, false},
		{"exec outside the patterns", auditor(Exec, "rm -rf /var/log"), "", false, ErrNoRule, false},
		{"pattern star spans slashes", auditor(Exec, "systemctl status /etc/x"), "auditors-read", true, nil, false},
		{"source inside, window open", ops(office, workday), "ops-office-hours", true, nil, false},
		{"source outside", ops(home, workday), "", false, ErrNoRule, false},
		{"window closed in the evening", ops(office, evening), "", false, ErrNoRule, false},
		{"window closed on sunday", ops(office, sunday), "", false, ErrNoRule, false},
		{"hypervisor glob", Request{Account: "oscar", Groups: []string{"ops"}, Source: office, VM: web1, Login: "x", Channel: Shell, Time: workday}, "", false, ErrNoRule, false},
		{"uuid, case-insensitive, window over midnight", Request{Account: "batch", VM: batch, Login: "batch", Channel: Exec, Time: time.Date(2026, 11, 25, 23, 30, 0, 0, time.UTC)}, "night-batch", true, nil, false},
		{"after midnight, next day", Request{Account: "batch", VM: batch, Login: "batch", Channel: Exec, Time: time.Date(2026, 11, 26, 5, 59, 0, 0, time.UTC)}, "night-batch", true, nil, false},
		{"midnight window closed at noon", Request{Account: "batch", VM: batch, Login: "batch", Channel: Exec, Time: time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)}, "", false, ErrNoRule, false},
		{"connect with any login", Request{Account: "carol", Groups: []string{"dev"}, VM: web1, Channel: Connect, Time: workday}, "dev-web", true, nil, false},
		{"nobody", Request{Account: "mallory", VM: web1, Login: "dev", Channel: Shell, Time: workday}, "", false, ErrNoRule, false},
	} {
		d := p.Decide(tc.req)
		if d.Allow != tc.allow || d.Rule != tc.rule || d.ReadOnly != tc.readOnly {
			t.Errorf("%s: got %+v, want allow=%v rule=%q readOnly=%v", tc.name, d, tc.allow, tc.rule, tc.readOnly)
		}
		if tc.reason != nil && !strings.Contains(d.Reason, tc.reason.Error()) {
			t.Errorf("%s: reason %q, want %v", tc.name, d.Reason, tc.reason)
		}
	}
	if d := p.Decide(dev(web1, "dev", Shell)); d.MaxTime != 8*time.Hour {
		t.Errorf("max_session: %v", d.MaxTime)
	}
	rec, err := Parse("p.toml", []byte("[[rule]]\ngroups = [\"dev\"]\nvms = [\"*\"]\nlogins = [\"*\"]\nrecord = \"input\"\nrecord_exec = true\n"), true)
	if err != nil {
		t.Fatal(err)
	}
	if d := rec.Decide(dev(web1, "dev", Shell)); !d.Allow || d.Record != "input" || !d.RecordExec {
		t.Errorf("record: %+v", d)
	}
	if d := (&Policy{}).Decide(dev(web1, "dev", Shell)); d.Allow {
		t.Error("an empty policy allowed a request")
	}
}

func TestLogins(t *testing.T) {
	p := load(t)
	got := p.Logins("carol", []string{"dev"}, home, webPrd, workday)
	if strings.Join(got, ",") != "dev" {
		t.Fatalf("logins for carol on web-prod: %v (root is denied there)", got)
	}
	got = p.Logins("oscar", []string{"ops"}, office, db1, workday)
	if strings.Join(got, ",") != "*" {
		t.Fatalf("logins for oscar on db1: %v", got)
	}
}

// TestPossible: whether a rule could ever allow remote forwarding, agent
// or X11 to a person on a VM as a login, whatever the time; what the
// bastion asks before it lets a link share an upstream connection.
func TestPossible(t *testing.T) {
	p := load(t)
	connection := []Channel{RemoteForward, Agent, X11}
	for _, tc := range []struct {
		name  string
		r     Request
		kinds []Channel
		want  bool
	}{
		{"dev rule allows neither", Request{Account: "carol", Groups: []string{"dev"}, Source: home, VM: web1, Login: "dev"}, connection, false},
		{"dev rule allows local forwards", Request{Account: "carol", Groups: []string{"dev"}, Source: home, VM: web1, Login: "dev"}, []Channel{LocalForward}, true},
		{"ops at night still could (the window is not read)", Request{Account: "oscar", Groups: []string{"ops"}, Source: office, VM: db1, Login: "postgres", Time: evening}, connection, true},
		{"ops: agent alone", Request{Account: "oscar", Groups: []string{"ops"}, Source: office, VM: db1, Login: "any"}, []Channel{Agent}, true},
		{"ops: X11 alone is in no rule", Request{Account: "oscar", Groups: []string{"ops"}, Source: office, VM: db1, Login: "any"}, []Channel{X11}, false},
		{"ops from outside its sources", Request{Account: "oscar", Groups: []string{"ops"}, Source: home, VM: db1, Login: "postgres"}, connection, false},
		{"ops on a local hypervisor", Request{Account: "oscar", Groups: []string{"ops"}, Source: office, VM: web1, Login: "postgres"}, connection, false},
		{"another group", Request{Account: "carol", Groups: []string{"dev"}, Source: office, VM: db1, Login: "postgres"}, connection, false},
		{"no kinds", Request{Account: "oscar", Groups: []string{"ops"}, Source: office, VM: db1, Login: "postgres"}, nil, false},
	} {
		if got := p.Possible(tc.r, tc.kinds...); got != tc.want {
			t.Errorf("%s: Possible = %v, want %v", tc.name, got, tc.want)
		}
	}
	// Deny rules are not weighed: a deny of everything on prod for root
	// leaves an allow rule's answer standing.
	deny := &Policy{Rules: []Rule{
		{Name: "no", Effect: Deny, Logins: []string{"root"}},
		{Name: "yes", Effect: Allow, Logins: []string{"root"}, Channels: []Channel{X11}},
	}}
	if !deny.Possible(Request{Account: "a", VM: web1, Login: "root"}, X11) {
		t.Error("Possible weighed a deny rule")
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct{ name, toml, want string }{
		{"unknown key", "[[rule]]\nname = \"a\"\neffect = \"deny\"\nvm = [\"x\"]\n", "p.toml:4: unknown key rule.vm"},
		{"unknown top-level", "[[rules]]\nname = \"a\"\n", "p.toml:1: unknown key rules"},
		{"wrong type", "[[rule]]\nname = \"a\"\nlogins = \"root\"\n", "p.toml:3: rule.logins: incompatible types"},
		{"bad effect", "\n[[rule]]\nname = \"a\"\neffect = \"maybe\"\n", `p.toml:2: rule a: invalid rule: effect "maybe"`},
		{"allow without subject", "[[rule]]\nname = \"a\"\nvms = [\"*\"]\nlogins = [\"root\"]\n", "p.toml:1: rule a: invalid rule: an allow rule must name accounts or groups"},
		{"allow without vms", "[[rule]]\nname = \"a\"\ngroups = [\"g\"]\nlogins = [\"root\"]\n", "must select VMs"},
		{"allow without logins", "[[rule]]\nname = \"a\"\ngroups = [\"g\"]\nvms = [\"*\"]\n", "must name logins"},
		{"unknown channel", "[[rule]]\nname = \"a\"\neffect = \"deny\"\n[[rule]]\nname = \"b\"\neffect = \"deny\"\nchannels = [\"telnet\"]\n", `p.toml:4: rule b: invalid rule: unknown channel "telnet"`},
		{"bad port", "[[rule]]\neffect = \"deny\"\nforward_ports = [\"80-20\"]\n", `p.toml:1: rule #1: invalid rule: forward_ports: "80-20"`},
		{"bad source", "[[rule]]\neffect = \"deny\"\nsources = [\"10.0.0.0/33\"]\n", `sources: "10.0.0.0/33"`},
		{"bad zone", "[[rule]]\neffect = \"deny\"\ntime = { zone = \"Mars/Olympus\" }\n", `time: zone "Mars/Olympus"`},
		{"bad day", "[[rule]]\neffect = \"deny\"\ntime = { days = [\"someday\"] }\n", `day "someday"`},
		{"bad clock", "[[rule]]\neffect = \"deny\"\ntime = { from = \"8am\" }\n", `"8am" is not a time`},
		{"bad max_session", "[[rule]]\neffect = \"deny\"\nmax_session = \"forever\"\n", `max_session "forever"`},
		{"bad record", "[[rule]]\ngroups = [\"dev\"]\nvms = [\"*\"]\nlogins = [\"*\"]\nrecord = \"all\"\n", `record "all" is not "none", "output" or "input"`},
		{"record on deny", "[[rule]]\neffect = \"deny\"\nrecord_exec = true\n", "record and record_exec apply to allow rules"},
		{"duplicate names", "[[rule]]\nname = \"a\"\neffect = \"deny\"\n[[rule]]\nname = \"a\"\neffect = \"deny\"\n", "p.toml:4: rule a: the name is taken by the rule at line 1"},
		{"commands without exec", "[[rule]]\neffect = \"deny\"\nchannels = [\"shell\"]\ncommands = [\"ls\"]\n", "commands apply to exec and scp"},
	} {
		_, err := Parse("p.toml", []byte(tc.toml), true)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want %q", tc.name, err, tc.want)
		}
		if err != nil && tc.name != "unknown key" && tc.name != "unknown top-level" && tc.name != "wrong type" && !errors.Is(err, ErrInvalid) && !strings.Contains(err.Error(), "taken") {
			t.Errorf("%s: %v does not wrap ErrInvalid", tc.name, err)
		}
	}
	// In the main configuration other tables are someone else's.
	if _, err := Parse("bastion.toml", []byte("[server]\nlisten = \"x\"\n[[rule]]\neffect = \"deny\"\n"), false); err != nil {
		t.Errorf("embedded policy: %v", err)
	}
}

func TestGlob(t *testing.T) {
	for _, tc := range []struct {
		pattern, s string
		want       bool
	}{
		{"*", "", true}, {"*", "a/b c", true}, {"web*", "web1", true}, {"web*", "db1", false},
		{"journalctl *", "journalctl -u x", true}, {"journalctl *", "journalctl", false},
		{"a?c", "abc", true}, {"a?c", "ac", false}, {"*a*b*", "xxaxxbxx", true}, {"*a*b", "ab a", false},
		{"**", "x", true}, {"a*", "a", true}, {"", "", true}, {"", "a", false},
	} {
		if got := Glob(tc.pattern, tc.s); got != tc.want {
			t.Errorf("Glob(%q, %q) = %v", tc.pattern, tc.s, got)
		}
	}
}

// TestExplainGolden checks what `bastion policy test` prints.
func TestExplainGolden(t *testing.T) {
	p := load(t)
	var b strings.Builder
	for _, r := range []Request{
		{Account: "carol", Groups: []string{"dev"}, VM: web1, Login: "dev", Channel: Shell, Time: workday},
		{Account: "carol", Groups: []string{"dev"}, VM: webPrd, Login: "root", Channel: Shell, Time: workday},
		{Account: "ann", Groups: []string{"auditors"}, VM: db1, Login: "audit", Channel: SFTP, Time: workday},
		{Account: "mallory", VM: web1, Login: "root", Channel: Exec, Command: "id", Time: workday},
		{Account: "ann", Groups: []string{"auditors"}, VM: db1, Login: "audit", Channel: Exec, Command: "systemctl status nginx", Time: workday},
		{Account: "ann", Groups: []string{"auditors"}, VM: db1, Login: "audit", Channel: Exec, Command: "systemctl status nginx; id", Time: workday},
		{Account: "ann", Groups: []string{"auditors"}, VM: db1, Login: "audit", Channel: SCP, Command: "scp -f /etc/passwd; id", Time: workday},
		{Account: "oscar", Groups: []string{"ops"}, Source: office, VM: db1, Login: "root", Channel: Exec, Command: "scp -v -f /etc/hostname", Time: workday},
	} {
		b.WriteString(p.Explain(r))
		b.WriteString("\n")
	}
	golden(t, "testdata/explain.golden", b.String())
}

func golden(t *testing.T, path, got string) {
	t.Helper()
	if *update {
		os.WriteFile(path, []byte(got), 0o644)
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Fatalf("%s differs:\n--- got\n%s--- want\n%s", path, got, want)
	}
}

func FuzzParse(f *testing.F) {
	data, _ := os.ReadFile("testdata/policy.toml")
	f.Add(data)
	f.Add([]byte("[[rule]]\nname=\"a\"\ngroups=[\"g\"]\nvms=[\"*\"]\nlogins=[\"root\"]\n"))
	f.Add([]byte("[[rule]]\neffect=\"deny\"\ntime={from=\"22:00\",to=\"06:00\",days=[\"fri-mon\"]}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse("fuzz.toml", data, true)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "fuzz.toml") {
				t.Fatalf("error without the file name: %v", err)
			}
			return
		}
		// Whatever parsed must decide without panicking, and an allow rule
		// always names someone.
		for _, r := range p.Rules {
			if r.Effect == Allow && len(r.Accounts) == 0 && len(r.Groups) == 0 {
				t.Fatalf("allow rule %s names nobody", r.Name)
			}
		}
		p.Decide(Request{Account: "a", Groups: []string{"g"}, VM: vm.Domain{Name: "x"}, Login: "root", Channel: Shell, Time: workday})
	})
}

// BenchmarkDecide1000Rules decides against 1,000 rules, most not matching,
// the deciding one last.
func BenchmarkDecide1000Rules(b *testing.B) {
	p := &Policy{}
	for i := 0; i < 999; i++ {
		p.Rules = append(p.Rules, Rule{Name: fmt.Sprintf("r%d", i), Effect: Allow, Groups: []string{fmt.Sprintf("team%d", i)},
			VMs: []string{fmt.Sprintf("svc%d-*", i)}, Logins: []string{"dev"}, Channels: []Channel{Shell, Exec}})
		if i%10 == 0 {
			p.Rules = append(p.Rules[:len(p.Rules)-1], Rule{Name: fmt.Sprintf("d%d", i), Effect: Deny, Groups: []string{fmt.Sprintf("team%d", i)}, Logins: []string{"root"}})
		}
	}
	p.Rules = append(p.Rules, Rule{Name: "last", Effect: Allow, Groups: []string{"dev"}, VMs: []string{"web*"}, Logins: []string{"dev"}})
	r := Request{Account: "carol", Groups: []string{"dev", "ops"}, Source: home, VM: web1, Login: "dev", Channel: Shell, Time: workday}
	if d := p.Decide(r); !d.Allow || d.Rule != "last" {
		b.Fatalf("%+v", d)
	}
	b.ReportAllocs()
	for b.Loop() {
		p.Decide(r)
	}
}

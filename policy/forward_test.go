package policy

import (
	"errors"
	"strings"
	"testing"

	"github.com/bastionvm/bastion/vm"
)

// These tests use only Parse and Decide, the way the bastion asks.

// forwardPolicy parses rules written for alice (group dev) on web1.
func forwardPolicy(t *testing.T, rules string) *Policy {
	t.Helper()
	p, err := Parse("fwd.toml", []byte(rules), true)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

const allowAnyForward = `
[[rule]]
name = "any"
groups = ["dev"]
vms = ["web*"]
logins = ["dev"]
channels = ["local-forward", "remote-forward"]
forward_hosts = ["*"]
`

func forwardTo(ch Channel, host string) Request {
	return Request{Account: "alice", Groups: []string{"dev"}, VM: vm.Domain{Name: "web1"}, Login: "dev",
		Channel: ch, Host: host, Port: 8080, Time: workday}
}

// loopbackSpellings are ways to write the VM's loopback that a comparison
// of text lets past a rule about 127.0.0.1 or localhost.
var loopbackSpellings = []string{
	"127.0.0.1", "2130706433", "0x7f000001", "0X7F000001", "0177.0.0.1", "0177.0.0.01", "127.1", "127.0.1",
	"0x7f.1", "0x7f.0.0.1", "127.255.255.254", "localhost", "LOCALHOST", "LocalHost", "localhost.", "web.localhost",
	"::1", "[::1]", "0:0:0:0:0:0:0:1", "::ffff:127.0.0.1", "[::ffff:127.0.0.1]", "::FFFF:7F00:1", "::1%lo",
	"0", "00", "0.0.0.0", "0x0", "::", "[::]", "::ffff:0.0.0.0",
}

func TestDenyLoopbackPrefixHoldsForEverySpelling(t *testing.T) {
	for _, entry := range []string{"127.0.0.0/8", "127.0.0.1", "::1", "localhost"} {
		p := forwardPolicy(t, allowAnyForward+`
[[rule]]
name = "no-loopback"
effect = "deny"
channels = ["local-forward", "remote-forward"]
forward_hosts = ["`+entry+`"]
`)
		for _, ch := range []Channel{LocalForward, RemoteForward} {
			for _, host := range loopbackSpellings {
				if d := p.Decide(forwardTo(ch, host)); d.Allow || d.Rule != "no-loopback" {
					t.Errorf("deny %s, %s to %q: %+v", entry, ch, host, d)
				}
			}
			if d := p.Decide(forwardTo(ch, "10.0.0.5")); !d.Allow {
				t.Errorf("deny %s, %s to 10.0.0.5: %+v", entry, ch, d)
			}
		}
	}
}

func TestDefaultForwardHostsAllowLoopbackInEveryFormOnly(t *testing.T) {
	p := forwardPolicy(t, `
[[rule]]
name = "loopback"
groups = ["dev"]
vms = ["web*"]
logins = ["dev"]
channels = ["local-forward"]
`)
	for _, host := range loopbackSpellings {
		switch host {
		case "localhost.", "web.localhost":
			continue // below: the VM's resolver may send these to DNS
		}
		if d := p.Decide(forwardTo(LocalForward, host)); !d.Allow {
			t.Errorf("%q: %+v", host, d)
		}
	}
	for _, host := range []string{"10.0.0.5", "128.0.0.1", "0x80000001", "::2", "::ffff:10.0.0.5", "localhost.", "web.localhost",
		"localhost.example", "127.0.0.1.nip.io", "example.com"} {
		if d := p.Decide(forwardTo(LocalForward, host)); d.Allow {
			t.Errorf("%q allowed by the loopback default: %+v", host, d)
		}
	}
}

func TestPartialAddressGlobRefusedAtParse(t *testing.T) {
	for _, tc := range []struct{ entry, want string }{
		{"10.0.*", `fwd.toml:3: rule r: invalid rule: forward_hosts: "10.0.*" looks like part of an IP address, but a glob matches only names, never addresses: write a CIDR prefix such as "10.0.0.0/16"`},
		{"192.168.1.*", `"192.168.1.0/24"`},
		{"10.*", `"10.0.0.0/8"`},
		{"10.0.0.?", "looks like part of an IP address"},
		{"*.0.1", "looks like part of an IP address"},
		{"fe80::*", "not an IPv6 address or prefix"},
		{"10.0.0.0/33", "not a CIDR prefix"},
		{"127.1", `write "127.0.0.1"`},
		{"0x7f000001", `write "127.0.0.1"`},
		{"010.0.0.1", `write "8.0.0.1"`},
		{"10.0.0.256", "not an address, a CIDR prefix or a host name"},
		{"fe80::1%eth0", "without its zone"},
		{"db;example.com", "a name glob is letters"},
		{"", "not an address, a CIDR prefix or a host name"},
	} {
		_, err := Parse("fwd.toml", []byte("\n\n[[rule]]\nname = \"r\"\neffect = \"deny\"\nforward_hosts = [\""+tc.entry+"\"]\n"), true)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "fwd.toml:3: ") || !errors.Is(err, ErrInvalid) {
			t.Errorf("forward_hosts = [%q]: %v, want %q", tc.entry, err, tc.want)
		}
	}
	for _, ok := range []string{"10.0.0.0/16", "::1/128", "127.0.0.1", "[::1]", "::ffff:10.0.0.0/104", "*", "localhost", "db.example.com", "*.example.com", "DB-?.Example.COM."} {
		if _, err := Parse("fwd.toml", []byte("[[rule]]\neffect = \"deny\"\nforward_hosts = [\""+ok+"\"]\n"), true); err != nil {
			t.Errorf("forward_hosts = [%q]: %v", ok, err)
		}
	}
}

func TestPrefixAllowsAddressesNotNames(t *testing.T) {
	p := forwardPolicy(t, `
[[rule]]
name = "net"
groups = ["dev"]
vms = ["web*"]
logins = ["dev"]
channels = ["local-forward"]
forward_hosts = ["10.0.0.0/16", "::ffff:192.168.7.0/120", "*.internal.example"]
`)
	for _, tc := range []struct {
		host  string
		allow bool
	}{
		{"10.0.3.4", true}, {"10.0.255.255", true}, {"10.3.4", false}, {"10.0.772", true}, {"0xa000304", true}, {"::ffff:10.0.3.4", true},
		{"192.168.7.9", true}, {"[::ffff:192.168.7.9]", true},
		{"10.1.0.1", false}, {"10.0.attacker.example", false}, {"10.0.3.4.attacker.example", false},
		{"db.internal.example", true}, {"DB.Internal.Example.", true}, {"10.0.0.1.internal.example", true},
		{"internal.example", false}, {"127.0.0.1", false}, {"localhost", false},
	} {
		if d := p.Decide(forwardTo(LocalForward, tc.host)); d.Allow != tc.allow {
			t.Errorf("%q: %+v, want allow=%v", tc.host, d, tc.allow)
		}
	}
}

func TestNameGlobNeverMatchesAddresses(t *testing.T) {
	// A rule built in code, not parsed, with the glob Parse refuses: it
	// matches no address and no name it was not written for.
	p := &Policy{Rules: []Rule{{Name: "old", Effect: Allow, Groups: []string{"dev"}, VMs: []string{"web*"}, Logins: []string{"dev"},
		Channels: []Channel{LocalForward}, ForwardHosts: []string{"10.0.*", "db*"}}}}
	for _, host := range []string{"10.0.3.4", "10.0.attacker.example", "10.0.0.1"} {
		if d := p.Decide(forwardTo(LocalForward, host)); d.Allow {
			t.Errorf("%q: %+v", host, d)
		}
	}
	if d := p.Decide(forwardTo(LocalForward, "db1")); !d.Allow {
		t.Errorf("db1: %+v", d)
	}
	// In a deny rule an entry that does not compile matches everything.
	p.Rules = append(p.Rules, Rule{Name: "bad-deny", Effect: Deny, Channels: []Channel{LocalForward}, ForwardHosts: []string{"10.0.*"}})
	if d := p.Decide(forwardTo(LocalForward, "db1")); d.Allow || d.Rule != "bad-deny" {
		t.Errorf("db1 under a deny rule that does not compile: %+v", d)
	}
}

func TestInvalidForwardHostRefusedWhateverTheRules(t *testing.T) {
	p := forwardPolicy(t, allowAnyForward)
	long := strings.Repeat("a", 63) + "." + strings.Repeat("b", 63) + "." + strings.Repeat("c", 63) + "." + strings.Repeat("d", 62)
	for _, host := range []string{
		"", " ", "localhost ", " 127.0.0.1", "127.0.0.1\n", "127.0.0.1\x00", "a\tb", "host\x7f", "hôte", "a..b", ".a", "..",
		strings.Repeat("a", 64) + ".example", long, long + ".", "[127.0.0.1]", "[::1", "::1]", "[[::1]]", "a:b", "1.2.3.4:80",
		"fe80::1%", "fe80::1%e/th0", "%lo", "10.0.0.256", "1.2.3.4.5", "08.0.0.1", "127.0.0.1.", "0x7f000001.", "a.123",
		"*", "?", "a*b", "a/b", "a@b", "a,b",
	} {
		d := p.Decide(forwardTo(LocalForward, host))
		if d.Allow || !strings.Contains(d.Reason, ErrBadHost.Error()) {
			t.Errorf("%q: %+v", host, d)
		}
	}
	// A host just short of the limits is a name like another.
	for _, host := range []string{long[:len(long)-1], strings.Repeat("a", 63) + ".example", "_srv.example", "a-b.example"} {
		if d := p.Decide(forwardTo(LocalForward, host)); !d.Allow {
			t.Errorf("%q: %+v", host, d)
		}
	}
	// A deny rule naming hosts matches a host that does not canonicalise.
	p = forwardPolicy(t, allowAnyForward+"[[rule]]\nname = \"d\"\neffect = \"deny\"\nforward_hosts = [\"192.0.2.1\"]\n")
	if d := p.Decide(forwardTo(LocalForward, "a b")); d.Allow || d.Rule != "d" {
		t.Errorf("a deny rule and a bad host: %+v", d)
	}
}

func TestRemoteForwardBindAddresses(t *testing.T) {
	rule := func(hosts string) string {
		return "[[rule]]\nname = \"r\"\ngroups = [\"dev\"]\nvms = [\"web*\"]\nlogins = [\"dev\"]\nchannels = [\"remote-forward\"]\n" + hosts
	}
	everything := []string{"", "*", "0.0.0.0", "0", "::", "[::]", "localhost", "127.0.0.1", "::1", "127.0.0.2", "10.0.0.5", "db.example"}
	for _, tc := range []struct {
		name    string
		hosts   string
		allowed []string
	}{
		// Left out: the VM's loopback, never every address.
		{"default", "", []string{"localhost", "127.0.0.1", "::1", "127.0.0.2"}},
		{"localhost", `forward_hosts = ["localhost"]`, []string{"localhost", "127.0.0.1", "::1", "127.0.0.2"}},
		{"star", `forward_hosts = ["*"]`, everything},
		{"IPv4 wildcard", `forward_hosts = ["0.0.0.0"]`, []string{"0.0.0.0", "0"}},
		{"both wildcards", `forward_hosts = ["0.0.0.0", "::"]`, []string{"", "*", "0.0.0.0", "0", "::", "[::]"}},
		{"a prefix", `forward_hosts = ["10.0.0.0/8"]`, []string{"10.0.0.5"}},
		{"a name", `forward_hosts = ["*.example"]`, []string{"db.example"}},
	} {
		p := forwardPolicy(t, rule(tc.hosts))
		for _, host := range everything {
			want := false
			for _, a := range tc.allowed {
				want = want || a == host
			}
			if d := p.Decide(forwardTo(RemoteForward, host)); d.Allow != want {
				t.Errorf("%s: bind %q: %+v, want allow=%v", tc.name, host, d, want)
			}
		}
	}
	// A bind on every address includes loopback: a deny on loopback
	// stops it; one on another address does not.
	p := forwardPolicy(t, allowAnyForward+"[[rule]]\nname = \"d\"\neffect = \"deny\"\nchannels = [\"remote-forward\"]\nforward_hosts = [\"127.0.0.0/8\"]\n")
	for _, host := range []string{"", "*", "0.0.0.0", "::"} {
		if d := p.Decide(forwardTo(RemoteForward, host)); d.Allow {
			t.Errorf("bind %q under a deny on loopback: %+v", host, d)
		}
	}
	if d := p.Decide(forwardTo(RemoteForward, "10.0.0.5")); !d.Allow {
		t.Errorf("bind 10.0.0.5 under a deny on loopback: %+v", d)
	}
}

// SSH carries ports in 32 bits: one past 65535 is refused whatever the
// rules, before the VM's sshd can wrap it onto a port it would bind.
func TestForwardPortPastRangeRefused(t *testing.T) {
	p := forwardPolicy(t, allowAnyForward)
	for _, ch := range []Channel{LocalForward, RemoteForward} {
		for _, port := range []uint32{65536, 808464432, 1<<32 - 1} {
			r := forwardTo(ch, "127.0.0.1")
			r.Port = port
			if d := p.Decide(r); d.Allow || !strings.Contains(d.Reason, ErrBadPort.Error()) {
				t.Errorf("%s to port %d: %+v", ch, port, d)
			}
		}
		r := forwardTo(ch, "127.0.0.1")
		r.Port = 65535
		if d := p.Decide(r); !d.Allow {
			t.Errorf("%s to port 65535: %+v", ch, d)
		}
	}
}

func socketTo(ch Channel, path string) Request {
	r := forwardTo(ch, "")
	r.Port, r.Socket = 0, path
	return r
}

// TestSocketForwards: forward_sockets globs allow unix-socket forwards
// (VS Code's socket mode, -L/-R with a path) and nothing else does; a path
// in any but its plain form is refused whatever the rules say.
func TestSocketForwards(t *testing.T) {
	p := forwardPolicy(t, allowAnyForward+`
[[rule]]
name = "vscode"
groups = ["dev"]
vms = ["web*"]
logins = ["dev"]
channels = ["local-forward", "remote-forward"]
forward_sockets = ["/run/user/*/vscode-*.sock", "/tmp/dev.sock"]
`)
	for _, tc := range []struct {
		ch    Channel
		path  string
		allow bool
		rule  string
	}{
		{LocalForward, "/run/user/0/vscode-ab12.sock", true, "vscode"},
		{RemoteForward, "/tmp/dev.sock", true, "vscode"},
		{LocalForward, "/run/user/0/sub/vscode-ab12.sock", false, ""}, // * stays within a component
		{LocalForward, "/var/run/docker.sock", false, ""},             // "*" in forward_hosts is about TCP
		{LocalForward, "/run/user/0/../../../var/run/docker.sock", false, ""},
		{LocalForward, "/tmp//dev.sock", false, ""},
		{LocalForward, "tmp/dev.sock", false, ""},
		{LocalForward, "/tmp/dev.sock\n", false, ""},
		{LocalForward, "/" + strings.Repeat("a", 120), false, ""},
	} {
		d := p.Decide(socketTo(tc.ch, tc.path))
		if d.Allow != tc.allow || (tc.allow && d.Rule != tc.rule) {
			t.Errorf("%s to %q: %+v", tc.ch, tc.path, d)
		}
	}
	if d := p.Decide(socketTo(LocalForward, "/tmp/../etc/x.sock")); !strings.Contains(d.Reason, ErrBadSocket.Error()) {
		t.Errorf("a path with ..: %+v", d)
	}

	// A rule with only forward_sockets allows no TCP forward, not even to
	// the loopback that a rule without forward_hosts would.
	p = forwardPolicy(t, `
[[rule]]
name = "sockets-only"
groups = ["dev"]
vms = ["web*"]
logins = ["dev"]
channels = ["local-forward"]
forward_sockets = ["/tmp/*"]
`)
	if d := p.Decide(forwardTo(LocalForward, "127.0.0.1")); d.Allow {
		t.Errorf("a TCP forward under a sockets-only rule: %+v", d)
	}

	// Deny rules: one naming no forward target denies sockets too; one
	// naming forward_hosts is about TCP; one naming forward_sockets only
	// those sockets.
	for _, tc := range []struct {
		deny  string
		path  string
		allow bool
	}{
		{"", "/tmp/dev.sock", false},
		{`forward_hosts = ["10.0.0.0/8"]`, "/tmp/dev.sock", true},
		{`forward_sockets = ["/tmp/dev.sock"]`, "/tmp/dev.sock", false},
		{`forward_sockets = ["/tmp/dev.sock"]`, "/tmp/other.sock", true},
	} {
		p := forwardPolicy(t, `
[[rule]]
name = "sockets"
groups = ["dev"]
vms = ["web*"]
logins = ["dev"]
channels = ["local-forward"]
forward_sockets = ["/tmp/*"]

[[rule]]
name = "no"
effect = "deny"
channels = ["local-forward"]
`+tc.deny+"\n")
		if d := p.Decide(socketTo(LocalForward, tc.path)); d.Allow != tc.allow {
			t.Errorf("deny rule {%s}, %q: %+v", tc.deny, tc.path, d)
		}
	}
	if _, err := Parse("p.toml", []byte("[[rule]]\nname = \"r\"\ngroups = [\"g\"]\nvms = [\"*\"]\nlogins = [\"x\"]\nforward_sockets = [\"tmp/*\"]\n"), true); err == nil ||
		!strings.Contains(err.Error(), "forward_sockets: \"tmp/*\" is not an absolute path glob") {
		t.Errorf("a relative glob: %v", err)
	}
	if _, err := Parse("p.toml", []byte("[[rule]]\nname = \"r\"\ngroups = [\"g\"]\nvms = [\"*\"]\nlogins = [\"x\"]\nforward_sockets = [\"/tmp/[a\"]\n"), true); err == nil ||
		!strings.Contains(err.Error(), "syntax error in pattern") {
		t.Errorf("a bad glob: %v", err)
	}
}

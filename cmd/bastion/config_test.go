package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"
)

func TestExampleConfigIsValid(t *testing.T) {
	c, err := LoadConfig("../../bastion.toml.example")
	if err != nil {
		t.Fatal(err)
	}
	if c.Server.Listen != "127.0.0.1:2222" || len(c.Accounts) != 2 || len(c.policy.Rules) != 4 {
		t.Fatalf("example decoded to %+v", c)
	}
	// The example's ciphers line, commented out (the default depends on
	// the CPU), is valid once uncommented.
	data, err := os.ReadFile("../../bastion.toml.example")
	if err != nil {
		t.Fatal(err)
	}
	uncommented := strings.Replace(string(data), "\n# ciphers = ", "\nciphers = ", 1)
	if uncommented == string(data) {
		t.Fatal("the example has no commented-out ciphers line")
	}
	if c, err := ParseConfig("bastion.toml.example", []byte(uncommented)); err != nil || len(c.Server.ciphers) == 0 {
		t.Fatalf("the example with its ciphers line: %v", err)
	}
	if c.Server.LoginGraceTime.Duration != 120*time.Second || c.Server.MaxStartups.String() != "10:30:100" || c.Server.PerSourceMaxStartups != 10 {
		t.Fatalf("example's pre-authentication limits: %v %v %v", c.Server.LoginGraceTime, c.Server.MaxStartups, c.Server.PerSourceMaxStartups)
	}
}

// TestConfigCiphers: server.ciphers reaches the server as written, and
// its absence leaves the default to the server.
func TestConfigCiphers(t *testing.T) {
	c, err := ParseConfig("bastion.toml", []byte("[server]\nciphers = [\"aes256-gcm@openssh.com\", \"aes128-ctr\"]\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Server.ciphers; !slices.Equal(got, []string{"aes256-gcm@openssh.com", "aes128-ctr"}) {
		t.Errorf("ciphers = %q", got)
	}
	if c, err = ParseConfig("bastion.toml", []byte("[server]\n")); err != nil || c.Server.ciphers != nil {
		t.Errorf("without the key: %q, %v; want nil (the server's default)", c.Server.ciphers, err)
	}
}

func TestConfigErrorsNameFileLineKey(t *testing.T) {
	for _, tc := range []struct {
		name, toml, want string
	}{
		{"unknown key", "[server]\nlisten = \"x:1\"\nlistn = \"y\"\n", "bastion.toml:3: unknown key server.listn"},
		{"unknown key in array table", "[[account]]\nname = \"a\"\n\n[[account]]\nname = \"b\"\nkey = \"k\"\n", "bastion.toml:6: unknown key account.key"},
		{"unknown table", "[servr]\nlisten = 1\n", "bastion.toml:1: unknown key servr"},
		{"wrong type", "[server]\n\nlisten = 22\n", `bastion.toml:3: server.listen: incompatible types: TOML value has type int64; destination has type string`},
		{"wrong type in list", "[[account]]\nname = \"a\"\nkeys = \"ssh-ed25519 AAAA\"\n", "bastion.toml:3: account.keys: incompatible types"},
		{"bad duration", "[server]\ngrace_period = \"5 minutes\"\n", `bastion.toml:2: server.grace_period: not a duration`},
		{"syntax", "[server\n", "bastion.toml:"},
		{"bad key", "[[account]]\nname = \"a\"\nkeys = [\"ssh-ed25519 nonsense\"]\n", `bastion.toml:1: account "a": keys[0]`},
		{"empty host name", "[server]\nhostnames = [\"bastion.example.com\", \"\"]\n", `bastion.toml:2: server.hostnames: "" is not a host name or address`},
		{"host names in one string", "[server]\n\nhostnames = [\"a.example.com,b.example.com\"]\n", `bastion.toml:3: server.hostnames: "a.example.com,b.example.com" is not a host name or address`},
		{"DSA key", "[[account]]\nname = \"a\"\nkeys = [\"" + dsaKey + "\"]\n", `bastion.toml:1: account "a": keys[0]: ssh-dss (DSA) keys are not accepted: use an ed25519, ECDSA or RSA key`},
		{"shared key", "[[account]]\nname = \"a\"\nkeys = [\"" + exampleKey + "\"]\n[[account]]\nname = \"b\"\nkeys = [\"" + exampleKey + "\"]\n",
			`one key maps to one account`},
		{"rule without logins", "[server]\n\n[[rule]]\nname = \"r\"\ngroups = [\"g\"]\nvms = [\"*\"]\n", `bastion.toml:3: rule r: invalid rule: an allow rule must name logins`},
		{"unknown channel", "[[rule]]\nname = \"r\"\ngroups = [\"g\"]\nvms = [\"*\"]\nlogins = [\"root\"]\nchannels = [\"teleport\"]\n", `bastion.toml:1: rule r: invalid rule: unknown channel "teleport"`},
		{"unknown rule key", "[[rule]]\nname = \"r\"\ngroups = [\"g\"]\nvm = [\"*\"]\n", `bastion.toml:4: unknown key rule.vm`},
		{"rules in two places", "[server]\npolicy_file = \"p.toml\"\n[[rule]]\neffect = \"deny\"\n", `bastion.toml:3: [[rule]] tables and server.policy_file both given`},
		{"log level", "[server]\nlog_level = \"loud\"\n", `server.log_level: "loud"`},
		{"max startups", "[server]\n\nmax_startups = \"10:30\"\n", `bastion.toml:3: server.max_startups: "10:30" is not start:rate:full`},
		{"max startups order", "[server]\nmax_startups = \"10:30:5\"\n", `bastion.toml:2: server.max_startups: "10:30:5" is not start:rate:full (like "10:30:100"): full must not be below start`},
		{"negative grace", "[server]\nlogin_grace_time = \"-1s\"\n", `server.login_grace_time: -1s is negative`},
		{"key option", "[server]\n\n[[account]]\nname = \"a\"\nkeys = [\"command=\\\"id\\\" " + exampleKey + "\"]\n", `bastion.toml:3: account "a": keys[0]: option command is not supported on account keys (only from= and expiry-time= are)`},
		{"restrict", "[[account]]\nname = \"a\"\nkeys = [\"restrict " + exampleKey + "\"]\n", `bastion.toml:1: account "a": keys[0]: option restrict is not supported`},
		{"from a name", "[[account]]\nname = \"a\"\nkeys = [\"from=\\\"*.example.com\\\" " + exampleKey + "\"]\n", `bastion.toml:1: account "a": keys[0]: from=: "*.example.com" is not an address`},
		{"bad expiry", "[[account]]\nname = \"a\"\nkeys = [\"expiry-time=\\\"tomorrow\\\" " + exampleKey + "\"]\n", `expiry-time="tomorrow" is not YYYYMMDD`},
		{"no channels", "[server]\nmax_channels = 0\n", `server.max_channels: 0 is not at least 1`},
		{"no checks", "[trust]\nmax_checks = -1\n", `trust.max_checks: -1 is not at least 1`},
		{"no upstream sessions", "[server]\n\nupstream_max_sessions = 0\n", `bastion.toml:3: server.upstream_max_sessions: 0 is not from 1 (no connection shared) to 1000`},
		{"too many upstream sessions", "[server]\nupstream_max_sessions = 100000\n", `bastion.toml:2: server.upstream_max_sessions: 100000 is not from 1 (no connection shared) to 1000`},
		{"negative linger", "[server]\nupstream_linger = \"-1s\"\n", `bastion.toml:2: server.upstream_linger: -1s is not from 0s (closed with its last session) to 10m0s`},
		{"long linger", "[server]\n\n\nupstream_linger = \"1h\"\n", `bastion.toml:4: server.upstream_linger: 1h0m0s is not from 0s (closed with its last session) to 10m0s`},
		{"linger not a duration", "[server]\nupstream_linger = \"soon\"\n", `bastion.toml:2: server.upstream_linger: not a duration`},
		{"upstream sessions not a number", "[server]\nupstream_max_sessions = \"10\"\n", `bastion.toml:2: server.upstream_max_sessions: incompatible types`},
		{"negative per source", "[server]\nper_source_max_startups = -2\n", `server.per_source_max_startups: -2 is negative`},
		{"audit required but off", "[server]\naudit = \"off\"\naudit_required = true\n", `server.audit_required is true but server.audit is "off"`},
		{"small recording cap", "[server]\nrecording_max_bytes = 100\n", `server.recording_max_bytes: 100 is less than 4096`},
		{"relative recordings", "[server]\nrecordings = \"casts\"\n", `server.recordings: "casts" is not an absolute path`},
		{"proxy protocol", "[server]\nproxy_protocol = [\"10.0.0.0/8\", \"lb1.example.com\"]\n", `server.proxy_protocol: "lb1.example.com" is neither a CIDR range nor an address`},
		{"replica", "[server]\nreplica = \"r1\\n\"\n", `server.replica: "r1\n" is not a plain name`},
		{"user ca key", "[[account]]\nname = \"a\"\n\n[[user_ca]]\nkey = \"ssh-ed25519 nonsense\"\n", `bastion.toml:4: user_ca #1: key: `},
		{"user ca principal", "[[account]]\nname = \"a\"\n[[user_ca]]\nkey = \"" + exampleKey + "\"\nprincipals = { \"sso-1\" = \"carol\" }\n",
			`bastion.toml:3: user_ca #1: principals: "sso-1" maps to "carol", which is not an [[account]]`},
		{"unknown cipher", "[server]\nlisten = \"x:1\"\n\nciphers = [\"aes128-gcm@openssh.com\", \"aes128-gmc@openssh.com\"]\n",
			`bastion.toml:4: server.ciphers: "aes128-gmc@openssh.com" is not a cipher the bastion implements (it offers aes128-gcm@openssh.com, aes256-gcm@openssh.com, chacha20-poly1305@openssh.com, aes128-ctr, aes192-ctr, aes256-ctr)`},
		{"insecure cipher", "[server]\nciphers = [\n  \"aes256-ctr\",\n  \"3des-cbc\",\n]\n", `bastion.toml:2: server.ciphers: "3des-cbc" is insecure, never offered`},
		{"no cipher", "[server]\nciphers = []\n", `bastion.toml:2: server.ciphers: no cipher named; leave the key out for the default`},
		{"cipher twice", "[server]\nciphers = [\"aes128-ctr\", \"aes128-ctr\"]\n", `bastion.toml:2: server.ciphers: "aes128-ctr" is named twice`},
		{"cipher not a list", "[server]\nciphers = \"aes128-ctr\"\n", `bastion.toml:2: server.ciphers: incompatible types`},
		{"user ca unknown key", "[[user_ca]]\nkey = \"" + exampleKey + "\"\nprincipal = { }\n", `bastion.toml:3: unknown key user_ca.principal`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConfig("bastion.toml", []byte(tc.toml))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// dsaKey is a DSA public key, made by ssh-keygen -t dsa.
const dsaKey = "ssh-dss AAAAB3NzaC1kc3MAAACBAOONr+MsdUABPVjT7w9Or9AnQnmM5PtAHIxKKzRwEV1QPoiCZMQNSo8aXJ7zG5s0yorX1vl7/d88s9BaRlhqVvDZQnSLMSEBZrD9B1K8PNMO/iWOFxI1MXjg4e/lIazOYIWTbM96fuDzH9+wK32Ww+bRyiXTlZda5dN4QtLSl7rlAAAAFQDXb1n99Hd9KjY30A/wUmRwz9El9QAAAIALtmNvJZzBoadRGiFgiBh9QPh3gF9T9P68WNPn1vaYE6kcEEInvj0wlnBMNMj3PyPd5VBhe8P7BgbqPEG9hOJJ8he+0GNtLnv7guqNk7Pwrxv2iBv7N56FyeX4icO+pF7Eq9JhStWDtwPCIZX7JPzBzMvDfcSg/ahKv2qdfkmMfAAAAIA8hgSmRfCG0uvdFy6RknCqF+oRMn+zxZBev2j2+n0rj9r9zBjffM5N0kK4zwQT5insIFsyeAgX70K4jgFbj6/DmIYn3mBbClzi5fd9YLK/crForneLexxiUUljPHoVtrrY2rInav2vwwejp6wIr0rBeOuzVaYIb/EYUQQ6RwgkUQ== bob@old-laptop"

const exampleKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDYkFTUBOi1yUr7Kp/A1R7niLASGFb2LqPzEb3qnv+o6 alice@laptop"

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte("[server]\nlisten = \"127.0.0.1:2222\"\n"))
	f.Add([]byte("[[account]]\nname = \"a\"\nkeys = [\"" + exampleKey + "\"]\n"))
	f.Add([]byte("[[rule]]\nname=\"r\"\ngroups=[\"g\"]\nvms=[\"web*\"]\nlogins=[\"root\"]\n"))
	f.Add([]byte("[server]\nciphers = [\"aes128-gcm@openssh.com\", \"aes256-ctr\"]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseConfig("fuzz.toml", data)
		if err == nil && c.Server.Listen == "" {
			t.Fatal("accepted a config with no listen address")
		}
		if err != nil && !strings.HasPrefix(err.Error(), "fuzz.toml") {
			t.Fatalf("error does not name the file: %v", err)
		}
	})
}

func TestConfigFileOthersCouldChangeIsRefused(t *testing.T) {
	dir := t.TempDir()
	path := dir + "/bastion.toml"
	if err := os.WriteFile(path, []byte("[server]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadConfig(path); err != nil {
		t.Fatalf("a 0600 file: %v", err)
	}
	os.Chmod(path, 0o666)
	if _, err := LoadConfig(path); err == nil || !strings.Contains(err.Error(), "mode 0666 lets others change it") {
		t.Fatalf("a 0666 file: %v", err)
	}
	os.Chmod(path, 0o620)
	if _, err := LoadConfig(path); err == nil || !strings.Contains(err.Error(), "lets others change it") {
		t.Fatalf("a group-writable file: %v", err)
	}
	os.Chmod(path, 0o600)
	if os.Geteuid() == 0 { // only root can give the file away
		if err := os.Chown(path, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadConfig(path); err == nil || !strings.Contains(err.Error(), "owned by uid 65534") {
			t.Fatalf("a file owned by nobody: %v", err)
		}
	}
}

func TestAuditFileNotThroughASymlink(t *testing.T) {
	dir := t.TempDir()
	target := dir + "/elsewhere"
	os.WriteFile(target, nil, 0o600)
	link := dir + "/audit.jsonl"
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if _, _, err := openAudit(link, nil); err == nil {
		t.Fatal("the audit file was opened through a symbolic link")
	}
	sink, closeAudit, err := openAudit(dir+"/real.jsonl", nil)
	if err != nil || sink == nil {
		t.Fatalf("a plain audit file: %v", err)
	}
	closeAudit()
}

// TestAlertRulesAreValid: the example alerting rules load in Prometheus's
// own checker, and each names a bastion metric.
func TestAlertRulesAreValid(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatalf("promtool is not installed (testbed/install-host.sh installs prometheus): %v", err)
	}
	if out, err := exec.Command(promtool, "check", "rules", "../../docs/prometheus-alerts.yml").CombinedOutput(); err != nil {
		t.Fatalf("promtool check rules: %v\n%s", err, out)
	}
}

// TestRevokedKeys reads server.revoked_keys beside the configuration and
// refuses a missing file or one that is not a KRL, naming it.
func TestRevokedKeys(t *testing.T) {
	dir := t.TempDir()
	name := filepath.Join(dir, "bastion.toml")
	conf := []byte("[server]\nrevoked_keys = \"revoked.krl\"\n")
	if _, err := ParseConfig(name, conf); err == nil || !strings.Contains(err.Error(), "server.revoked_keys") || !strings.Contains(err.Error(), filepath.Join(dir, "revoked.krl")) {
		t.Fatalf("missing KRL: %v", err)
	}
	os.WriteFile(filepath.Join(dir, "revoked.krl"), []byte("ssh-ed25519 AAAA not a KRL\n"), 0o600)
	if _, err := ParseConfig(name, conf); err == nil || !strings.Contains(err.Error(), "server.revoked_keys") {
		t.Fatalf("not a KRL: %v", err)
	}
	key := filepath.Join(dir, "k")
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v\n%s", err, out)
	}
	if out, err := exec.Command("ssh-keygen", "-q", "-k", "-f", filepath.Join(dir, "revoked.krl"), key+".pub").CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen -k: %v\n%s", err, out)
	}
	os.Chmod(filepath.Join(dir, "revoked.krl"), 0o600)
	c, err := ParseConfig(name, conf)
	if err != nil {
		t.Fatal(err)
	}
	set, err := c.accounts()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := os.ReadFile(key + ".pub")
	k, _, _, _, _ := gossh.ParseAuthorizedKey(pub)
	if why := set.Revoked(k); !strings.Contains(why, "revoked") {
		t.Fatalf("a key in the KRL: Revoked = %q", why)
	}
}

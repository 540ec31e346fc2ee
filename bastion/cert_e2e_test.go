package bastion_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/keys"
)

// certBed is a fixture whose alice has no key of her own: she logs in
// with certificates from a CA made by ssh-keygen, as an SSO's would be.
type certBed struct {
	*fixture
	dir string // the CAs' files
	ca  gossh.PublicKey
}

func newCertBed(t *testing.T) *certBed {
	f := newFixture(t)
	b := &certBed{fixture: f, dir: t.TempDir()}
	for _, name := range []string{"ca", "other-ca"} {
		b.keygen("-q", "-t", "ed25519", "-N", "", "-C", name, "-f", name)
	}
	b.ca = b.pub("ca.pub")
	os.WriteFile(f.client.Key+".pub", gossh.MarshalAuthorizedKey(f.client.PublicKey), 0o644)
	b.trust(nil, nil)
	return b
}

func (b *certBed) keygen(args ...string) {
	b.t.Helper()
	cmd := exec.Command("ssh-keygen", args...)
	cmd.Dir = b.dir
	if out, err := cmd.CombinedOutput(); err != nil {
		b.t.Fatalf("ssh-keygen %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func (b *certBed) pub(name string) gossh.PublicKey {
	b.t.Helper()
	data, err := os.ReadFile(filepath.Join(b.dir, name))
	if err != nil {
		b.t.Fatal(err)
	}
	k, _, _, _, err := gossh.ParseAuthorizedKey(data)
	if err != nil {
		b.t.Fatal(err)
	}
	return k
}

// trust makes the accounts alice (no keys) and bob, with ca as their
// user CA under principals (nil: by name), and revoked as the KRL.
func (b *certBed) trust(principals map[string]string, revoked *keys.KRL) {
	b.t.Helper()
	set, err := bastion.NewAccountSet([]bastion.Account{
		{Name: "alice", Groups: []string{"dev"}}, {Name: "bob", Groups: []string{"ops"}},
	})
	if err != nil {
		b.t.Fatal(err)
	}
	set.SetCertificates([]bastion.UserCA{{Key: b.ca, Principals: principals}}, revoked)
	b.accounts.p.Store(set)
}

// sign issues the client's key a certificate from ca, where OpenSSH's
// ssh finds it beside the key (id_ed25519-cert.pub).
func (b *certBed) sign(ca string, args ...string) {
	b.t.Helper()
	b.keygen(append(append([]string{"-q", "-s", ca}, args...), b.client.Key+".pub")...)
}

// krl is the KRL ssh-keygen -k makes of spec (lines such as "serial: 9")
// under the CA ca.
func (b *certBed) krl(spec string) *keys.KRL {
	b.t.Helper()
	if err := os.WriteFile(filepath.Join(b.dir, "spec"), []byte(spec+"\n"), 0o600); err != nil {
		b.t.Fatal(err)
	}
	b.keygen("-q", "-k", "-f", "krl", "-s", "ca.pub", "spec")
	data, err := os.ReadFile(filepath.Join(b.dir, "krl"))
	if err != nil {
		b.t.Fatal(err)
	}
	krl, err := keys.ParseKRL(data)
	if err != nil {
		b.t.Fatal(err)
	}
	return krl
}

// refusedWith expects the login to fail and the audit to name why.
func (b *certBed) refusedWith(t *testing.T, reason string) {
	t.Helper()
	if res := b.jump(nil, "echo in"); res.Exit == 0 {
		t.Fatalf("let in: %v", res)
	}
	if _, ok := b.audit.find(audit.LoginFailed, reason); !ok {
		t.Fatalf("no login_failed with %q: %q", reason, b.audit.reasons())
	}
}

// TestUserCertificates: certificates from a [[user_ca]] log people in
// whose accounts list no key, through -J and login@vm@bastion, with the
// key id and serial in the audit; an expired one, one for another
// principal, one from an unknown CA, one with an unknown critical option,
// one from a source its source-address excludes and a revoked one are
// refused, each with its reason.
func TestUserCertificates(t *testing.T) {
	b := newCertBed(t)
	b.sign(filepath.Join(b.dir, "ca"), "-I", "alice@sso", "-n", "alice", "-V", "-1m:+5m", "-z", "42")
	if res := b.jump(nil, "echo in"); res.Exit != 0 || string(res.Stdout) != "in\n" {
		t.Fatalf("ssh -J with a valid certificate: %v %q", res, res.Stdout)
	}
	login, ok := b.audit.find(audit.Login, "")
	if !ok || login.Account != "alice" || login.KeyID != "alice@sso" || login.CertSerial == nil || *login.CertSerial != 42 {
		t.Fatalf("login event: %+v", login)
	}
	// The target in the user name: the certificate names one account.
	if res := b.ssh(nil, "-o", "User="+b.login+"@web1", "bastion", "echo direct"); res.Exit != 0 || string(res.Stdout) != "direct\n" {
		t.Fatalf("login@vm@bastion with a certificate: %v %q", res, res.Stdout)
	}

	t.Run("expired", func(t *testing.T) {
		b.sign(filepath.Join(b.dir, "ca"), "-I", "alice@sso", "-n", "alice", "-V", "-2h:-1h")
		b.refusedWith(t, `certificate "alice@sso": cert has expired`)
	})
	t.Run("not yet valid", func(t *testing.T) {
		b.sign(filepath.Join(b.dir, "ca"), "-I", "alice@sso", "-n", "alice", "-V", "+1h:+2h")
		b.refusedWith(t, `cert is not yet valid`)
	})
	t.Run("wrong principal", func(t *testing.T) {
		b.sign(filepath.Join(b.dir, "ca"), "-I", "bob@sso", "-n", "bob", "-V", "-1m:+5m")
		b.refusedWith(t, `certificate "bob@sso" does not name account "alice" (principals bob)`)
	})
	t.Run("unknown CA", func(t *testing.T) {
		b.sign(filepath.Join(b.dir, "other-ca"), "-I", "alice@elsewhere", "-n", "alice", "-V", "-1m:+5m")
		b.refusedWith(t, "certificate signed by a CA that is not a [[user_ca]]")
	})
	t.Run("unknown critical option", func(t *testing.T) {
		b.sign(filepath.Join(b.dir, "ca"), "-I", "alice@sso", "-n", "alice", "-V", "-1m:+5m", "-O", "critical:verify-required")
		b.refusedWith(t, `unsupported critical option "verify-required"`)
	})
	t.Run("source-address", func(t *testing.T) {
		b.sign(filepath.Join(b.dir, "ca"), "-I", "alice@sso", "-n", "alice", "-V", "-1m:+5m", "-O", "source-address=10.1.0.0/16,192.0.2.7")
		b.refusedWith(t, "source-address 10.1.0.0/16,192.0.2.7 does not include 127.0.0.1")
		b.sign(filepath.Join(b.dir, "ca"), "-I", "alice@sso", "-n", "alice", "-V", "-1m:+5m", "-O", "source-address=10.1.0.0/16,127.0.0.0/8")
		if res := b.jump(nil, "true"); res.Exit != 0 {
			t.Fatalf("from inside source-address: %v", res)
		}
	})
	t.Run("revoked", func(t *testing.T) {
		b.sign(filepath.Join(b.dir, "ca"), "-I", "alice@sso", "-n", "alice", "-V", "-1m:+5m", "-z", "77")
		b.trust(nil, b.krl("serial: 70-80"))
		defer b.trust(nil, nil)
		b.refusedWith(t, `certificate "alice@sso": certificate serial 77 is revoked`)
	})
	t.Run("principal mapping", func(t *testing.T) {
		b.trust(map[string]string{"alice.smith@example.com": "alice"}, nil)
		defer b.trust(nil, nil)
		b.sign(filepath.Join(b.dir, "ca"), "-I", "sso-1234", "-n", "alice.smith@example.com", "-V", "-1m:+5m")
		if res := b.jump(nil, "echo mapped"); res.Exit != 0 || string(res.Stdout) != "mapped\n" {
			t.Fatalf("a mapped principal: %v %q", res, res.Stdout)
		}
		// Under a mapping, an unmapped principal names nobody, even one
		// that is an account's name.
		b.sign(filepath.Join(b.dir, "ca"), "-I", "sso-1234", "-n", "alice", "-V", "-1m:+5m")
		b.refusedWith(t, `certificate "sso-1234" does not name account "alice"`)
	})
}

// TestCertificateRestrictions: force-command replaces what the client
// asks to run; a certificate without permit-pty gets no terminal, and one
// without permit-port-forwarding no -L.
func TestCertificateRestrictions(t *testing.T) {
	b := newCertBed(t)
	b.sign(filepath.Join(b.dir, "ca"), "-I", "alice@sso", "-n", "alice", "-V", "-1m:+5m", "-O", "force-command=echo forced")
	for _, args := range [][]string{{"echo asked"}, {"-s", "sftp"}, {}} {
		if res := b.jump(nil, args...); res.Exit != 0 || string(res.Stdout) != "forced\n" {
			t.Fatalf("force-command, asked %q: %v %q", args, res, res.Stdout)
		}
	}

	b.sign(filepath.Join(b.dir, "ca"), "-I", "alice@sso", "-n", "alice", "-V", "-1m:+5m", "-O", "no-pty")
	// As with OpenSSH's sshd, a terminal asked for with -t and refused
	// ends the session before the command runs.
	res := b.jump(nil, "-tt", "echo ran")
	if res.Exit == 0 || strings.Contains(string(res.Stdout), "ran") || !strings.Contains(string(res.Stderr), "PTY allocation request failed") {
		t.Fatalf("no-pty: %v %q", res, res.Stdout)
	}
	if res := b.jump(nil, "tty"); !strings.Contains(string(res.Stdout), "not a tty") {
		t.Fatalf("no-pty, no -t: %v %q", res, res.Stdout)
	}

	b.sign(filepath.Join(b.dir, "ca"), "-I", "alice@sso", "-n", "alice", "-V", "-1m:+5m", "-O", "no-port-forwarding")
	echo := startEcho(t)
	res = b.jump(nil, "-W", echo.addr)
	if res.Exit == 0 {
		t.Fatalf("no-port-forwarding: -W went through: %v", res)
	}
	if d, ok := b.audit.find(audit.Denied, "the certificate does not permit port forwarding"); !ok {
		t.Fatalf("no denied event: %q", b.audit.reasons())
	} else if d.Account != "alice" {
		t.Fatalf("denied: %+v", d)
	}
	if res := b.jump(nil, "echo still"); res.Exit != 0 || string(res.Stdout) != "still\n" {
		t.Fatalf("a session under no-port-forwarding: %v", res)
	}
}

// TestReloadEndsCertificateSessions: a reload that revokes a certificate
// or drops its CA ends the sessions it opened; one that changes neither
// leaves them running.
func TestReloadEndsCertificateSessions(t *testing.T) {
	b := newCertBed(t)
	b.sign(filepath.Join(b.dir, "ca"), "-I", "alice@sso", "-n", "alice", "-V", "-1m:+5m", "-z", "9")
	s := b.startSession(t, "-J", "bastion", b.login+"@web1", "echo started; sleep 60")
	b.trust(nil, nil)
	b.srv.Revalidate()
	b.trust(nil, b.krl("serial: 9"))
	b.srv.Revalidate()
	if code := s.ended(t); code != 255 || !strings.Contains(s.stderr.String(), "bastion: access ended: the certificate it logged in with: ") ||
		!strings.Contains(s.stderr.String(), "revoked") {
		t.Fatalf("revoked: exit %d, stderr %q", code, s.stderr.String())
	}

	b.trust(nil, nil)
	b.sign(filepath.Join(b.dir, "ca"), "-I", "alice@sso", "-n", "alice", "-V", "-1m:+5m", "-z", "10")
	s = b.startSession(t, "-J", "bastion", b.login+"@web1", "echo started; sleep 60")
	set, err := bastion.NewAccountSet([]bastion.Account{{Name: "alice", Groups: []string{"dev"}}})
	if err != nil {
		t.Fatal(err)
	}
	b.accounts.p.Store(set) // no [[user_ca]] any more
	b.srv.Revalidate()
	if code := s.ended(t); code != 255 || !strings.Contains(s.stderr.String(), "bastion: access ended: the certificate it logged in with: ") {
		t.Fatalf("CA removed: exit %d, stderr %q", code, s.stderr.String())
	}
}

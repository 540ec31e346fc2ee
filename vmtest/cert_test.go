package vmtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bastionvm/bastion/internal/testenv"
)

// TestCertificatesOnGuest: a person whose account lists no key logs in to
// a real guest with an OpenSSH user certificate from the configured
// [[user_ca]], through -J and login@vm@bastion; expired, wrong-principal,
// source-address and KRL-revoked certificates are refused, each with its
// reason in the audit. The CA and the KRL are ssh-keygen's.
func TestCertificatesOnGuest(t *testing.T) {
	dir := t.TempDir()
	keygen := func(args ...string) {
		t.Helper()
		cmd := exec.Command("ssh-keygen", args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("ssh-keygen %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	keygen("-q", "-t", "ed25519", "-N", "", "-C", "sso", "-f", "ca")
	ca, _ := os.ReadFile(filepath.Join(dir, "ca.pub"))
	krl := filepath.Join(dir, "revoked.krl")
	write(t, filepath.Join(dir, "spec"), "serial: 66\n")
	keygen("-q", "-k", "-f", krl, "-s", "ca.pub", "spec")

	b := newBastionProc(t, "", defaultRule+`
[[account]]
name = "carol"
groups = ["dev"]

[[user_ca]]
key = "`+strings.TrimSpace(string(ca))+`"
`)
	b.server("revoked_keys = " + `"` + krl + `"`)
	b.launch()
	known, _ := os.ReadFile(filepath.Join(b.client.Dir, "known_hosts"))
	carol := testenv.NewClient(t, b.addr, "carol", strings.TrimSpace(string(known)))
	pub := carol.Key + ".pub"
	write(t, pub, string(marshalAuthorized(carol.PublicKey)))
	sign := func(args ...string) {
		t.Helper()
		keygen(append(append([]string{"-q", "-s", "ca"}, args...), pub)...)
	}

	sign("-I", "carol@sso", "-n", "carol", "-V", "-5m:+1h", "-z", "7")
	for _, args := range [][]string{{"-J", "bastion", "root@" + web1}, {"root@" + web1 + "@bastion"}} {
		if r := carol.Run(nil, "ssh", append(args, "id -un")...); r.Exit != 0 || string(r.Stdout) != "root\n" {
			t.Fatalf("ssh %v with a certificate: %v %q", args, r, r.Stdout)
		}
	}
	var login map[string]any
	for _, e := range b.auditEvents("login") {
		if e["account"] == "carol" {
			login = e
		}
	}
	if login == nil || login["key_id"] != "carol@sso" || login["cert_serial"] != 7.0 {
		t.Fatalf("carol's login event: %v", login)
	}

	for _, tc := range []struct {
		name   string
		sign   []string
		reason string
	}{
		{"expired", []string{"-I", "carol@sso", "-n", "carol", "-V", "-2h:-1h"}, "cert has expired"},
		{"wrong principal", []string{"-I", "bob@sso", "-n", "bob", "-V", "-5m:+1h"}, `does not name account "carol"`},
		{"source-address", []string{"-I", "carol@sso", "-n", "carol", "-V", "-5m:+1h", "-O", "source-address=10.9.0.0/16"}, "source-address 10.9.0.0/16 does not include 127.0.0.1"},
		{"revoked", []string{"-I", "carol@sso", "-n", "carol", "-V", "-5m:+1h", "-z", "66"}, "certificate serial 66 is revoked"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sign(tc.sign...)
			if r := carol.Run(nil, "ssh", "-J", "bastion", "root@"+web1, "true"); r.Exit != 255 || !strings.Contains(r.Stderr, "Permission denied") {
				t.Fatalf("let in: %v", r)
			}
			found := false
			for _, e := range b.auditEvents("login_failed") {
				if reason, _ := e["reason"].(string); strings.Contains(reason, tc.reason) {
					found = true
				}
			}
			if !found {
				t.Fatalf("no login_failed event with %q: %v", tc.reason, b.auditEvents("login_failed"))
			}
		})
	}
}

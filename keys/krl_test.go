package keys

import (
	"crypto/ed25519"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	gossh "golang.org/x/crypto/ssh"
)

// keygen runs OpenSSH's ssh-keygen in dir.
func keygen(t *testing.T, dir string, args ...string) {
	t.Helper()
	cmd := exec.Command("ssh-keygen", args...)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func readPub(t *testing.T, path string) gossh.PublicKey {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	k, _, _, _, err := gossh.ParseAuthorizedKey(data)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestKRLFromSSHKeygen: KRLs written by OpenSSH's ssh-keygen -k, with
// every kind of revocation it writes, revoke what ssh-keygen -Q says they
// revoke, and nothing else.
func TestKRLFromSSHKeygen(t *testing.T) {
	if _, err := exec.LookPath("ssh-keygen"); err != nil {
		t.Fatalf("ssh-keygen (openssh-client) is needed: %v", err)
	}
	dir := t.TempDir()
	keygen(t, dir, "-q", "-t", "ed25519", "-N", "", "-f", "ca")
	keygen(t, dir, "-q", "-t", "ed25519", "-N", "", "-f", "other-ca")
	keygen(t, dir, "-q", "-t", "ed25519", "-N", "", "-f", "plain")
	keygen(t, dir, "-q", "-t", "ed25519", "-N", "", "-f", "hashed")
	keygen(t, dir, "-q", "-t", "ed25519", "-N", "", "-f", "kept")
	// Certificates with serials spread so that ssh-keygen writes a list, a
	// range and a bitmap, and key ids.
	type cert struct {
		name, ca, id string
		serial       uint64
	}
	certs := []cert{
		{"s5", "ca", "alice", 5}, {"s6", "ca", "alice", 6}, {"s100", "ca", "bob", 100},
		{"s150", "ca", "bob", 150}, {"s199", "ca", "bob", 199}, {"s1000", "ca", "carol", 1000},
		{"s1003", "ca", "carol", 1003}, {"s1004", "ca", "carol", 1004}, {"idrev", "ca", "mallory-laptop", 7},
		{"otherca5", "other-ca", "alice", 5}, {"anyid", "other-ca", "stolen", 8},
	}
	for _, c := range certs {
		keygen(t, dir, "-q", "-t", "ed25519", "-N", "", "-f", c.name)
		keygen(t, dir, "-q", "-s", c.ca, "-I", c.id, "-n", "u", "-z", fmt.Sprint(c.serial), c.name+".pub")
	}
	spec := "serial: 5\nserial: 100-199\nserial: 1000\nserial: 1002\nserial: 1004\nserial: 1006\nid: mallory-laptop\n"
	os.WriteFile(filepath.Join(dir, "spec"), []byte(spec), 0o600)
	keygen(t, dir, "-q", "-k", "-f", "krl", "-s", "ca.pub", "spec")
	os.WriteFile(filepath.Join(dir, "spec-any"), []byte("id: stolen\n"), 0o600)
	keygen(t, dir, "-q", "-k", "-u", "-f", "krl", "-s", "other-ca.pub", "spec-any")
	keygen(t, dir, "-q", "-k", "-u", "-f", "krl", "plain.pub")
	os.WriteFile(filepath.Join(dir, "spec-hash"), []byte("hash: "+gossh.FingerprintSHA256(readPub(t, filepath.Join(dir, "hashed.pub")))+"\n"), 0o600)
	keygen(t, dir, "-q", "-k", "-u", "-f", "krl", "spec-hash")

	data, err := os.ReadFile(filepath.Join(dir, "krl"))
	if err != nil {
		t.Fatal(err)
	}
	krl, err := ParseKRL(data)
	if err != nil {
		t.Fatalf("ParseKRL: %v", err)
	}
	// Every form ssh-keygen writes is here: a list or a range, a bitmap,
	// key ids, explicit keys and hashes.
	var ranges, bitmaps, ids int
	for _, c := range krl.certs {
		ranges, bitmaps, ids = ranges+len(c.serials), bitmaps+len(c.bitmaps), ids+len(c.keyIDs)
	}
	if ranges == 0 || bitmaps == 0 || ids != 2 || len(krl.keys) != 1 || len(krl.sha256) != 1 {
		t.Fatalf("the KRL holds %d serial ranges, %d bitmaps, %d key ids, %d keys, %d SHA-256 hashes", ranges, bitmaps, ids, len(krl.keys), len(krl.sha256))
	}
	check := func(name string) {
		t.Helper()
		key := readPub(t, filepath.Join(dir, name))
		// ssh-keygen -Q exits 1 when a key is revoked.
		q := exec.Command("ssh-keygen", "-Q", "-f", "krl", name)
		q.Dir = dir
		out, qerr := q.CombinedOutput()
		revoked := qerr != nil
		if qerr != nil && !strings.Contains(string(out), "REVOKED") {
			t.Fatalf("ssh-keygen -Q %s: %v\n%s", name, qerr, out)
		}
		if why := krl.Revoked(key); (why != "") != revoked {
			t.Errorf("%s: ours says %q, ssh-keygen -Q says revoked=%v", name, why, revoked)
		}
	}
	for _, c := range certs {
		check(c.name + "-cert.pub")
	}
	for _, name := range []string{"plain.pub", "hashed.pub", "kept.pub", "ca.pub", "other-ca.pub"} {
		check(name)
	}
	// The spot checks ssh-keygen agrees with, spelled out.
	if why := krl.Revoked(readPub(t, filepath.Join(dir, "s150-cert.pub"))); why != "certificate serial 150 is revoked" {
		t.Errorf("serial 150: %q", why)
	}
	if why := krl.Revoked(readPub(t, filepath.Join(dir, "s1003-cert.pub"))); why != "" {
		t.Errorf("serial 1003 is not in the list: %q", why)
	}
	if why := krl.Revoked(readPub(t, filepath.Join(dir, "otherca5-cert.pub"))); why != "" {
		t.Errorf("serial 5 of another CA: %q", why)
	}

	// A file cut anywhere, or with a section OpenSSH does not define, is
	// refused rather than read in part.
	for n := len(krlMagic); n < len(data); n++ {
		if _, err := ParseKRL(data[:n]); err == nil {
			// A cut between whole sections is a shorter valid KRL; that
			// is fine only where a section ends.
			if !sectionBoundary(data, n) {
				t.Fatalf("a KRL cut at %d of %d bytes was accepted", n, len(data))
			}
		}
	}
	bad := append(append([]byte{}, data...), 9, 0, 0, 0, 0)
	if _, err := ParseKRL(bad); err == nil || !strings.Contains(err.Error(), "unknown section type 9") {
		t.Fatalf("an unknown section: %v", err)
	}
	if _, err := ParseKRL([]byte("ssh-ed25519 AAAA")); err == nil || !strings.Contains(err.Error(), "not an OpenSSH KRL") {
		t.Fatalf("a text file: %v", err)
	}
}

// sectionBoundary reports whether n is where a top-level section of the
// KRL data ends (or its header does).
func sectionBoundary(data []byte, n int) bool {
	r := &reader{b: data[len(krlMagic):]}
	r.uint32()
	r.uint64()
	r.uint64()
	r.uint64()
	r.str()
	r.str()
	for {
		at := len(data) - len(r.b)
		if at == n {
			return true
		}
		if at > n || len(r.b) == 0 || r.err != nil {
			return false
		}
		r.byte()
		r.str()
	}
}

func FuzzKRL(f *testing.F) {
	dir := f.TempDir()
	cmd := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", filepath.Join(dir, "ca"))
	if err := cmd.Run(); err == nil {
		os.WriteFile(filepath.Join(dir, "spec"), []byte("serial: 5\nserial: 10-20\nid: x\n"), 0o600)
		if exec.Command("ssh-keygen", "-q", "-k", "-f", filepath.Join(dir, "krl"), "-s", filepath.Join(dir, "ca.pub"), filepath.Join(dir, "spec")).Run() == nil {
			if data, err := os.ReadFile(filepath.Join(dir, "krl")); err == nil {
				f.Add(data)
			}
		}
	}
	f.Add([]byte(krlMagic + "\x00\x00\x00\x01"))
	f.Fuzz(func(t *testing.T, data []byte) {
		k, err := ParseKRL(data)
		if err != nil {
			return
		}
		signer, _ := gossh.NewSignerFromKey(fuzzKey)
		k.Revoked(signer.PublicKey())
		k.Revoked(&gossh.Certificate{Key: signer.PublicKey(), SignatureKey: signer.PublicKey(), Serial: 15, KeyId: "x"})
	})
}

// fuzzKey is a fixed key for the fuzz target's revocation checks.
var fuzzKey = ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize))

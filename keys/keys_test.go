package keys

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

func TestLoadOrCreate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	h1, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]os.FileMode{dir: 0o700, dir + "/host_key": 0o600, dir + "/host_ca": 0o600} {
		info, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if info.Mode().Perm() != want {
			t.Errorf("%s: mode %v, want %v", path, info.Mode().Perm(), want)
		}
	}
	h2, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(h1.Key.PublicKey().Marshal(), h2.Key.PublicKey().Marshal()) || !bytes.Equal(h1.CA.PublicKey().Marshal(), h2.CA.PublicKey().Marshal()) {
		t.Fatal("keys were not reused")
	}
	if !strings.HasPrefix(h1.KnownHostsLine(), "@cert-authority * ssh-ed25519 ") {
		t.Fatalf("known-hosts line: %q", h1.KnownHostsLine())
	}
	os.Chmod(dir+"/host_ca", 0o644)
	if _, err := LoadOrCreate(dir); !errors.Is(err, ErrInsecureFile) {
		t.Fatalf("a world-readable CA key: got %v, want ErrInsecureFile", err)
	}
	os.Chmod(dir+"/host_ca", 0o600)
	os.WriteFile(dir+"/host_key", []byte("garbage"), 0o600)
	if _, err := LoadOrCreate(dir); err == nil || !strings.Contains(err.Error(), "host_key") {
		t.Fatalf("a corrupt key: got %v", err)
	}
}

func TestHostCertSigner(t *testing.T) {
	h, err := LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	signer, err := h.HostCertSigner([]string{"web1"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert := signer.PublicKey().(*ssh.Certificate)
	checker := &ssh.CertChecker{IsHostAuthority: func(auth ssh.PublicKey, _ string) bool {
		return bytes.Equal(auth.Marshal(), h.CA.PublicKey().Marshal())
	}}
	if err := checker.CheckCert("web1", cert); err != nil {
		t.Fatalf("certificate for web1: %v", err)
	}
	if err := checker.CheckCert("web2", cert); err == nil {
		t.Fatal("certificate for web1 accepted for web2")
	}
}

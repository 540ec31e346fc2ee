// Package keys holds the bastion's long-lived key material and the
// certificates and authorized_keys lines made from it.
//
// The state directory holds two ed25519 private keys in OpenSSH format:
// host_key (the bastion's own host key) and host_ca (the certificate
// authority that signs host certificates for the bastion and for every VM
// reached through it). Both are created on first start, mode 0600, in a
// directory of mode 0700, and reused afterwards.
package keys

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/internal/atomicfile"
)

// ErrInsecureFile is returned when a private key file can be read by others.
var ErrInsecureFile = errors.New("private key file is readable by group or others")

// Host is the bastion's key material.
type Host struct {
	Key ssh.Signer // presented by the front door, and inside host certificates
	CA  ssh.Signer // signs host certificates
}

// LoadOrCreate reads host_key and host_ca from dir, creating dir (0700) and
// any missing key (0600) first. A key file that exists but cannot be parsed,
// or that group or others may read, is an error: it is never replaced.
func LoadOrCreate(dir string) (*Host, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	key, err := loadOrCreate(filepath.Join(dir, "host_key"), "bastion host key")
	if err != nil {
		return nil, err
	}
	ca, err := loadOrCreate(filepath.Join(dir, "host_ca"), "bastion host CA")
	if err != nil {
		return nil, err
	}
	return &Host{Key: key, CA: ca}, nil
}

func loadOrCreate(path, comment string) (ssh.Signer, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return create(path, comment)
	}
	if err != nil {
		return nil, err
	}
	info, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if info.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s: %w (mode %v; want 0600)", path, ErrInsecureFile, info.Mode().Perm())
	}
	signer, err := ssh.ParsePrivateKey(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return signer, nil
}

// create writes a new ed25519 key to path through a temporary file and a
// rename, so a crash never leaves a half-written key behind.
func create(path, comment string) (ssh.Signer, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	block, err := ssh.MarshalPrivateKey(priv, comment)
	if err != nil {
		return nil, err
	}
	if err := atomicfile.Write(path, pem.EncodeToMemory(block), 0o600); err != nil {
		return nil, err
	}
	return ssh.NewSignerFromKey(priv)
}

// KnownHostsLine is a known_hosts line trusting the host CA for any host.
// Users are better given KnownHostsLineFor the names they reach.
func (h *Host) KnownHostsLine() string { return h.KnownHostsLineFor(nil) }

// KnownHostsLineFor is the line users add to ~/.ssh/known_hosts once to
// trust the bastion and the VMs reached through it: the host CA, for the
// host patterns given (known_hosts patterns: "*", "?", "[host]:port").
// With none, it is for any host.
func (h *Host) KnownHostsLineFor(patterns []string) string {
	hosts := "*"
	if len(patterns) > 0 && !slices.Contains(patterns, "*") {
		hosts = strings.Join(patterns, ",")
	}
	ca := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(h.CA.PublicKey())))
	return "@cert-authority " + hosts + " " + ca + " bastion-host-ca"
}

// HostCertSigner returns a signer presenting a host certificate for the
// given principals, signed by the CA and valid from a minute ago for
// validity.
func (h *Host) HostCertSigner(principals []string, validity time.Duration) (ssh.Signer, error) {
	now := time.Now()
	serial := make([]byte, 8)
	if _, err := rand.Read(serial); err != nil {
		return nil, err
	}
	cert := &ssh.Certificate{
		Key:             h.Key.PublicKey(),
		Serial:          binary.BigEndian.Uint64(serial),
		CertType:        ssh.HostCert,
		KeyId:           "bastion host " + fmt.Sprint(principals),
		ValidPrincipals: principals,
		ValidAfter:      uint64(now.Add(-time.Minute).Unix()),
		ValidBefore:     uint64(now.Add(validity).Unix()),
	}
	if err := cert.SignCert(rand.Reader, h.CA); err != nil {
		return nil, err
	}
	return ssh.NewCertSigner(cert, h.Key)
}

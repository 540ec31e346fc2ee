package keys

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"net"
	"syscall"
	"time"

	"golang.org/x/crypto/ssh"
)

// ErrHostKeyMismatch is the error of a connection whose server presented a
// host key that is not pinned.
var ErrHostKeyMismatch = errors.New("host key does not match the pinned key")

// Upstream is a verified way into one VM's sshd for one login: where it
// listens, the host keys it must present, and the key to log in with.
type Upstream struct {
	Addr     string          // host:port
	HostKeys []ssh.PublicKey // pinned; the server must present one of them
	Signer   ssh.Signer      // the bastion's key for the login
}

// ClientConfig is the configuration for logging in to u as user: public
// key authentication with u.Signer, and a host key callback that accepts
// only a pinned key (compared in constant time) and otherwise fails with
// an error wrapping ErrHostKeyMismatch that names the key presented. The
// host key algorithms offered are those of the pinned keys, so that the
// server presents one of them.
func (u Upstream) ClientConfig(user, version string) *ssh.ClientConfig {
	return &ssh.ClientConfig{
		User:              user,
		Auth:              []ssh.AuthMethod{ssh.PublicKeys(u.Signer)},
		HostKeyAlgorithms: hostKeyAlgorithms(u.HostKeys),
		HostKeyCallback:   Pinned(u.HostKeys),
		ClientVersion:     version,
	}
}

// Pinned is a host key callback that accepts only one of pinned.
func Pinned(pinned []ssh.PublicKey) ssh.HostKeyCallback {
	return func(_ string, remote net.Addr, key ssh.PublicKey) error {
		presented := key.Marshal()
		for _, k := range pinned {
			if subtle.ConstantTimeCompare(k.Marshal(), presented) == 1 {
				return nil
			}
		}
		return fmt.Errorf("%w: %s presented %s %s", ErrHostKeyMismatch, remote, key.Type(), ssh.FingerprintSHA256(key))
	}
}

// hostKeyAlgorithms lists the algorithms under which keys may be
// presented: an RSA key only with SHA-2 signatures.
func hostKeyAlgorithms(keys []ssh.PublicKey) []string {
	var algos []string
	for _, k := range keys {
		if k.Type() == ssh.KeyAlgoRSA {
			algos = append(algos, ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256)
		} else {
			algos = append(algos, k.Type())
		}
	}
	return algos
}

// SSHDRestart is how long a VM's sshd may refuse connections before a dial
// to it gives up: sshd closes its listener for a moment as it restarts (a
// reload re-executes it, an upgrade of the package restarts it).
const SSHDRestart = 5 * time.Second

// DialSSHD connects to a VM's sshd at addr, trying again with a growing
// pause while the connection is refused, for up to SSHDRestart within ctx.
func DialSSHD(ctx context.Context, addr string) (net.Conn, error) {
	var d net.Dialer
	giveUp := time.Now().Add(SSHDRestart)
	for pause := 50 * time.Millisecond; ; pause = min(2*pause, time.Second) {
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err == nil || !errors.Is(err, syscall.ECONNREFUSED) || time.Now().Add(pause).After(giveUp) {
			return conn, err
		}
		select {
		case <-time.After(pause):
		case <-ctx.Done():
			return nil, err
		}
	}
}

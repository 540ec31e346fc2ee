package trust

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/vm"
)

// dialInBand connects to the VM's sshd as the login with the epoch key,
// accepting only a host key read out of band, and returns the key the
// sshd proved it holds.
func (m *Manager) dialInBand(ctx context.Context, t *Trust) (*ssh.Client, ssh.PublicKey, error) {
	conn, err := keys.DialSSHD(ctx, t.Addr)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrInBand, err)
	}
	if deadline, ok := ctx.Deadline(); ok {
		conn.SetDeadline(deadline)
	}
	config := t.Upstream().ClientConfig(t.Login, "SSH-2.0-bastion-trust")
	config.Ciphers = m.Ciphers
	pinned := config.HostKeyCallback
	var proven ssh.PublicKey
	config.HostKeyCallback = func(host string, remote net.Addr, key ssh.PublicKey) error {
		if err := pinned(host, remote, key); err != nil {
			return err
		}
		proven = key // x/crypto calls this after checking the server's signature with key
		return nil
	}
	c, chans, reqs, err := ssh.NewClientConn(conn, t.Addr, config)
	if err != nil {
		conn.Close()
		if errors.Is(err, keys.ErrHostKeyMismatch) {
			return nil, nil, err
		}
		return nil, nil, fmt.Errorf("%w: %w", ErrInBand, err)
	}
	conn.SetDeadline(time.Time{})
	return ssh.NewClient(c, chans, reqs), proven, nil
}

// roundTrip writes a nonce through one channel and reads it back through
// the other. The file name carries 128 random bits, the value 256; the
// value is compared in constant time and never logged.
func (m *Manager) roundTrip(ctx context.Context, d vm.Domain, login string, client *ssh.Client, mode Mode) error {
	name, err := randomHex(16)
	if err != nil {
		return err
	}
	value, err := randomHex(32)
	if err != nil {
		return err
	}
	path := "/tmp/.bastion-nonce-" + name
	sc, err := sftp.NewClient(client)
	if err != nil {
		return fmt.Errorf("%w: sftp: %w", ErrInBand, err)
	}
	defer sc.Close()
	defer func() {
		// Best effort, whichever way it went: leave nothing behind.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 20*time.Second)
		defer cancel()
		if err := m.OOB.RemoveFile(cctx, d, path); err != nil {
			m.log().Warn("could not remove a nonce file", "vm", d.Name, "err", err)
		}
	}()
	var got []byte
	switch mode {
	case OBIB:
		if err := m.OOB.WriteFile(ctx, d, path, []byte(value)); err != nil {
			return err
		}
		if login != "root" {
			if err := m.OOB.Chown(ctx, d, path, login); err != nil {
				return err
			}
		}
		got, err = readAll(sc, path)
		if err != nil {
			return fmt.Errorf("%w: reading the nonce: %w", ErrInBand, err)
		}
	case IBOB:
		if err := writeFile(sc, path, []byte(value)); err != nil {
			return fmt.Errorf("%w: writing the nonce: %w", ErrInBand, err)
		}
		got, err = m.OOB.ReadFile(ctx, d, path)
		if err != nil {
			return err
		}
	default:
		return fmt.Errorf("unknown mode %q", mode)
	}
	if subtle.ConstantTimeCompare(got, []byte(value)) != 1 {
		return ErrNonceMismatch
	}
	return nil
}

func readAll(sc *sftp.Client, path string) ([]byte, error) {
	f, err := sc.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, 4096))
}

func writeFile(sc *sftp.Client, path string, data []byte) error {
	f, err := sc.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL)
	if err != nil {
		return err
	}
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func randomHex(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}

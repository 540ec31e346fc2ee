package keys

import (
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"net"
	"strings"
	"testing"

	"golang.org/x/crypto/ssh"
)

func newSigner(t *testing.T) ssh.Signer {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// serveOnce runs an SSH server with hostKey on 127.0.0.1 that accepts
// client's key, for one connection.
func serveOnce(t *testing.T, hostKey ssh.Signer, client ssh.PublicKey) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	config := &ssh.ServerConfig{PublicKeyCallback: func(_ ssh.ConnMetadata, k ssh.PublicKey) (*ssh.Permissions, error) {
		if string(k.Marshal()) == string(client.Marshal()) {
			return nil, nil
		}
		return nil, errors.New("unknown key")
	}}
	config.AddHostKey(hostKey)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		if conn, chans, reqs, err := ssh.NewServerConn(c, config); err == nil {
			go ssh.DiscardRequests(reqs)
			go func() {
				for ch := range chans {
					ch.Reject(ssh.Prohibited, "no")
				}
			}()
			conn.Wait()
		}
	}()
	return ln.Addr().String()
}

func TestUpstreamPinsTheHostKey(t *testing.T) {
	host, impostor, login := newSigner(t), newSigner(t), newSigner(t)
	for _, tc := range []struct {
		name   string
		pinned []ssh.PublicKey
		ok     bool
	}{
		{"the pinned key", []ssh.PublicKey{host.PublicKey()}, true},
		{"one of the pinned keys", []ssh.PublicKey{impostor.PublicKey(), host.PublicKey()}, true},
		{"another key", []ssh.PublicKey{impostor.PublicKey()}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := serveOnce(t, host, login.PublicKey())
			u := Upstream{Addr: addr, HostKeys: tc.pinned, Signer: login}
			c, err := ssh.Dial("tcp", addr, u.ClientConfig("root", "SSH-2.0-test"))
			if tc.ok {
				if err != nil {
					t.Fatalf("login with %s pinned: %v", tc.name, err)
				}
				c.Close()
				return
			}
			if !errors.Is(err, ErrHostKeyMismatch) {
				t.Fatalf("login with %s pinned: %v, want ErrHostKeyMismatch", tc.name, err)
			}
			if !strings.Contains(err.Error(), ssh.FingerprintSHA256(host.PublicKey())) {
				t.Errorf("the error does not name the key presented: %v", err)
			}
		})
	}
}

func TestHostKeyAlgorithmsOfferSHA2ForRSA(t *testing.T) {
	got := hostKeyAlgorithms([]ssh.PublicKey{newSigner(t).PublicKey()})
	if len(got) != 1 || got[0] != ssh.KeyAlgoED25519 {
		t.Fatalf("ed25519: %v", got)
	}
	rsa := fakeRSA{newSigner(t).PublicKey()}
	got = hostKeyAlgorithms([]ssh.PublicKey{rsa})
	if len(got) != 2 || got[0] != ssh.KeyAlgoRSASHA512 || got[1] != ssh.KeyAlgoRSASHA256 {
		t.Fatalf("rsa: %v, want only SHA-2 signatures", got)
	}
}

// fakeRSA is a public key that says it is RSA.
type fakeRSA struct{ ssh.PublicKey }

func (fakeRSA) Type() string { return ssh.KeyAlgoRSA }

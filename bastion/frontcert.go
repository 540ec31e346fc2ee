package bastion

import (
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	gossh "golang.org/x/crypto/ssh"
)

// frontCertValidity is how long the front door's own host certificate is
// valid; it is renewed when less than a day is left.
const frontCertValidity = 7 * 24 * time.Hour

// renewingCert is the front door's host key presented in a certificate
// for the bastion's names, renewed as it nears its end. Connections in
// the middle of a handshake during a renewal are unaffected: the key that
// signs is the same, only the certificate around it changes.
type renewingCert struct {
	issue func(validity time.Duration) (gossh.Signer, error)
	log   *slog.Logger

	mu      sync.Mutex // protects cur and renewAt
	cur     gossh.Signer
	renewAt time.Time
}

func newRenewingCert(issue func(time.Duration) (gossh.Signer, error), log *slog.Logger) (*renewingCert, error) {
	r := &renewingCert{issue: issue, log: log}
	if err := r.renew(); err != nil {
		return nil, err
	}
	return r, nil
}

// renew issues a new certificate. r.mu must be held, or r not yet shared.
func (r *renewingCert) renew() error {
	s, err := r.issue(frontCertValidity)
	if err != nil {
		return fmt.Errorf("front door certificate: %w", err)
	}
	r.cur, r.renewAt = s, time.Now().Add(frontCertValidity-24*time.Hour)
	return nil
}

// current is the certificate to present now.
func (r *renewingCert) current() gossh.Signer {
	r.mu.Lock()
	defer r.mu.Unlock()
	if time.Now().After(r.renewAt) {
		if err := r.renew(); err != nil {
			r.log.Error("renewing the front door certificate; the current one serves on", "err", err)
		}
	}
	return r.cur
}

func (r *renewingCert) PublicKey() gossh.PublicKey { return r.current().PublicKey() }

func (r *renewingCert) Sign(rand io.Reader, data []byte) (*gossh.Signature, error) {
	return r.current().Sign(rand, data)
}

func (r *renewingCert) SignWithAlgorithm(rand io.Reader, data []byte, algorithm string) (*gossh.Signature, error) {
	s := r.current()
	if as, ok := s.(gossh.AlgorithmSigner); ok {
		return as.SignWithAlgorithm(rand, data, algorithm)
	}
	return s.Sign(rand, data)
}

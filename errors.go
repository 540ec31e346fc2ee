package bastion

import (
	"errors"
	"fmt"
)

// Sentinel errors. Resolvers wrap these so the front door can tell the user
// a short, accurate reason while the detail goes to the log.
var (
	ErrUnknownVM           = errors.New("no such VM")
	ErrDenied              = errors.New("denied by policy")
	ErrHostKeyMismatch     = errors.New("host key does not match the pinned key")
	ErrUpstreamAuth        = errors.New("the VM refused the bastion's key")
	ErrUpstreamUnreachable = errors.New("the VM's sshd cannot be reached")
	ErrNotVerified         = errors.New("the VM could not be verified")
	ErrBadTarget           = errors.New("bad target")
)

// userMessage is what the person at the client is told about err: short,
// with no internal detail. The full error goes to the log and audit stream.
func userMessage(vm string, err error) string {
	for _, known := range []error{ErrUnknownVM, ErrDenied, ErrHostKeyMismatch, ErrUpstreamAuth, ErrUpstreamUnreachable, ErrBadTarget} {
		if errors.Is(err, known) {
			return fmt.Sprintf("bastion: %s: %v", vm, known)
		}
	}
	var v *VerifyError
	if errors.As(err, &v) {
		return fmt.Sprintf("bastion: %s: %s", vm, v.UserMessage)
	}
	return fmt.Sprintf("bastion: %s: %v", vm, ErrNotVerified)
}

// VerifyError is returned by a Resolver whose verification of a VM failed;
// UserMessage is safe to show the person at the client.
type VerifyError struct {
	UserMessage string
	Err         error
}

func (e *VerifyError) Error() string { return e.UserMessage + ": " + e.Err.Error() }
func (e *VerifyError) Unwrap() error { return e.Err }

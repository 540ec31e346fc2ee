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
// Errors from a Resolver may say it themselves with a UserMessage method.
func userMessage(vm string, err error) string {
	for _, known := range []error{ErrUnknownVM, ErrDenied, ErrHostKeyMismatch, ErrUpstreamAuth, ErrUpstreamUnreachable, ErrBadTarget} {
		if errors.Is(err, known) {
			return fmt.Sprintf("bastion: %s: %v", vm, known)
		}
	}
	var m interface{ UserMessage() string }
	if errors.As(err, &m) {
		return fmt.Sprintf("bastion: %s: %s", vm, m.UserMessage())
	}
	return fmt.Sprintf("bastion: %s: %v", vm, ErrNotVerified)
}

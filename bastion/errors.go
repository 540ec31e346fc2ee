package bastion

import (
	"errors"
	"fmt"

	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/vm"
)

// Sentinel errors of the front door and its upstreams, shown to the user
// with the detail left to the log. Resolvers and VM lookups use
// vm.ErrNoSuchVM and keys.ErrHostKeyMismatch, listed with these in
// userMessage.
var (
	ErrDenied              = errors.New("denied by policy")
	ErrUpstreamAuth        = errors.New("the VM refused the bastion's key")
	ErrUpstreamUnreachable = errors.New("the VM's sshd cannot be reached")
	ErrNotVerified         = errors.New("the VM could not be verified")
	ErrBadTarget           = errors.New("bad target")
	ErrBusy                = errors.New("too many connections to VMs are being set up for this account; try again")
)

// userMessage is what the person at the client is told about err: short,
// with no internal detail. The full error goes to the log and audit stream.
// Errors from a Resolver may say it themselves with a UserMessage method.
func userMessage(name string, err error) string {
	// An error that says itself what the user may be told knows best: a
	// failed trust check names its step, where the sentinels underneath
	// would only name the cause.
	var m interface{ UserMessage() string }
	if errors.As(err, &m) {
		return fmt.Sprintf("bastion: %s: %s", name, vm.Printable(m.UserMessage())) // it may quote the guest
	}
	for _, known := range []error{vm.ErrNoSuchVM, ErrDenied, keys.ErrHostKeyMismatch, ErrUpstreamAuth, ErrUpstreamUnreachable, ErrBadTarget, ErrBusy} {
		if errors.Is(err, known) {
			return fmt.Sprintf("bastion: %s: %v", name, known)
		}
	}
	return fmt.Sprintf("bastion: %s: %v", name, ErrNotVerified)
}

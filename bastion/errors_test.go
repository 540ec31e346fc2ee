package bastion

import (
	"fmt"
	"testing"

	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/vm"
)

// stepError is an error that carries its own message for the user, as a
// failed trust check does.
type stepError struct{ err error }

func (e stepError) Error() string { return "in-band connection: " + e.err.Error() }
func (e stepError) Unwrap() error { return e.err }
func (e stepError) UserMessage() string {
	return "could not verify the VM (in-band connection: the VM's host key is not the one read through the hypervisor)"
}

func TestUserMessage(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		// Its own message beats the sentinel it wraps.
		{fmt.Errorf("resolve: %w", stepError{keys.ErrHostKeyMismatch}),
			"bastion: web1: could not verify the VM (in-band connection: the VM's host key is not the one read through the hypervisor)"},
		{fmt.Errorf("%w: presented ssh-ed25519 SHA256:x", keys.ErrHostKeyMismatch), "bastion: web1: host key does not match the pinned key"},
		{fmt.Errorf("%w: web1", vm.ErrNoSuchVM), "bastion: web1: no such VM"},
		{fmt.Errorf("%w: rule x", ErrDenied), "bastion: web1: denied by policy"},
		{fmt.Errorf("something internal"), "bastion: web1: the VM could not be verified"},
	} {
		if got := userMessage("web1", tc.err); got != tc.want {
			t.Errorf("userMessage(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
}

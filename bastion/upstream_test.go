package bastion

import (
	"testing"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/internal/testenv"
	"github.com/bastionvm/bastion/keys"
)

// TestSameTarget: a connection is joined only with the very target it was
// dialled with: address, host keys in order, and the trust's own key.
func TestSameTarget(t *testing.T) {
	signer, _ := testenv.NewKey(t)
	other, _ := testenv.NewKey(t)
	host1, _ := testenv.NewKey(t)
	host2, _ := testenv.NewKey(t)
	base := keys.Upstream{Addr: "192.0.2.1:22", HostKeys: []gossh.PublicKey{host1.PublicKey(), host2.PublicKey()}, Signer: signer}
	for _, tc := range []struct {
		name string
		b    keys.Upstream
		want bool
	}{
		{"the same", keys.Upstream{Addr: base.Addr, HostKeys: []gossh.PublicKey{host1.PublicKey(), host2.PublicKey()}, Signer: signer}, true},
		{"another address", keys.Upstream{Addr: "192.0.2.2:22", HostKeys: base.HostKeys, Signer: signer}, false},
		{"another port", keys.Upstream{Addr: "192.0.2.1:2222", HostKeys: base.HostKeys, Signer: signer}, false},
		{"a host key fewer", keys.Upstream{Addr: base.Addr, HostKeys: base.HostKeys[:1], Signer: signer}, false},
		{"another host key", keys.Upstream{Addr: base.Addr, HostKeys: []gossh.PublicKey{host1.PublicKey(), other.PublicKey()}, Signer: signer}, false},
		{"another epoch key", keys.Upstream{Addr: base.Addr, HostKeys: base.HostKeys, Signer: other}, false},
		{"no key", keys.Upstream{Addr: base.Addr, HostKeys: base.HostKeys}, false},
	} {
		if got := sameTarget(base, tc.b); got != tc.want {
			t.Errorf("%s: sameTarget = %v, want %v", tc.name, got, tc.want)
		}
	}
}

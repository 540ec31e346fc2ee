package vmtest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/internal/testenv"
)

// TestRewrittenAuthorizedKeysHeal: configuration management rewriting a
// login's authorized_keys inside the guest (here virsh set-user-sshkeys
// --reset) takes the trust's key away; the next login that needs a new
// connection to the VM still goes through, the bastion verifying the VM
// again within it.
func TestRewrittenAuthorizedKeysHeal(t *testing.T) {
	b := newBastionProc(t, "", defaultRule)
	// Not kept open for the next login, which would then need no new
	// connection and find nothing to heal.
	b.server(`upstream_linger = "0s"`)
	b.launch()
	target := "user@" + web1
	if res := b.ssh(nil, target, "echo first"); res.Exit != 0 || string(res.Stdout) != "first\n" {
		t.Fatalf("first login: %v %q", res, res.Stdout)
	}
	// What configuration management leaves: the keys it manages, none of
	// them the bastion's.
	managed, _ := testenv.NewKey(t)
	file := filepath.Join(t.TempDir(), "authorized_keys")
	os.WriteFile(file, gossh.MarshalAuthorizedKey(managed.PublicKey()), 0o600)
	virsh(t, "set-user-sshkeys", web1, "user", "--reset", "--file", file)
	res := b.ssh(nil, target, "echo healed")
	if res.Exit != 0 || string(res.Stdout) != "healed\n" {
		t.Fatalf("a login after authorized_keys was rewritten: %v %q", res, res.Stdout)
	}
	dropped := b.auditEvents("trust_dropped")
	if len(dropped) == 0 || !strings.Contains(dropped[len(dropped)-1]["reason"].(string), "refused the bastion's key") {
		t.Fatalf("audit: %v", dropped)
	}
}

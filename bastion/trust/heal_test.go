package trust

import (
	"context"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/internal/testenv"
)

// TestForgetRunsTheWholeCheckAgain: a trust the VM stopped honouring (its
// authorized_keys rewritten) is dropped by Forget, and the next Get
// verifies afresh with a new key that logs in.
func TestForgetRunsTheWholeCheckAgain(t *testing.T) {
	g := newLocalGuest(t)
	m := g.manager()
	var ev events
	m.Audit = ev.add
	first, err := m.Get(context.Background(), vm1, g.sshd.Login)
	if err != nil {
		t.Fatal(err)
	}
	g.mu.Lock()
	g.removed = append(g.removed, g.added...) // configuration management rewrote the file
	g.writeKeys()
	g.mu.Unlock()
	m.Forget(vm1, g.sshd.Login, "the VM refused the bastion's key")
	second, err := m.Get(context.Background(), vm1, g.sshd.Login)
	if err != nil || second == first || second.KeyLine == first.KeyLine {
		t.Fatalf("after Forget: %v, a new trust %v", err, second != first)
	}
	c, err := ssh.Dial("tcp", second.Addr, second.Upstream().ClientConfig(g.sshd.Login, "SSH-2.0-test"))
	if err != nil {
		t.Fatalf("the new key does not log in: %v", err)
	}
	c.Close()
	if got := ev.types(); len(got) != 3 || got[1] != audit.TrustDropped {
		t.Fatalf("audited %v, want verified, dropped, verified", got)
	}
}

// TestChangedHostKeyProvedAgainIsPinnedAndAudited: when the VM presents a
// new host key that the out-of-band read confirms and the handshake
// proves, the new check pins it and the audit names both fingerprints.
func TestChangedHostKeyProvedAgainIsPinnedAndAudited(t *testing.T) {
	before, after := newLocalGuest(t), newLocalGuest(t)
	gs := guests{"uuid-web1": before}
	m := &Manager{OOB: gs, Instance: "test", SSHPort: before.port(), Timeout: 30 * time.Second}
	var ev events
	m.Audit = ev.add
	d, _ := gs.Find(context.Background(), "uuid-web1")
	old, err := m.Get(context.Background(), d, before.sshd.Login)
	if err != nil {
		t.Fatal(err)
	}
	// The VM's sshd now has another host key, which the guest's files show.
	gs["uuid-web1"], m.SSHPort = after, after.port()
	m.Forget(d, before.sshd.Login, "host key does not match the pinned key")
	renewed, err := m.Get(context.Background(), d, after.sshd.Login)
	if err != nil {
		t.Fatal(err)
	}
	if renewed.Fingerprint() == old.Fingerprint() || renewed.Fingerprint() != ssh.FingerprintSHA256(after.sshd.HostKey) {
		t.Fatalf("pinned %s; want the new key %s", renewed.Fingerprint(), ssh.FingerprintSHA256(after.sshd.HostKey))
	}
	ev.mu.Lock()
	defer ev.mu.Unlock()
	for _, e := range ev.got {
		if e.Type == audit.HostKeyChanged {
			if !strings.Contains(e.Detail, "old "+old.Fingerprint()) || !strings.Contains(e.Detail, "new "+renewed.Fingerprint()) {
				t.Fatalf("host_key_changed detail %q", e.Detail)
			}
			return
		}
	}
	t.Fatalf("no host_key_changed event in %+v", ev.got)
}

// TestStaleEpochKeysRemovedAtTheNextCheck: keys of this bastion's earlier
// epochs left in the VM (after a crash) go at the next check; another
// bastion's and the login's own keys stay.
func TestStaleEpochKeysRemovedAtTheNextCheck(t *testing.T) {
	g := newLocalGuest(t)
	stale, _ := testenv.NewKey(t)
	other, _ := testenv.NewKey(t)
	own, _ := testenv.NewKey(t)
	staleLine := AuthorizedKeyLine(stale.PublicKey(), time.Now().Add(time.Hour), "test", time.Now().Add(-time.Hour))
	otherLine := AuthorizedKeyLine(other.PublicKey(), time.Now().Add(time.Hour), "replica-2", time.Now())
	ownLine := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(own.PublicKey()))) + " alice@laptop"
	g.mu.Lock()
	g.added = append(g.added, staleLine, otherLine, ownLine)
	g.mu.Unlock()
	if _, err := g.manager().Get(context.Background(), vm1, g.sshd.Login); err != nil {
		t.Fatal(err)
	}
	left, _ := g.AuthorizedKeys(context.Background(), vm1, g.sshd.Login)
	joined := strings.Join(left, "\n")
	if strings.Contains(joined, staleLine) {
		t.Error("the stale epoch key of this bastion is still there")
	}
	if !strings.Contains(joined, otherLine) || !strings.Contains(joined, ownLine) {
		t.Errorf("another bastion's key or the login's own key went: %q", joined)
	}
}

package trust

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

// FuzzGuestFiles: a hostile guest writes what it likes into its host key
// files and its authorized_keys, and the full check runs against a real
// sshd. Whatever the files hold, a trust is only ever granted pinning the
// key that sshd proved it holds, and the stale-key sweep removes only
// lines that carry this instance's epoch mark, never the new epoch's key.
func FuzzGuestFiles(f *testing.F) {
	g := newLocalGuest(f)
	real := string(ssh.MarshalAuthorizedKey(g.sshd.HostKey))
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	other, _ := ssh.NewPublicKey(pub)
	otherLine := string(ssh.MarshalAuthorizedKey(other))
	old := AuthorizedKeyLine(other, time.Now().Add(time.Hour), "test", time.Now().Add(-time.Hour))
	f.Add(real, "", "")
	f.Add("# a comment\n"+real, "", "")
	f.Add(`command="/bin/false" `+real, otherLine, "")
	f.Add(otherLine, real, old)
	f.Add("garbage", real, "")
	f.Add(strings.TrimSuffix(real, "\n")+" comment\x1b[2J", "", old+"\n"+otherLine+" bastion:test:epoch-\n\x00")
	f.Add("", "", "")
	f.Add(otherLine+real, "", strings.Replace(old, "bastion:test:", "bastion:other:", 1))
	f.Fuzz(func(t *testing.T, ed25519File, ecdsaFile, planted string) {
		g.mu.Lock()
		g.files = map[string][]byte{}
		for i, data := range []string{ed25519File, ecdsaFile} {
			if data != "" { // an empty one stands for a file that is not there
				g.files[hostKeyFiles[i]] = []byte(data)
			}
		}
		g.planted = strings.Split(planted, "\n")
		g.added, g.removed, g.written = nil, nil, nil
		g.mu.Unlock()
		m := g.manager()
		m.Timeout = 10 * time.Second
		tr, err := m.Get(context.Background(), vm1, g.sshd.Login)
		g.mu.Lock()
		removed := append([]string(nil), g.removed...)
		g.mu.Unlock()
		for _, line := range removed {
			if !strings.Contains(line, " bastion:test:epoch-") {
				t.Fatalf("removed the guest's own line %q", line)
			}
			if tr != nil && line == tr.KeyLine {
				t.Fatalf("removed the new epoch's key")
			}
		}
		if err != nil {
			return
		}
		defer m.Forget(vm1, g.sshd.Login, "fuzz input done")
		if len(tr.HostKeys) != 1 || tr.Fingerprint() != ssh.FingerprintSHA256(g.sshd.HostKey) {
			t.Fatalf("trusted %d host keys, %s, not the one sshd holds", len(tr.HostKeys), tr.Fingerprint())
		}
		if !strings.Contains(ed25519File+ecdsaFile, strings.Fields(real)[1]) {
			t.Fatalf("trusted a host key no host key file names")
		}
	})
}

// A host key file that does not parse is passed over for one that does;
// when none parses, the check says which file is wrong.
func TestUnparsableHostKeyFile(t *testing.T) {
	g := newLocalGuest(t)
	real := ssh.MarshalAuthorizedKey(g.sshd.HostKey)
	g.files = map[string][]byte{hostKeyFiles[0]: []byte("not a key\n"), hostKeyFiles[1]: real}
	if _, err := g.manager().Get(context.Background(), vm1, g.sshd.Login); err != nil {
		t.Fatalf("a bad ed25519 file beside a good ecdsa one: %v", err)
	}
	g.files = map[string][]byte{hostKeyFiles[0]: []byte("not a key\n")}
	_, err := g.manager().Get(context.Background(), vm1, g.sshd.Login)
	if err == nil || !strings.Contains(err.Error(), "host keys: "+hostKeyFiles[0]+": ssh: no key found") {
		t.Fatalf("only a bad file: %v", err)
	}
}

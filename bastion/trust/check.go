package trust

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/vm"
)

// check runs the dual-band check for login on d, steps 1 to 7 of
// docs/trust.md.
func (m *Manager) check(ctx context.Context, d vm.Domain, login string) (*Trust, error) {
	fail := func(step string, err error) (*Trust, error) {
		return nil, &Error{VM: d.Name, Step: step, Err: err}
	}
	// 1. The domain exists and runs, and its agent answers.
	d, err := m.OOB.Find(ctx, d.UUID)
	if err != nil {
		return fail("finding the VM", err)
	}
	if !d.Running {
		return fail("finding the VM", fmt.Errorf("%w: %s", vm.ErrNotRunning, d.Name))
	}
	if err := m.OOB.Ping(ctx, d); err != nil {
		return fail("guest agent", err)
	}
	// 2. Its address, cross-checked by the hypervisor.
	address, err := m.OOB.Address(ctx, d)
	if err != nil {
		return fail("address", err)
	}
	port := m.SSHPort
	if port == 0 {
		port = 22
	}
	addr := net.JoinHostPort(address.IP.String(), strconv.Itoa(port))
	// 3. Its host keys, read out of band: what the guest claims.
	hostKeys, err := m.readHostKeys(ctx, d)
	if err != nil {
		return fail("host keys", err)
	}
	// 4. A fresh key for this epoch, installed for login out of band, with
	// an expiry sshd enforces itself.
	now := time.Now()
	t := &Trust{Domain: d, Login: login, Addr: addr, HostKeys: hostKeys, Established: now, Expires: now.Add(m.ttl())}
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return fail("epoch key", err)
	}
	if t.Signer, err = ssh.NewSignerFromKey(priv); err != nil {
		return fail("epoch key", err)
	}
	t.KeyLine = AuthorizedKeyLine(t.Signer.PublicKey(), t.Expires, m.Instance, now)
	m.removeStaleKeys(ctx, d, login)
	if err := m.OOB.AddAuthorizedKey(ctx, d, login, t.KeyLine); err != nil {
		return fail("installing the bastion's key", err)
	}
	installed := true
	defer func() {
		if installed {
			m.removeKey(d, t)
		}
	}()
	// 5. An SSH connection as login with the epoch key, which must present
	// a host key read in step 3. The handshake proves the sshd holds that
	// key: from here on it is the only one pinned, and the one compared
	// with other VMs' to find clones.
	client, proven, err := m.dialInBand(ctx, t)
	if err != nil {
		return fail("in-band connection", err)
	}
	defer client.Close()
	t.HostKeys = []ssh.PublicKey{proven}
	if err := m.checkClones(ctx, d, proven); err != nil {
		return fail("host keys", err)
	}
	// 6. The nonce round trips over it.
	modes := m.Modes
	if len(modes) == 0 {
		modes = []Mode{OBIB, IBOB}
	}
	for _, mode := range modes {
		if err := m.roundTrip(ctx, d, login, client, mode); err != nil {
			return fail("nonce "+string(mode), err)
		}
	}
	// 7. Trusted: every step held.
	t.Modes = modes
	installed = false
	m.log().Info("trust established", "vm", d.Name, "login", login, "addr", addr,
		"host_key", t.Fingerprint(), "modes", modes, "expires", t.Expires.UTC().Format(time.RFC3339))
	return t, nil
}

// removeStaleKeys removes from login's authorized_keys on d the keys of
// this bastion's earlier epochs that no trust uses any more: left behind by
// a crash, or by a trust dropped while the VM was away. Best effort: their
// expiry-time ends them anyway.
func (m *Manager) removeStaleKeys(ctx context.Context, d vm.Domain, login string) {
	lines, err := m.OOB.AuthorizedKeys(ctx, d, login)
	if err != nil {
		m.log().Debug("could not list authorized keys", "vm", d.Name, "login", login, "err", err)
		return
	}
	mark := " bastion:" + m.Instance + ":epoch-"
	m.mu.Lock()
	var inUse []string
	for _, t := range m.trusts {
		if t.Domain.UUID == d.UUID && t.Login == login {
			inUse = append(inUse, keyBlob(t.KeyLine))
		}
	}
	m.mu.Unlock()
	for _, line := range lines {
		if !strings.Contains(line, mark) || slices.Contains(inUse, keyBlob(line)) {
			continue
		}
		if err := m.OOB.RemoveAuthorizedKey(ctx, d, login, line); err != nil {
			m.log().Warn("could not remove a stale trust key", "vm", d.Name, "login", login, "err", err)
		} else {
			m.log().Info("removed a stale trust key", "vm", d.Name, "login", login)
		}
	}
}

// keyBlob is the base64 key of an authorized_keys line.
func keyBlob(line string) string {
	if k, _, _, _, err := ssh.ParseAuthorizedKey([]byte(line)); err == nil {
		return string(k.Marshal())
	}
	return line
}

// hostKeyFiles are read in order of preference.
var hostKeyFiles = []string{
	"/etc/ssh/ssh_host_ed25519_key.pub",
	"/etc/ssh/ssh_host_ecdsa_key.pub",
	"/etc/ssh/ssh_host_rsa_key.pub",
}

func (m *Manager) readHostKeys(ctx context.Context, d vm.Domain) ([]ssh.PublicKey, error) {
	var keys []ssh.PublicKey
	var firstErr, badFile error
	for _, path := range hostKeyFiles {
		data, err := m.OOB.ReadFile(ctx, d, path)
		if err != nil {
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		k, _, _, _, err := ssh.ParseAuthorizedKey(data)
		if err != nil {
			// A file that does not parse names no key; the others may.
			// The handshake accepts only a key that one of them names.
			if badFile == nil {
				badFile = fmt.Errorf("%s: %w", path, err)
			}
			continue
		}
		keys = append(keys, k)
	}
	switch {
	case len(keys) > 0:
		return keys, nil
	case badFile != nil:
		return nil, badFile
	case firstErr != nil:
		// An agent that cannot read files says why (disabled, silent).
		return nil, firstErr
	}
	return nil, ErrNoHostKeys
}

// checkClones refuses a VM whose sshd proved it holds a host key that
// another existing VM's sshd has proved it holds: overlays of one image
// share keys, and the bastion cannot tell which of them answers on the
// network. The other VM's trusts are dropped too. Only proven keys count:
// a guest that merely lists another VM's public key in /etc/ssh fails its
// own handshake and touches nobody else's trust.
func (m *Manager) checkClones(ctx context.Context, d vm.Domain, proven ssh.PublicKey) error {
	fp := ssh.FingerprintSHA256(proven)
	m.mu.Lock()
	if m.hostKeys == nil {
		m.hostKeys = make(map[string]map[string]bool)
	}
	if m.hostKeys[fp] == nil {
		m.hostKeys[fp] = make(map[string]bool)
	}
	m.hostKeys[fp][d.UUID] = true
	var others []string
	for uuid := range m.hostKeys[fp] {
		if uuid != d.UUID {
			others = append(others, uuid)
		}
	}
	m.mu.Unlock()
	var clones []string
	for _, uuid := range others {
		if _, err := m.OOB.Find(ctx, uuid); err != nil {
			m.forgetHostKeys(uuid) // gone: no longer a rival
			continue
		}
		clones = append(clones, uuid)
		m.Drop(uuid, "clone of "+d.Name)
	}
	if len(clones) > 0 {
		return fmt.Errorf("%w: %s shares a host key with %v", ErrClone, d.Name, clones)
	}
	return nil
}

func (m *Manager) forgetHostKeys(uuid string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for fp, uuids := range m.hostKeys {
		delete(uuids, uuid)
		if len(uuids) == 0 {
			delete(m.hostKeys, fp)
		}
	}
}

// AuthorizedKeyLine is the authorized_keys line of an epoch key: sshd stops
// accepting it at expires, and its comment names the bastion and epoch.
func AuthorizedKeyLine(pub ssh.PublicKey, expires time.Time, instance string, epoch time.Time) string {
	return fmt.Sprintf(`expiry-time="%s" %s bastion:%s:epoch-%s`,
		expires.UTC().Format("20060102150405Z"),
		strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub))),
		instance, epoch.UTC().Format("20060102T150405.000000000Z"))
}

// Package trust holds the bastion's verified trust with each VM: a fresh
// key of the bastion's own, installed for one login through the hypervisor,
// and the VM's host keys and address, proven to belong together by a
// dual-band check (DESIGN.md, "Trust: the dual-band check").
//
// A trust is per VM (hypervisor URI and domain UUID) and login. It expires
// after a TTL, is refreshed while in use, and is dropped at once on
// lifecycle events that break the binding: reboot, stop, migration,
// undefine, agent loss.
package trust

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"
)

// Domain is a VM as the out-of-band channel reports it.
type Domain struct {
	URI     string
	Name    string
	UUID    string
	Running bool
	Labels  map[string]string
	MACs    []string
}

// OutOfBand is the trusted management channel into VMs: the hypervisor and
// the guest agent. Errors should carry user-grade text in their innermost
// wrapped error.
type OutOfBand interface {
	Find(ctx context.Context, name string) (Domain, error)
	Ping(ctx context.Context, d Domain) error
	Address(ctx context.Context, d Domain) (netip.Addr, error)
	ReadFile(ctx context.Context, d Domain, path string) ([]byte, error)
	WriteFile(ctx context.Context, d Domain, path string, data []byte) error
	RemoveFile(ctx context.Context, d Domain, path string) error
	Chown(ctx context.Context, d Domain, path, user string) error
	AddAuthorizedKey(ctx context.Context, d Domain, user, line string) error
	RemoveAuthorizedKey(ctx context.Context, d Domain, user, line string) error
}

// Errors of the in-band half and of the check as a whole.
var (
	ErrHostKeyMismatch = errors.New("the VM's host key is not the one read through the hypervisor")
	ErrNonceMismatch   = errors.New("the value read back does not match the value written")
	ErrNoHostKeys      = errors.New("no SSH host keys found in the guest")
	ErrClone           = errors.New("another VM presents the same host key (a clone?)")
	ErrInBand          = errors.New("the VM's sshd could not be reached")
)

// Mode is a direction of the nonce round trip.
type Mode string

const (
	// OBIB writes through the guest agent and reads back over SSH.
	OBIB Mode = "ob-ib"
	// IBOB writes over SSH and reads back through the guest agent.
	IBOB Mode = "ib-ob"
)

// Error is a failed check: which VM, at which step, and why.
type Error struct {
	VM   string
	Step string
	Err  error
}

func (e *Error) Error() string { return fmt.Sprintf("trust %s: %s: %v", e.VM, e.Step, e.Err) }
func (e *Error) Unwrap() error { return e.Err }

// UserMessage is the short reason shown to the person whose request
// needed this trust: the step and the innermost cause, without detail.
func (e *Error) UserMessage() string {
	root := e.Err
	for {
		next := errors.Unwrap(root)
		if next == nil {
			break
		}
		root = next
	}
	return fmt.Sprintf("could not verify the VM (%s: %v)", e.Step, root)
}

// Trust is an established, verified trust with one login on one VM.
type Trust struct {
	Domain      Domain
	Login       string
	Addr        string // host:port of the VM's sshd
	HostKeys    []ssh.PublicKey
	Signer      ssh.Signer // the epoch key, installed for Login
	KeyLine     string     // its authorized_keys line, for removal
	Modes       []Mode
	Established time.Time
	Expires     time.Time
}

// Fingerprint is the SHA256 fingerprint of the first pinned host key.
func (t *Trust) Fingerprint() string { return ssh.FingerprintSHA256(t.HostKeys[0]) }

// Manager establishes and keeps trusts. Set its fields before use.
type Manager struct {
	OOB      OutOfBand
	Instance string        // names this bastion in key comments; required
	TTL      time.Duration // 0 means 10 minutes
	Modes    []Mode        // nil means both, OB-IB then IB-OB
	SSHPort  int           // 0 means 22
	// Timeout bounds one whole check; 0 means 90 seconds.
	Timeout time.Duration
	Logger  *slog.Logger
	// OnChange, if set, is called after every change of the set of trusts,
	// with a snapshot. It must not call back into the Manager.
	OnChange func([]Trust)
	// OnOutcome, if set, is called with every check's outcome (err nil on
	// success) and how long the check took, for the audit stream.
	OnOutcome func(vm, login string, t *Trust, took time.Duration, err error)

	mu       sync.Mutex
	trusts   map[key]*Trust
	inflight map[key]*flight
	hostKeys map[string]map[string]bool // host key fingerprint → UUIDs seen presenting it
}

type key struct{ uri, uuid, login string }

type flight struct {
	done chan struct{}
	t    *Trust
	err  error
}

func (m *Manager) ttl() time.Duration {
	if m.TTL <= 0 {
		return 10 * time.Minute
	}
	return m.TTL
}

func (m *Manager) log() *slog.Logger {
	if m.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return m.Logger
}

// Lookup finds a VM by name or UUID through the hypervisor.
func (m *Manager) Lookup(ctx context.Context, name string) (Domain, error) {
	return m.OOB.Find(ctx, name)
}

// Get returns a fresh trust for login on d, running the dual-band check
// when there is none. Concurrent callers for the same VM and login share
// one check. A trust in the last quarter of its life is returned and
// refreshed in the background.
func (m *Manager) Get(ctx context.Context, d Domain, login string) (*Trust, error) {
	k := key{d.URI, d.UUID, login}
	m.mu.Lock()
	if t, ok := m.trusts[k]; ok {
		left := time.Until(t.Expires)
		if left > 0 {
			if left < m.ttl()/4 {
				m.startFlight(k, d, login) // refresh; the old trust serves meanwhile
			}
			m.mu.Unlock()
			return t, nil
		}
		delete(m.trusts, k)
		go m.removeKey(d, t)
	}
	f := m.startFlight(k, d, login)
	m.mu.Unlock()
	select {
	case <-f.done:
		return f.t, f.err
	case <-ctx.Done():
		return nil, &Error{VM: d.Name, Step: "waiting for the check", Err: ctx.Err()}
	}
}

// startFlight starts a check for k unless one is under way, and returns
// it. m.mu must be held.
func (m *Manager) startFlight(k key, d Domain, login string) *flight {
	if f, ok := m.inflight[k]; ok {
		return f
	}
	if m.inflight == nil {
		m.inflight = make(map[key]*flight)
	}
	f := &flight{done: make(chan struct{})}
	m.inflight[k] = f
	go func() {
		timeout := m.Timeout
		if timeout <= 0 {
			timeout = 90 * time.Second
		}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		start := time.Now()
		t, err := m.check(ctx, d, login)
		if m.OnOutcome != nil {
			m.OnOutcome(d.Name, login, t, time.Since(start), err)
		}
		m.mu.Lock()
		delete(m.inflight, k)
		var old *Trust
		if err == nil {
			if m.trusts == nil {
				m.trusts = make(map[key]*Trust)
			}
			old = m.trusts[k]
			m.trusts[k] = t
		}
		f.t, f.err = t, err
		snapshot := m.snapshotLocked()
		m.mu.Unlock()
		close(f.done)
		if old != nil {
			m.removeKey(d, old)
		}
		if err == nil {
			m.changed(snapshot)
		}
	}()
	return f
}

// Drop forgets every trust with the VM whose UUID is uuid, as lifecycle
// events require. The keys stay in the guest until their expiry-time,
// since a stopped VM cannot be edited.
func (m *Manager) Drop(uuid, reason string) {
	m.mu.Lock()
	var dropped int
	for k := range m.trusts {
		if k.uuid == uuid {
			delete(m.trusts, k)
			dropped++
		}
	}
	snapshot := m.snapshotLocked()
	m.mu.Unlock()
	if dropped > 0 {
		m.log().Info("trust dropped", "uuid", uuid, "reason", reason, "logins", dropped)
		m.changed(snapshot)
	}
}

// Trusts returns a snapshot of the current trusts.
func (m *Manager) Trusts() []Trust {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.snapshotLocked()
}

func (m *Manager) snapshotLocked() []Trust {
	out := make([]Trust, 0, len(m.trusts))
	for _, t := range m.trusts {
		out = append(out, *t)
	}
	slices.SortFunc(out, func(a, b Trust) int {
		return strings.Compare(a.Domain.Name+"\x00"+a.Login, b.Domain.Name+"\x00"+b.Login)
	})
	return out
}

func (m *Manager) changed(snapshot []Trust) {
	if m.OnChange != nil {
		m.OnChange(snapshot)
	}
}

// Expire removes trusts past their expiry, and their keys from the guests.
// Run it periodically.
func (m *Manager) Expire() {
	m.mu.Lock()
	var expired []*Trust
	for k, t := range m.trusts {
		if time.Now().After(t.Expires) {
			expired = append(expired, t)
			delete(m.trusts, k)
		}
	}
	snapshot := m.snapshotLocked()
	m.mu.Unlock()
	for _, t := range expired {
		m.removeKey(t.Domain, t)
	}
	if len(expired) > 0 {
		m.changed(snapshot)
	}
}

// removeKey removes a superseded or expired epoch key from the guest, best
// effort: its expiry-time makes sshd refuse it anyway.
func (m *Manager) removeKey(d Domain, t *Trust) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.OOB.RemoveAuthorizedKey(ctx, d, t.Login, t.KeyLine); err != nil {
		m.log().Warn("could not remove an old trust key", "vm", d.Name, "login", t.Login, "err", err)
	}
}

// check runs the dual-band check for login on d (DESIGN.md, steps 1–6).
func (m *Manager) check(ctx context.Context, d Domain, login string) (*Trust, error) {
	fail := func(step string, err error) (*Trust, error) {
		return nil, &Error{VM: d.Name, Step: step, Err: err}
	}
	// 1. The domain exists and runs, and its agent answers.
	d, err := m.OOB.Find(ctx, d.UUID)
	if err != nil {
		return fail("finding the VM", err)
	}
	if !d.Running {
		return fail("finding the VM", fmt.Errorf("%s: VM is not running", d.Name))
	}
	if err := m.OOB.Ping(ctx, d); err != nil {
		return fail("guest agent", err)
	}
	// 2. Its address, cross-checked by the hypervisor.
	ip, err := m.OOB.Address(ctx, d)
	if err != nil {
		return fail("address", err)
	}
	port := m.SSHPort
	if port == 0 {
		port = 22
	}
	addr := net.JoinHostPort(ip.String(), strconv.Itoa(port))
	// 3. Its host keys, read out of band.
	hostKeys, err := m.readHostKeys(ctx, d)
	if err != nil {
		return fail("host keys", err)
	}
	if err := m.checkClones(ctx, d, hostKeys); err != nil {
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
	if err := m.OOB.AddAuthorizedKey(ctx, d, login, t.KeyLine); err != nil {
		return fail("installing the bastion's key", err)
	}
	installed := true
	defer func() {
		if installed {
			m.removeKey(d, t)
		}
	}()
	// 5. The nonce round trips, over an SSH connection that must present a
	// host key read in step 3.
	client, err := m.dialInBand(ctx, t)
	if err != nil {
		return fail("in-band connection", err)
	}
	defer client.Close()
	modes := m.Modes
	if len(modes) == 0 {
		modes = []Mode{OBIB, IBOB}
	}
	for _, mode := range modes {
		if err := m.roundTrip(ctx, d, login, client, mode); err != nil {
			return fail("nonce "+string(mode), err)
		}
	}
	// 6. Trusted: every step held.
	t.Modes = modes
	installed = false
	m.log().Info("trust established", "vm", d.Name, "login", login, "addr", addr,
		"host_key", t.Fingerprint(), "modes", modes, "expires", t.Expires.UTC().Format(time.RFC3339))
	return t, nil
}

// hostKeyFiles are read in order of preference.
var hostKeyFiles = []string{
	"/etc/ssh/ssh_host_ed25519_key.pub",
	"/etc/ssh/ssh_host_ecdsa_key.pub",
	"/etc/ssh/ssh_host_rsa_key.pub",
}

func (m *Manager) readHostKeys(ctx context.Context, d Domain) ([]ssh.PublicKey, error) {
	var keys []ssh.PublicKey
	var firstErr error
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
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		keys = append(keys, k)
	}
	if len(keys) == 0 {
		if firstErr != nil {
			// An agent that cannot read files says why (disabled, silent).
			return nil, firstErr
		}
		return nil, ErrNoHostKeys
	}
	return keys, nil
}

// checkClones refuses a VM presenting a host key that another existing VM
// has presented: overlays of one image share keys, and the bastion cannot
// tell which of them answers on the network. The other VM's trusts are
// dropped too.
func (m *Manager) checkClones(ctx context.Context, d Domain, keys []ssh.PublicKey) error {
	m.mu.Lock()
	if m.hostKeys == nil {
		m.hostKeys = make(map[string]map[string]bool)
	}
	var others []string
	for _, k := range keys {
		fp := ssh.FingerprintSHA256(k)
		if m.hostKeys[fp] == nil {
			m.hostKeys[fp] = make(map[string]bool)
		}
		m.hostKeys[fp][d.UUID] = true
		for uuid := range m.hostKeys[fp] {
			if uuid != d.UUID && !slices.Contains(others, uuid) {
				others = append(others, uuid)
			}
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

// dialInBand connects to the VM's sshd as the login with the epoch key,
// accepting only a host key read out of band.
func (m *Manager) dialInBand(ctx context.Context, t *Trust) (*ssh.Client, error) {
	var algos []string
	for _, k := range t.HostKeys {
		if k.Type() == ssh.KeyAlgoRSA {
			algos = append(algos, ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256)
		} else {
			algos = append(algos, k.Type())
		}
	}
	var mismatch error
	config := &ssh.ClientConfig{
		User:              t.Login,
		Auth:              []ssh.AuthMethod{ssh.PublicKeys(t.Signer)},
		HostKeyAlgorithms: algos,
		HostKeyCallback: func(_ string, _ net.Addr, key ssh.PublicKey) error {
			for _, k := range t.HostKeys {
				if subtle.ConstantTimeCompare(k.Marshal(), key.Marshal()) == 1 {
					return nil
				}
			}
			mismatch = fmt.Errorf("%w: %s presented %s", ErrHostKeyMismatch, t.Addr, ssh.FingerprintSHA256(key))
			return mismatch
		},
		ClientVersion: "SSH-2.0-bastion-trust",
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", t.Addr)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInBand, err)
	}
	if deadline, ok := ctx.Deadline(); ok {
		conn.SetDeadline(deadline)
	}
	c, chans, reqs, err := ssh.NewClientConn(conn, t.Addr, config)
	if err != nil {
		conn.Close()
		if mismatch != nil {
			return nil, mismatch
		}
		return nil, fmt.Errorf("%w: %v", ErrInBand, err)
	}
	return ssh.NewClient(c, chans, reqs), nil
}

// roundTrip writes a nonce through one channel and reads it back through
// the other. The file name carries 128 random bits, the value 256; the
// value is compared in constant time and never logged.
func (m *Manager) roundTrip(ctx context.Context, d Domain, login string, client *ssh.Client, mode Mode) error {
	name, err := randomHex(16)
	if err != nil {
		return err
	}
	value, err := randomHex(32)
	if err != nil {
		return err
	}
	path := "/tmp/.bastion-nonce-" + name
	sc, err := sftp.NewClient(client)
	if err != nil {
		return fmt.Errorf("%w: sftp: %v", ErrInBand, err)
	}
	defer sc.Close()
	defer func() {
		// Best effort, whichever way it went: leave nothing behind.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 20*time.Second)
		defer cancel()
		if err := m.OOB.RemoveFile(cctx, d, path); err != nil {
			m.log().Warn("could not remove a nonce file", "vm", d.Name, "err", err)
		}
	}()
	var got []byte
	switch mode {
	case OBIB:
		if err := m.OOB.WriteFile(ctx, d, path, []byte(value)); err != nil {
			return err
		}
		if login != "root" {
			if err := m.OOB.Chown(ctx, d, path, login); err != nil {
				return err
			}
		}
		got, err = readAll(sc, path)
		if err != nil {
			return fmt.Errorf("%w: reading the nonce: %v", ErrInBand, err)
		}
	case IBOB:
		if err := writeFile(sc, path, []byte(value)); err != nil {
			return fmt.Errorf("%w: writing the nonce: %v", ErrInBand, err)
		}
		got, err = m.OOB.ReadFile(ctx, d, path)
		if err != nil {
			return err
		}
	default:
		return fmt.Errorf("unknown mode %q", mode)
	}
	if subtle.ConstantTimeCompare(got, []byte(value)) != 1 {
		return ErrNonceMismatch
	}
	return nil
}

func readAll(sc *sftp.Client, path string) ([]byte, error) {
	f, err := sc.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, 4096))
}

func writeFile(sc *sftp.Client, path string, data []byte) error {
	f, err := sc.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL)
	if err != nil {
		return err
	}
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func randomHex(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}

package trust

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/vm"
)

// OutOfBand is the trusted management channel into VMs: the hypervisor and
// the guest agent. *hypervisor.Pool is one. Errors wrap a sentinel whose
// text may be shown to a user first, then their detail (see vm.Cause).
type OutOfBand interface {
	Find(ctx context.Context, name string) (vm.Domain, error)
	Ping(ctx context.Context, d vm.Domain) error
	Address(ctx context.Context, d vm.Domain) (vm.Address, error)
	ReadFile(ctx context.Context, d vm.Domain, path string) ([]byte, error)
	WriteFile(ctx context.Context, d vm.Domain, path string, data []byte) error
	RemoveFile(ctx context.Context, d vm.Domain, path string) error
	Chown(ctx context.Context, d vm.Domain, path, user string) error
	AddAuthorizedKey(ctx context.Context, d vm.Domain, user, line string) error
	RemoveAuthorizedKey(ctx context.Context, d vm.Domain, user, line string) error
	AuthorizedKeys(ctx context.Context, d vm.Domain, user string) ([]string, error)
}

// Errors of the in-band half and of the check as a whole. A host key that
// is not the one read through the hypervisor is keys.ErrHostKeyMismatch.
var (
	ErrNonceMismatch = errors.New("the value read back does not match the value written")
	ErrNoHostKeys    = errors.New("no SSH host keys found in the guest")
	ErrClone         = errors.New("another VM presents the same host key (a clone?)")
	ErrInBand        = errors.New("the VM's sshd could not be reached")
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
// needed this trust: the step and the cause, without detail.
func (e *Error) UserMessage() string {
	cause := vm.Cause(e.Err).Error()
	if errors.Is(e.Err, keys.ErrHostKeyMismatch) {
		cause = "the VM's host key is not the one read through the hypervisor"
	}
	return fmt.Sprintf("could not verify the VM (%s: %s)", e.Step, cause)
}

// Trust is an established, verified trust with one login on one VM.
type Trust struct {
	Domain      vm.Domain
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

// Upstream is the way into the VM that t verified.
func (t *Trust) Upstream() keys.Upstream {
	return keys.Upstream{Addr: t.Addr, HostKeys: t.HostKeys, Signer: t.Signer}
}

// Manager establishes and keeps trusts. Set its fields before use.
type Manager struct {
	OOB      OutOfBand
	Instance string        // names this bastion in key comments; required
	TTL      time.Duration // 0 means 10 minutes
	Modes    []Mode        // nil means both, OB-IB then IB-OB
	SSHPort  int           // 0 means 22
	// Timeout bounds one whole check, its wait for a turn included; 0
	// means 90 seconds.
	Timeout time.Duration
	// MaxChecks is how many checks run at once over all VMs; 0 means 16.
	// The others wait their turn.
	MaxChecks int
	// Ciphers are preferred in this order on the in-band connection to
	// the VM; nil means x/crypto's defaults.
	Ciphers []string
	// StateDir, if set, holds trust.json, rewritten whole on every change
	// of the set of trusts (see state.go).
	StateDir string
	Logger   *slog.Logger // if nil, logs are discarded
	Audit    audit.Sink   // receives trust_verified, trust_failed and trust_dropped; if nil, they are dropped

	mu        sync.Mutex
	turns     chan struct{} // one token per running check; made with the first
	trusts    map[key]*Trust
	forgotten map[key]string // host key fingerprints of trusts Forget dropped, for the next check
	inflight  map[key]*flight
	hostKeys  map[string]map[string]bool // host key fingerprint → UUIDs seen presenting it

	stateMu     sync.Mutex // serialises writes of the state file; taken before mu
	stateBehind bool       // the last write of the state file failed; under stateMu
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

func (m *Manager) timeout() time.Duration {
	if m.Timeout <= 0 {
		return 90 * time.Second
	}
	return m.Timeout
}

func (m *Manager) log() *slog.Logger {
	if m.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return m.Logger
}

// Start writes an empty state file, so that `trust ls` does not show the
// trusts of an earlier run, and expires trusts every 30 seconds until stop
// is called. A state directory it cannot write is an error.
func (m *Manager) Start() (stop func(), err error) {
	m.stateMu.Lock()
	err = m.writeState(nil)
	m.stateMu.Unlock()
	if err != nil {
		return nil, err
	}
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(30 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				m.Expire()
				m.retryState()
			case <-done:
				return
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(done) }) }, nil
}

// Resolve returns the way into login on d that a fresh trust verified,
// running the dual-band check when there is none (see Get).
func (m *Manager) Resolve(ctx context.Context, d vm.Domain, login string) (keys.Upstream, error) {
	t, err := m.Get(ctx, d, login)
	if err != nil {
		return keys.Upstream{}, err
	}
	return t.Upstream(), nil
}

// Establish makes sure a fresh trust for login on d exists, as dispensing
// a VM does before it is reported ready.
func (m *Manager) Establish(ctx context.Context, d vm.Domain, login string) error {
	_, err := m.Get(ctx, d, login)
	return err
}

// Counts returns how many trusts are held and unexpired (valid) and how
// many checks are under way (checking), refreshes of valid trusts among
// them.
func (m *Manager) Counts() (valid, checking int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := time.Now()
	for _, t := range m.trusts {
		if now.Before(t.Expires) {
			valid++
		}
	}
	return valid, len(m.inflight)
}

// Get returns a fresh trust for login on d, running the dual-band check
// when there is none. Concurrent callers for the same VM and login share
// one check. A trust in the last quarter of its life is returned and
// refreshed in the background.
func (m *Manager) Get(ctx context.Context, d vm.Domain, login string) (*Trust, error) {
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
		go func() {
			m.removeKey(d, t)
			m.changed()
		}()
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
func (m *Manager) startFlight(k key, d vm.Domain, login string) *flight {
	if f, ok := m.inflight[k]; ok {
		return f
	}
	if m.inflight == nil {
		m.inflight = make(map[key]*flight)
	}
	f := &flight{done: make(chan struct{})}
	m.inflight[k] = f
	if m.turns == nil {
		n := m.MaxChecks
		if n <= 0 {
			n = 16
		}
		m.turns = make(chan struct{}, n)
	}
	turns := m.turns
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), m.timeout())
		defer cancel()
		start := time.Now()
		var t *Trust
		var err error
		select {
		case turns <- struct{}{}:
			t, err = m.check(ctx, d, login)
			<-turns
		case <-ctx.Done():
			err = &Error{VM: d.Name, Step: "waiting for a turn to check", Err: fmt.Errorf("%w: %d checks running", ctx.Err(), cap(turns))}
		}
		m.outcome(d.Name, login, t, time.Since(start), err)
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
		oldKey, wasForgotten := m.forgotten[k]
		delete(m.forgotten, k)
		m.mu.Unlock()
		if err == nil && wasForgotten && oldKey != t.Fingerprint() {
			m.log().Warn("the VM's host key changed; the check proved the new one", "vm", d.Name, "old", oldKey, "new", t.Fingerprint())
			m.Audit.Emit(audit.Event{Type: audit.HostKeyChanged, VM: d.Name, Login: login,
				Detail: fmt.Sprintf("old %s new %s", oldKey, t.Fingerprint())})
		}
		if err == nil {
			m.changed() // before the callers go on, so the file shows what they use
		}
		close(f.done)
		if old != nil {
			m.removeKey(d, old)
		}
	}()
	return f
}

// outcome audits the end of a check.
func (m *Manager) outcome(name, login string, t *Trust, took time.Duration, err error) {
	took = took.Round(time.Millisecond)
	if err != nil {
		m.Audit.Emit(audit.Event{Type: audit.TrustFailed, VM: name, Login: login, Reason: err.Error(),
			Detail: fmt.Sprintf("took %s", took)})
		return
	}
	m.Audit.Emit(audit.Event{Type: audit.TrustVerified, VM: name, Login: login,
		Detail: fmt.Sprintf("addr %s host key %s modes %v expires %s took %s", t.Addr, t.Fingerprint(), t.Modes,
			t.Expires.UTC().Format(time.RFC3339), took)})
}

// Forget drops the trust for login on d because the VM no longer honours
// it (its sshd refused the key, or presented another host key), so that
// the next Get runs the whole check again. A host key the new check proves
// different from the old one is audited with both fingerprints.
func (m *Manager) Forget(d vm.Domain, login, why string) {
	k := key{d.URI, d.UUID, login}
	m.mu.Lock()
	t, ok := m.trusts[k]
	if ok {
		delete(m.trusts, k)
		if m.forgotten == nil {
			m.forgotten = make(map[key]string)
		}
		m.forgotten[k] = t.Fingerprint()
	}
	m.mu.Unlock()
	if !ok {
		return
	}
	m.log().Info("trust dropped: the VM no longer honours it", "vm", d.Name, "login", login, "why", why)
	m.Audit.Emit(audit.Event{Type: audit.TrustDropped, VM: d.Name, Login: login, Reason: why})
	m.changed()
}

// HandleEvent drops the trusts of the VM an event is about when the event
// breaks the binding that was verified: a stop, a reboot, a migration, an
// undefine, the agent leaving; and every trust on a hypervisor whose
// connection came back, since its events in between went unheard. It does
// not block; pass it as hypervisor.Options.OnEvent.
func (m *Manager) HandleEvent(e vm.Event) {
	switch e.Kind {
	case vm.EventStopped, vm.EventRebooted, vm.EventMigrated, vm.EventUndefined, vm.EventAgentGone:
		go m.drop(func(k key) bool { return k.uuid == e.UUID }, string(e.Kind))
	case vm.EventReconnected:
		go m.drop(func(k key) bool { return k.uri == e.URI }, string(e.Kind))
	}
}

// Drop forgets every trust with the VM whose UUID is uuid, as lifecycle
// events require. The keys stay in the guest until their expiry-time,
// since a stopped VM cannot be edited.
func (m *Manager) Drop(uuid, reason string) {
	m.drop(func(k key) bool { return k.uuid == uuid }, reason)
}

// drop forgets the trusts whose keys match, auditing each.
func (m *Manager) drop(match func(key) bool, reason string) {
	m.mu.Lock()
	var dropped []*Trust
	for k, t := range m.trusts {
		if match(k) {
			delete(m.trusts, k)
			dropped = append(dropped, t)
		}
	}
	m.mu.Unlock()
	if len(dropped) == 0 {
		return
	}
	for _, t := range dropped {
		m.log().Info("trust dropped", "vm", t.Domain.Name, "login", t.Login, "reason", reason)
		m.Audit.Emit(audit.Event{Type: audit.TrustDropped, VM: t.Domain.Name, Login: t.Login, Reason: reason})
	}
	m.changed()
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

// changed records the current set of trusts in the state file. The set is
// read under the file's lock, so the last write is always the newest set.
func (m *Manager) changed() {
	m.stateMu.Lock()
	defer m.stateMu.Unlock()
	m.recordLocked()
}

// recordLocked writes the state file and remembers whether it failed.
// m.stateMu must be held.
func (m *Manager) recordLocked() {
	err := m.writeState(m.Trusts())
	switch {
	case err != nil:
		m.log().Error("trust state file not written; the previous one stays until there is room", "err", err)
	case m.stateBehind:
		m.log().Info("trust state file written again")
	}
	m.stateBehind = err != nil
}

// retryState writes the state file again if the last write failed (a full
// disk, say), so that it catches up without waiting for the next change.
func (m *Manager) retryState() {
	m.stateMu.Lock()
	defer m.stateMu.Unlock()
	if m.stateBehind {
		m.recordLocked()
	}
}

// Expire removes trusts past their expiry, and their keys from the guests.
// Start runs it periodically.
func (m *Manager) Expire() {
	m.mu.Lock()
	var expired []*Trust
	for k, t := range m.trusts {
		if time.Now().After(t.Expires) {
			expired = append(expired, t)
			delete(m.trusts, k)
		}
	}
	m.mu.Unlock()
	for _, t := range expired {
		m.removeKey(t.Domain, t)
	}
	if len(expired) > 0 {
		m.changed()
	}
}

// removeKey removes a superseded or expired epoch key from the guest, best
// effort: its expiry-time makes sshd refuse it anyway.
func (m *Manager) removeKey(d vm.Domain, t *Trust) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.OOB.RemoveAuthorizedKey(ctx, d, t.Login, t.KeyLine); err != nil {
		m.log().Warn("could not remove an old trust key", "vm", d.Name, "login", t.Login, "err", err)
	}
}

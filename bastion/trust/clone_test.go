package trust

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/bastionvm/bastion/internal/testenv"
	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/vm"
)

// guests routes the out-of-band calls for each VM to its own localGuest,
// by UUID: two VMs, each with a real sshd of its own.
type guests map[string]*localGuest

func (gs guests) of(d vm.Domain) *localGuest { return gs[d.UUID] }

func (gs guests) Find(_ context.Context, name string) (vm.Domain, error) {
	for uuid := range gs {
		if name == uuid || name == "vm-"+uuid {
			return vm.Domain{URI: "test:///", Name: "vm-" + uuid, UUID: uuid, Running: true}, nil
		}
	}
	return vm.Domain{}, fmt.Errorf("%w: %s", vm.ErrNoSuchVM, name)
}
func (gs guests) Ping(ctx context.Context, d vm.Domain) error { return gs.of(d).Ping(ctx, d) }
func (gs guests) Address(ctx context.Context, d vm.Domain) (vm.Address, error) {
	return gs.of(d).Address(ctx, d)
}
func (gs guests) ReadFile(ctx context.Context, d vm.Domain, path string) ([]byte, error) {
	return gs.of(d).ReadFile(ctx, d, path)
}
func (gs guests) WriteFile(ctx context.Context, d vm.Domain, path string, data []byte) error {
	return gs.of(d).WriteFile(ctx, d, path, data)
}
func (gs guests) RemoveFile(ctx context.Context, d vm.Domain, path string) error {
	return gs.of(d).RemoveFile(ctx, d, path)
}
func (gs guests) Chown(ctx context.Context, d vm.Domain, path, user string) error {
	return gs.of(d).Chown(ctx, d, path, user)
}
func (gs guests) AddAuthorizedKey(ctx context.Context, d vm.Domain, user, line string) error {
	return gs.of(d).AddAuthorizedKey(ctx, d, user, line)
}
func (gs guests) RemoveAuthorizedKey(ctx context.Context, d vm.Domain, user, line string) error {
	return gs.of(d).RemoveAuthorizedKey(ctx, d, user, line)
}
func (gs guests) AuthorizedKeys(ctx context.Context, d vm.Domain, user string) ([]string, error) {
	return gs.of(d).AuthorizedKeys(ctx, d, user)
}

// TestClaimedHostKeyDoesNotKnockOutAnotherVM: a guest that copies another
// VM's public host key into its /etc/ssh cannot prove it holds it; its own
// check fails, and the other VM keeps its trust and passes its next check.
func TestClaimedHostKeyDoesNotKnockOutAnotherVM(t *testing.T) {
	web1, hostile := newLocalGuest(t), newLocalGuest(t)
	hostile.hostKey = web1.sshd.HostKey // claims web1's key; its sshd presents its own
	gs := guests{"uuid-web1": web1, "uuid-hostile": hostile}
	// Both sshds listen on 127.0.0.1; each guest's port is its own.
	m := &Manager{OOB: gs, Instance: "test", Timeout: 30 * time.Second}
	d1, _ := gs.Find(context.Background(), "uuid-web1")
	d2, _ := gs.Find(context.Background(), "uuid-hostile")

	m.SSHPort = web1.port()
	if _, err := m.Get(context.Background(), d1, web1.sshd.Login); err != nil {
		t.Fatalf("web1: %v", err)
	}
	m.SSHPort = hostile.port()
	_, err := m.Get(context.Background(), d2, hostile.sshd.Login)
	if !errors.Is(err, keys.ErrHostKeyMismatch) {
		t.Fatalf("the hostile guest's check: %v, want a host key mismatch", err)
	}
	if trusts := m.Trusts(); len(trusts) != 1 || trusts[0].Domain.UUID != "uuid-web1" {
		t.Fatalf("trusts after the hostile check: %+v; want web1's only", trusts)
	}
	m.Drop("uuid-web1", "test") // force a new check of web1
	m.SSHPort = web1.port()
	if _, err := m.Get(context.Background(), d1, web1.sshd.Login); err != nil {
		t.Fatalf("web1 checked again after the hostile guest: %v", err)
	}
}

// TestProvenSharedHostKeyIsAClone: two VMs whose sshds both hold one key
// (overlays of one image) are clones: the second is refused and the
// first's trust dropped.
func TestProvenSharedHostKeyIsAClone(t *testing.T) {
	g := newLocalGuest(t)
	gs := guests{"uuid-a": g, "uuid-b": g} // one sshd answers for both
	m := &Manager{OOB: gs, Instance: "test", SSHPort: g.port(), Timeout: 30 * time.Second}
	a, _ := gs.Find(context.Background(), "uuid-a")
	b, _ := gs.Find(context.Background(), "uuid-b")
	if _, err := m.Get(context.Background(), a, g.sshd.Login); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Get(context.Background(), b, g.sshd.Login); !errors.Is(err, ErrClone) {
		t.Fatalf("the second VM presenting the same key: %v, want ErrClone", err)
	}
	if len(m.Trusts()) != 0 {
		t.Fatalf("trusts after a clone was found: %+v", m.Trusts())
	}
}

// TestOnlyTheProvenHostKeyIsPinned: of the keys a guest lists, the trust
// pins the one its sshd proved it holds.
func TestOnlyTheProvenHostKeyIsPinned(t *testing.T) {
	g := newLocalGuest(t)
	extra, _ := testenv.NewKey(t)
	g.extraKey = extra.PublicKey()
	tr, err := g.manager().Get(context.Background(), vm1, g.sshd.Login)
	if err != nil {
		t.Fatal(err)
	}
	if len(tr.HostKeys) != 1 || string(tr.HostKeys[0].Marshal()) != string(g.sshd.HostKey.Marshal()) {
		t.Fatalf("pinned %d keys; want only the sshd's own", len(tr.HostKeys))
	}
}

// gate is an out-of-band channel whose Ping waits to be let through, and
// which counts how many wait at once: how many checks run.
type gate struct {
	guests
	mu      sync.Mutex
	waiting int
	most    int
	let     chan struct{}
}

func (g *gate) Ping(ctx context.Context, d vm.Domain) error {
	g.mu.Lock()
	g.waiting++
	g.most = max(g.most, g.waiting)
	g.mu.Unlock()
	defer func() {
		g.mu.Lock()
		g.waiting--
		g.mu.Unlock()
	}()
	select {
	case <-g.let:
		return errors.New("stopped here: the test counts checks, it does not finish them")
	case <-ctx.Done():
		return ctx.Err()
	}
}

// TestChecksRunAtMostMaxChecksAtOnce: checks of many VMs at once wait for
// a turn beyond MaxChecks.
func TestChecksRunAtMostMaxChecksAtOnce(t *testing.T) {
	g := newLocalGuest(t)
	gs := guests{}
	for i := 0; i < 6; i++ {
		gs[fmt.Sprintf("uuid-%d", i)] = g
	}
	gt := &gate{guests: gs, let: make(chan struct{})}
	m := &Manager{OOB: gt, Instance: "test", MaxChecks: 2, Timeout: 30 * time.Second}
	var wg sync.WaitGroup
	for uuid := range gs {
		d, _ := gs.Find(context.Background(), uuid)
		wg.Add(1)
		go func() {
			defer wg.Done()
			m.Get(context.Background(), d, "root")
		}()
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		gt.mu.Lock()
		waiting := gt.waiting
		gt.mu.Unlock()
		if waiting == 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // room for a third, if the cap did not hold
	close(gt.let)
	wg.Wait()
	if gt.most != 2 {
		t.Fatalf("%d checks ran at once, want MaxChecks = 2", gt.most)
	}
}

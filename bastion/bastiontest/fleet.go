// Package bastiontest has fakes of what the front door is wired to, for
// tests and the benchmark harness.
package bastiontest

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/vm"
)

// Fleet is a fixed set of running VMs whose upstreams are given, not
// verified: the front door's VMs and Resolver where the stand-in VM is an
// sshd on 127.0.0.1. Safe for concurrent use.
type Fleet struct {
	mu     sync.Mutex
	vms    map[string]keys.Upstream
	healed map[string]keys.Upstream // what Forget turns a VM's upstream into
	forgot int
	delay  time.Duration
}

// SetStale makes name reached at stale until Forget is called for it,
// then at fresh: a trust the VM stopped honouring, and the one a new check
// would establish.
func (f *Fleet) SetStale(name string, stale, fresh keys.Upstream) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.vms[name] = stale
	f.healed[name] = fresh
}

// Forget turns d's upstream into the fresh one SetStale gave, if any.
func (f *Fleet) Forget(d vm.Domain, _, _ string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.forgot++
	if up, ok := f.healed[d.Name]; ok {
		f.vms[d.Name] = up
		delete(f.healed, d.Name)
	}
}

// Forgotten is how many times Forget was called.
func (f *Fleet) Forgotten() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.forgot
}

// SetDelay makes every Resolve take d first, as a trust check does.
func (f *Fleet) SetDelay(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.delay = d
}

// NewFleet returns a Fleet that knows no VM yet.
func NewFleet() *Fleet {
	return &Fleet{vms: make(map[string]keys.Upstream), healed: make(map[string]keys.Upstream)}
}

// Set makes name known, reached at up.
func (f *Fleet) Set(name string, up keys.Upstream) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.vms[name] = up
}

// Find returns the VM called name, or an error wrapping vm.ErrNoSuchVM.
func (f *Fleet) Find(_ context.Context, name string) (vm.Domain, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.vms[name]; !ok {
		return vm.Domain{}, fmt.Errorf("%w: %s", vm.ErrNoSuchVM, name)
	}
	return domain(name), nil
}

// List returns every VM set.
func (f *Fleet) List(context.Context) ([]vm.Domain, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var vms []vm.Domain
	for name := range f.vms {
		vms = append(vms, domain(name))
	}
	return vms, nil
}

// Resolve returns the upstream set for d, whatever the login.
func (f *Fleet) Resolve(ctx context.Context, d vm.Domain, _ string) (keys.Upstream, error) {
	f.mu.Lock()
	delay := f.delay
	f.mu.Unlock()
	select {
	case <-time.After(delay):
	case <-ctx.Done():
		return keys.Upstream{}, ctx.Err()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	up, ok := f.vms[d.Name]
	if !ok {
		return keys.Upstream{}, fmt.Errorf("%w: %s", vm.ErrNoSuchVM, d.Name)
	}
	return up, nil
}

func domain(name string) vm.Domain {
	return vm.Domain{URI: "test:///bastiontest", UUID: "bastiontest-" + name, Name: name, Running: true}
}

package testenv

import (
	"context"
	"fmt"
	"sync"

	"github.com/bastionvm/bastion/bastion"
)

// Resolver is a bastion.Resolver (and Lister) for a fixed set of VMs whose
// upstreams are given, not verified: for tests and the benchmark harness,
// where the stand-in VM is an sshd on 127.0.0.1. Safe for concurrent use.
type Resolver struct {
	mu  sync.Mutex
	vms map[string]bastion.Upstream
}

// NewResolver returns a Resolver that knows no VM yet.
func NewResolver() *Resolver {
	return &Resolver{vms: make(map[string]bastion.Upstream)}
}

// Set makes name known, reached at up.
func (r *Resolver) Set(name string, up bastion.Upstream) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.vms[name] = up
}

func (r *Resolver) Lookup(_ context.Context, name string) (bastion.VM, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.vms[name]; !ok {
		return bastion.VM{}, fmt.Errorf("%w: %s", bastion.ErrUnknownVM, name)
	}
	return bastion.VM{Name: name}, nil
}

func (r *Resolver) Resolve(_ context.Context, vm bastion.VM, _ string) (bastion.Upstream, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.vms[vm.Name], nil
}

func (r *Resolver) List(context.Context) ([]bastion.VM, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var vms []bastion.VM
	for name := range r.vms {
		vms = append(vms, bastion.VM{Name: name})
	}
	return vms, nil
}

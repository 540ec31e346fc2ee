package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/hypervisor"
	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/bastion/trust"
)

// outOfBand is the hypervisor pool as trust's out-of-band channel. The two
// packages do not know each other; their Domain types have the same fields.
type outOfBand struct{ pool *hypervisor.Pool }

func (o outOfBand) Find(ctx context.Context, name string) (trust.Domain, error) {
	d, err := o.pool.Find(ctx, name)
	return trust.Domain(d), err
}

func (o outOfBand) Ping(ctx context.Context, d trust.Domain) error {
	return o.pool.Ping(ctx, hypervisor.Domain(d))
}

func (o outOfBand) Address(ctx context.Context, d trust.Domain) (netip.Addr, error) {
	a, err := o.pool.Address(ctx, hypervisor.Domain(d))
	return a.IP, err
}

func (o outOfBand) ReadFile(ctx context.Context, d trust.Domain, path string) ([]byte, error) {
	return o.pool.ReadFile(ctx, hypervisor.Domain(d), path)
}

func (o outOfBand) WriteFile(ctx context.Context, d trust.Domain, path string, data []byte) error {
	return o.pool.WriteFile(ctx, hypervisor.Domain(d), path, data)
}

func (o outOfBand) RemoveFile(ctx context.Context, d trust.Domain, path string) error {
	return o.pool.RemoveFile(ctx, hypervisor.Domain(d), path)
}

func (o outOfBand) Chown(ctx context.Context, d trust.Domain, path, user string) error {
	return o.pool.Chown(ctx, hypervisor.Domain(d), path, user)
}

func (o outOfBand) AddAuthorizedKey(ctx context.Context, d trust.Domain, user, line string) error {
	return o.pool.AddAuthorizedKey(ctx, hypervisor.Domain(d), user, line)
}

func (o outOfBand) RemoveAuthorizedKey(ctx context.Context, d trust.Domain, user, line string) error {
	return o.pool.RemoveAuthorizedKey(ctx, hypervisor.Domain(d), user, line)
}

// resolver is the trust manager as the front door's Resolver, and the
// hypervisors as its Lister.
type resolver struct {
	m    *trust.Manager
	pool *hypervisor.Pool
}

func (r resolver) List(ctx context.Context) ([]bastion.VM, error) {
	doms, err := r.pool.List(ctx)
	var vms []bastion.VM
	for _, d := range doms {
		if d.Running {
			vms = append(vms, bastion.VM{Name: d.Name, UUID: d.UUID, Hypervisor: d.URI, Labels: d.Labels})
		}
	}
	return vms, err
}

func (r resolver) Lookup(ctx context.Context, name string) (bastion.VM, error) {
	d, err := r.m.Lookup(ctx, name)
	if errors.Is(err, hypervisor.ErrNoSuchVM) {
		return bastion.VM{}, fmt.Errorf("%w: %v", bastion.ErrUnknownVM, err)
	}
	if err != nil {
		return bastion.VM{}, &trust.Error{VM: name, Step: "finding the VM", Err: err}
	}
	return bastion.VM{Name: d.Name, UUID: d.UUID, Hypervisor: d.URI, Labels: d.Labels}, nil
}

func (r resolver) Resolve(ctx context.Context, vm bastion.VM, login string) (bastion.Upstream, error) {
	t, err := r.m.Get(ctx, trust.Domain{URI: vm.Hypervisor, UUID: vm.UUID, Name: vm.Name}, login)
	if err != nil {
		return bastion.Upstream{}, err
	}
	return bastion.Upstream{Addr: t.Addr, HostKeys: t.HostKeys, Signer: t.Signer}, nil
}

// trustRecord is one line of the trust state file: what `bastion trust ls`
// shows. It holds no secret.
type trustRecord struct {
	VM          string    `json:"vm"`
	UUID        string    `json:"uuid"`
	Hypervisor  string    `json:"hypervisor"`
	Login       string    `json:"login"`
	Addr        string    `json:"addr"`
	HostKey     string    `json:"host_key"`
	Modes       []string  `json:"modes"`
	Established time.Time `json:"established"`
	Expires     time.Time `json:"expires"`
}

const trustStateFile = "trust.json"

// writeTrustState replaces the state file with the current trusts.
func writeTrustState(dir string, trusts []trust.Trust) error {
	records := make([]trustRecord, 0, len(trusts))
	for _, t := range trusts {
		var modes []string
		for _, m := range t.Modes {
			modes = append(modes, string(m))
		}
		records = append(records, trustRecord{VM: t.Domain.Name, UUID: t.Domain.UUID, Hypervisor: t.Domain.URI, Login: t.Login,
			Addr: t.Addr, HostKey: t.Fingerprint(), Modes: modes, Established: t.Established.UTC(), Expires: t.Expires.UTC()})
	}
	data, err := json.MarshalIndent(records, "", "  ")
	if err != nil {
		return err
	}
	return keys.WriteFileAtomic(filepath.Join(dir, trustStateFile), append(data, '\n'), 0o600)
}

// readTrustRecords reads the trust state file; none is no trusts.
func readTrustRecords(dir string) []trustRecord {
	records, _ := loadTrustRecords(dir)
	return records
}

func loadTrustRecords(dir string) ([]trustRecord, error) {
	path := filepath.Join(dir, trustStateFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var records []trustRecord
	if err := json.Unmarshal(data, &records); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return records, nil
}

// trustList prints the trust state file as a table.
func trustList(dir string, out io.Writer, now time.Time) error {
	records, err := loadTrustRecords(dir)
	if err != nil {
		return err
	}
	if len(records) == 0 {
		fmt.Fprintln(out, "no trusts (the bastion has not verified any VM yet)")
		return nil
	}
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "VM\tLOGIN\tSTATE\tEXPIRES\tADDRESS\tHOST KEY\tMODES")
	for _, r := range records {
		state := "trusted"
		if now.After(r.Expires) {
			state = "expired"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s (%s)\t%s\t%s\t%v\n", r.VM, r.Login, state, r.Expires.Format(time.RFC3339),
			until(r.Expires, now), r.Addr, r.HostKey, r.Modes)
	}
	return w.Flush()
}

func until(t, now time.Time) string {
	d := t.Sub(now).Round(time.Second)
	if d < 0 {
		return (-d).String() + " ago"
	}
	return "in " + d.String()
}

// Package dispense makes new VMs from templates: a copy-on-write overlay of
// a base image, a domain with the guest agent channel, started, waited for,
// and trusted, so that it is reachable through the bastion at once. A
// dispense that fails leaves nothing behind.
package dispense

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/vm"
)

// Hypervisor is what dispensing needs of the hypervisors. *hypervisor.Pool
// is one.
type Hypervisor interface {
	Find(ctx context.Context, name string) (vm.Domain, error)
	CreateOverlay(ctx context.Context, uri, pool, name, backing string, capacity, minFree uint64) (string, error)
	DeleteVolume(ctx context.Context, uri, path string) error
	DefineAndStart(ctx context.Context, uri, domainXML string) (vm.Domain, error)
	Remove(ctx context.Context, d vm.Domain) error
	Disks(ctx context.Context, d vm.Domain) ([]string, error)
	Ping(ctx context.Context, d vm.Domain) error
	SetHostname(ctx context.Context, d vm.Domain, name string) error
	Address(ctx context.Context, d vm.Domain) (vm.Address, error)
}

// Truster establishes the bastion's trust for a login on a VM.
// *trust.Manager is one.
type Truster interface {
	Establish(ctx context.Context, d vm.Domain, login string) error
}

// Template is what a VM is dispensed from.
type Template struct {
	Name       string
	Hypervisor string // libvirt URI
	Image      string // base qcow2 image, a path on the hypervisor host
	Pool       string // storage pool for the overlay
	DiskSize   uint64 // bytes; at least the image's virtual size
	MinFree    uint64 // bytes the pool must have free
	Kernel     string // direct kernel boot, if set
	Initrd     string
	Cmdline    string
	MemoryMiB  int
	VCPUs      int
	Network    string // libvirt network
	DomainType string // "qemu" (TCG) or "kvm"
	Logins     []string
	Labels     map[string]string
	Wait       time.Duration // for the agent, the address and trust
}

// Errors, for the user. A name that cannot be a VM's host name is
// vm.ErrBadName.
var (
	ErrNoTemplate = errors.New("no such template")
	ErrNameTaken  = errors.New("a VM of that name exists")
	ErrGaveUp     = errors.New("the VM did not become ready in time")
	ErrNotOurs    = errors.New("the bastion did not dispense this VM (use --force)")
)

// Labels the bastion stamps into a dispensed domain's <metadata>.
const (
	LabelBy       = "dispensed-by"
	LabelAt       = "dispensed-at"
	LabelTemplate = "dispensed-from"
)

// Dispenser dispenses and destroys VMs.
type Dispenser struct {
	Hypervisor Hypervisor
	Trust      Truster
	Templates  map[string]Template
	Logger     *slog.Logger // if nil, logs are discarded
	Audit      audit.Sink   // receives dispensed, dispense_failed and destroyed; if nil, they are dropped
}

// Plan is what dispensing name from template would make, before anything
// is made: the VM as policy sees it (its name, hypervisor and labels) and
// the logins it is trusted for. An unknown template is ErrNoTemplate, a
// name that cannot be a host name vm.ErrBadName.
func (d *Dispenser) Plan(template, name string) (vm.Domain, []string, error) {
	t, ok := d.Templates[template]
	if !ok {
		return vm.Domain{}, nil, fmt.Errorf("%w: %q (templates: %s)", ErrNoTemplate, template, strings.Join(d.templateNames(), ", "))
	}
	if err := vm.CheckHostName(name); err != nil {
		return vm.Domain{}, nil, err
	}
	return vm.Domain{URI: t.Hypervisor, Name: name, Labels: t.Labels}, t.Logins, nil
}

// Dispense makes VM name from the template, for account by, writing
// progress to out, and audits the outcome. On any failure it removes what
// it made.
func (d *Dispenser) Dispense(ctx context.Context, template, name, by string, out io.Writer) (vm.Domain, error) {
	began := time.Now()
	var stages []audit.Stage
	dom, err := d.dispense(ctx, template, name, by, out, &stages)
	ev := audit.Event{Account: by, VM: name, Detail: template,
		Activity: &audit.Activity{Seconds: seconds(time.Since(began)), Stages: stages}}
	if err != nil {
		ev.Type, ev.Reason = audit.DispenseFailed, err.Error()
	} else {
		ev.Type = audit.Dispensed
	}
	d.Audit.Emit(ev)
	return dom, err
}

// seconds is d in seconds, to the millisecond.
func seconds(d time.Duration) float64 { return float64(d.Milliseconds()) / 1000 }

func (d *Dispenser) dispense(ctx context.Context, template, name, by string, out io.Writer, stages *[]audit.Stage) (vm.Domain, error) {
	if _, _, err := d.Plan(template, name); err != nil {
		return vm.Domain{}, err
	}
	t := d.Templates[template]
	switch _, err := d.Hypervisor.Find(ctx, name); {
	case err == nil:
		return vm.Domain{}, fmt.Errorf("%w: %s", ErrNameTaken, name)
	case !errors.Is(err, vm.ErrNoSuchVM):
		return vm.Domain{}, err
	}
	started := time.Now()
	step := func(format string, args ...any) { fmt.Fprintf(out, format+"\r\n", args...) }
	// timed runs one stage and notes how long it took, failed or not.
	timed := func(stage string, fn func() error) error {
		at := time.Now()
		err := fn()
		*stages = append(*stages, audit.Stage{Name: stage, Seconds: seconds(time.Since(at))})
		return err
	}

	var undo []func()
	rollback := func(cause error) (vm.Domain, error) {
		step("failed: %v; removing what was made", cause)
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
		return vm.Domain{}, cause
	}
	// Undoing runs on its own deadline: ctx may be what ran out.
	cleanup := func(fn func(context.Context) error) error {
		c, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		return fn(c)
	}

	var disk string
	if err := timed("overlay", func() (err error) {
		disk, err = d.Hypervisor.CreateOverlay(ctx, t.Hypervisor, t.Pool, name+".qcow2", t.Image, t.DiskSize, t.MinFree)
		return err
	}); err != nil {
		return rollback(err)
	}
	undo = append(undo, func() {
		if err := cleanup(func(c context.Context) error { return d.Hypervisor.DeleteVolume(c, t.Hypervisor, disk) }); err != nil {
			d.log().Error("rollback: overlay", "path", disk, "err", err)
		}
	})
	step("overlay %s of %s", disk, t.Image)

	labels := map[string]string{}
	for k, v := range t.Labels {
		labels[k] = v
	}
	labels[LabelBy], labels[LabelAt], labels[LabelTemplate] = by, started.UTC().Format(time.RFC3339), t.Name
	var dom vm.Domain
	if err := timed("start", func() (err error) {
		dom, err = d.Hypervisor.DefineAndStart(ctx, t.Hypervisor, DomainXML(t, name, disk, labels))
		return err
	}); err != nil {
		return rollback(err)
	}
	undo = append(undo, func() {
		if err := cleanup(func(c context.Context) error { return d.Hypervisor.Remove(c, dom) }); err != nil {
			d.log().Error("rollback: domain", "vm", name, "err", err)
		}
	})
	step("domain %s (%s) started on %s", name, dom.UUID, t.Hypervisor)

	wait := t.Wait
	if wait <= 0 {
		wait = 5 * time.Minute
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	if err := timed("agent", func() error {
		return waitFor(wctx, out, "guest agent", func(c context.Context) error { return d.Hypervisor.Ping(c, dom) })
	}); err != nil {
		return rollback(err)
	}
	// The VM answers to its own name before anyone logs in, not to its
	// image's.
	if err := timed("hostname", func() error { return d.Hypervisor.SetHostname(wctx, dom, name) }); err != nil {
		return rollback(fmt.Errorf("setting the host name: %w", err))
	}
	step("host name %s", name)
	var addr vm.Address
	if err := timed("address", func() error {
		return waitFor(wctx, out, "address", func(c context.Context) error {
			a, err := d.Hypervisor.Address(c, dom)
			addr = a
			return err
		})
	}); err != nil {
		return rollback(err)
	}
	step("address %s", addr.IP)
	for _, login := range t.Logins {
		if err := timed("trust "+login, func() error {
			return waitFor(wctx, out, "trust for "+login, func(c context.Context) error { return d.Trust.Establish(c, dom, login) })
		}); err != nil {
			return rollback(err)
		}
	}
	dom.Labels = labels
	step("ready in %v", time.Since(started).Round(time.Second))
	return dom, nil
}

// waitFor retries try until it succeeds or ctx ends, saying what it waits
// for and, every few seconds, how long it has waited.
func waitFor(ctx context.Context, out io.Writer, what string, try func(context.Context) error) error {
	start := time.Now()
	fmt.Fprintf(out, "waiting for the %s...", what)
	last := start
	for {
		c, cancel := context.WithTimeout(ctx, 30*time.Second)
		err := try(c)
		cancel()
		if err == nil {
			fmt.Fprintf(out, " ok (%v)\r\n", time.Since(start).Round(100*time.Millisecond))
			return nil
		}
		select {
		case <-ctx.Done():
			fmt.Fprint(out, "\r\n")
			return fmt.Errorf("%w: %s, after %v: %w", ErrGaveUp, what, time.Since(start).Round(time.Second), err)
		case <-time.After(time.Second):
		}
		if time.Since(last) >= 5*time.Second {
			last = time.Now()
			fmt.Fprintf(out, " %v", time.Since(start).Round(time.Second))
		}
	}
}

// Destroy stops and undefines VM name and removes its disks, for account
// by, and audits it. A VM the bastion did not dispense needs force, and
// keeps its disks.
func (d *Dispenser) Destroy(ctx context.Context, name, by string, force bool, out io.Writer) error {
	if err := d.destroy(ctx, name, force, out); err != nil {
		return err
	}
	d.Audit.Emit(audit.Event{Type: audit.Destroyed, Account: by, VM: name})
	return nil
}

func (d *Dispenser) destroy(ctx context.Context, name string, force bool, out io.Writer) error {
	dom, err := d.Hypervisor.Find(ctx, name)
	if err != nil {
		return err
	}
	ours := dom.Labels[LabelBy] != ""
	if !ours && !force {
		return fmt.Errorf("%w: %s", ErrNotOurs, name)
	}
	var disks []string
	if ours {
		if disks, err = d.Hypervisor.Disks(ctx, dom); err != nil {
			return err
		}
	}
	if err := d.Hypervisor.Remove(ctx, dom); err != nil {
		return err
	}
	fmt.Fprintf(out, "domain %s stopped and undefined\r\n", name)
	for _, disk := range disks {
		if err := d.Hypervisor.DeleteVolume(ctx, dom.URI, disk); err != nil {
			return fmt.Errorf("disk %s: %w", disk, err)
		}
		fmt.Fprintf(out, "disk %s removed\r\n", disk)
	}
	if !ours {
		fmt.Fprintf(out, "its disks were kept: the bastion did not make them\r\n")
	}
	return nil
}

func (d *Dispenser) templateNames() []string {
	var names []string
	for n := range d.Templates {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

func (d *Dispenser) log() *slog.Logger {
	if d.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return d.Logger
}

// DomainXML is the libvirt definition of VM name from template t, with its
// disk at disk and labels in <metadata>.
func DomainXML(t Template, name, disk string, labels map[string]string) string {
	esc := func(s string) string {
		var b strings.Builder
		xml.EscapeText(&b, []byte(s))
		return b.String()
	}
	var b strings.Builder
	domType := t.DomainType
	if domType == "" {
		domType = "qemu"
	}
	fmt.Fprintf(&b, "<domain type='%s'>\n  <name>%s</name>\n", esc(domType), esc(name))
	fmt.Fprintf(&b, "  <metadata>\n    <bastion:labels xmlns:bastion=\"%s\">\n", vm.LabelsNamespace)
	keys := make([]string, 0, len(labels))
	for k := range labels {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, "      <label key=\"%s\">%s</label>\n", esc(k), esc(labels[k]))
	}
	b.WriteString("    </bastion:labels>\n  </metadata>\n")
	fmt.Fprintf(&b, "  <memory unit='MiB'>%d</memory>\n  <vcpu>%d</vcpu>\n", max(t.MemoryMiB, 128), max(t.VCPUs, 1))
	b.WriteString("  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n")
	if t.Kernel != "" {
		fmt.Fprintf(&b, "    <kernel>%s</kernel>\n", esc(t.Kernel))
		if t.Initrd != "" {
			fmt.Fprintf(&b, "    <initrd>%s</initrd>\n", esc(t.Initrd))
		}
		fmt.Fprintf(&b, "    <cmdline>%s</cmdline>\n", esc(t.Cmdline))
	} else {
		b.WriteString("    <boot dev='hd'/>\n")
	}
	b.WriteString("  </os>\n")
	if domType == "qemu" {
		b.WriteString("  <features><acpi/></features>\n  <tcg><tb-cache unit='MiB'>64</tb-cache></tcg>\n")
	} else {
		b.WriteString("  <features><acpi/></features>\n")
	}
	b.WriteString("  <devices>\n")
	fmt.Fprintf(&b, "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      <source file='%s'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n", esc(disk))
	fmt.Fprintf(&b, "    <interface type='network'>\n      <source network='%s'/>\n      <model type='virtio'/>\n    </interface>\n", esc(t.Network))
	b.WriteString("    <serial type='pty'><target port='0'/></serial>\n    <console type='pty'><target type='serial' port='0'/></console>\n")
	b.WriteString("    <channel type='unix'>\n      <target type='virtio' name='org.qemu.guest_agent.0'/>\n    </channel>\n")
	b.WriteString("    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>\n")
	b.WriteString("  </devices>\n</domain>\n")
	return b.String()
}

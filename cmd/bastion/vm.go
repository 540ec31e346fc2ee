package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/bastion/dispense"
	"github.com/bastionvm/bastion/hypervisor"
	"github.com/bastionvm/bastion/policy"
	"github.com/bastionvm/bastion/bastion/trust"
)

// TemplateConfig is one [[template]].
type TemplateConfig struct {
	Name       string            `toml:"name"`
	Hypervisor string            `toml:"hypervisor"`
	Image      string            `toml:"image"`
	Pool       string            `toml:"pool"`
	DiskSize   Size              `toml:"disk_size"`
	MinFree    Size              `toml:"min_free"`
	Kernel     string            `toml:"kernel"`
	Initrd     string            `toml:"initrd"`
	Cmdline    string            `toml:"cmdline"`
	MemoryMiB  int               `toml:"memory_mib"`
	VCPUs      int               `toml:"vcpus"`
	Network    string            `toml:"network"`
	DomainType string            `toml:"domain_type"`
	Logins     []string          `toml:"logins"`
	Labels     map[string]string `toml:"labels"`
	Wait       Duration          `toml:"wait"`
}

// Size is a byte count written as "10GiB", "512MiB" or a plain number.
type Size struct{ Bytes uint64 }

func (s *Size) UnmarshalText(text []byte) error {
	t := strings.TrimSpace(string(text))
	mult := uint64(1)
	for _, u := range []struct {
		suffix string
		mult   uint64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"B", 1}} {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSpace(strings.TrimSuffix(t, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseUint(t, 10, 64)
	if err != nil {
		return fmt.Errorf("not a size (like \"10GiB\" or \"512MiB\"): %q", text)
	}
	s.Bytes = n * mult
	return nil
}

// templates checks the [[template]] tables and fills in defaults.
func (c *Config) templates() (map[string]dispense.Template, error) {
	out := make(map[string]dispense.Template)
	for i, tc := range c.Templates {
		name := tc.Name
		fail := func(format string, args ...any) (map[string]dispense.Template, error) {
			return nil, fmt.Errorf("template %s: %s", accountName(name, i), fmt.Sprintf(format, args...))
		}
		if name == "" {
			return fail("has no name")
		}
		if _, ok := out[name]; ok {
			return fail("is defined twice")
		}
		t := dispense.Template{Name: name, Hypervisor: tc.Hypervisor, Image: tc.Image, Pool: tc.Pool, DiskSize: tc.DiskSize.Bytes,
			MinFree: tc.MinFree.Bytes, Kernel: tc.Kernel, Initrd: tc.Initrd, Cmdline: tc.Cmdline, MemoryMiB: tc.MemoryMiB,
			VCPUs: tc.VCPUs, Network: tc.Network, DomainType: tc.DomainType, Logins: tc.Logins, Labels: tc.Labels, Wait: tc.Wait.Duration}
		if t.Hypervisor == "" {
			if len(c.Hypervisors) == 0 {
				return fail("names no hypervisor, and there is no [[hypervisor]]")
			}
			t.Hypervisor = c.Hypervisors[0].URI
		}
		switch {
		case t.Image == "":
			return fail("image is empty")
		case t.Pool == "":
			return fail("pool is empty (a libvirt storage pool for the overlays)")
		case t.Network == "":
			return fail("network is empty")
		case len(t.Logins) == 0:
			return fail("logins is empty: name the logins to trust at dispense")
		case t.DomainType != "" && t.DomainType != "qemu" && t.DomainType != "kvm":
			return fail("domain_type %q is not qemu or kvm", t.DomainType)
		}
		if t.DiskSize == 0 {
			t.DiskSize = 10 << 30
		}
		if t.MinFree == 0 {
			t.MinFree = 1 << 30
		}
		if t.MemoryMiB == 0 {
			t.MemoryMiB = 512
		}
		out[name] = t
	}
	return out, nil
}

// dispenseHypervisor is the hypervisor pool as the dispenser's Hypervisor.
type dispenseHypervisor struct{ pool *hypervisor.Pool }

func (h dispenseHypervisor) Exists(ctx context.Context, name string) (bool, error) {
	_, err := h.pool.Find(ctx, name)
	if errors.Is(err, hypervisor.ErrNoSuchVM) {
		return false, nil
	}
	return err == nil, err
}

func (h dispenseHypervisor) Find(ctx context.Context, name string) (dispense.Domain, error) {
	d, err := h.pool.Find(ctx, name)
	return dispense.Domain(d), err
}

func (h dispenseHypervisor) CreateOverlay(ctx context.Context, uri, pool, name, backing string, capacity, minFree uint64) (string, error) {
	return h.pool.CreateOverlay(ctx, uri, pool, name, backing, capacity, minFree)
}

func (h dispenseHypervisor) DeleteVolume(ctx context.Context, uri, path string) error {
	return h.pool.DeleteVolume(ctx, uri, path)
}

func (h dispenseHypervisor) DefineAndStart(ctx context.Context, uri, xml string) (dispense.Domain, error) {
	d, err := h.pool.DefineAndStart(ctx, uri, xml)
	return dispense.Domain(d), err
}

func (h dispenseHypervisor) Remove(ctx context.Context, d dispense.Domain) error {
	return h.pool.Remove(ctx, hypervisor.Domain(d))
}

func (h dispenseHypervisor) Disks(ctx context.Context, d dispense.Domain) ([]string, error) {
	return h.pool.Disks(ctx, hypervisor.Domain(d))
}

func (h dispenseHypervisor) Ping(ctx context.Context, d dispense.Domain) error {
	return h.pool.Ping(ctx, hypervisor.Domain(d))
}

func (h dispenseHypervisor) Address(ctx context.Context, d dispense.Domain) (netip.Addr, error) {
	a, err := h.pool.Address(ctx, hypervisor.Domain(d))
	return a.IP, err
}

// dispenseTrust establishes trust through the trust manager.
type dispenseTrust struct{ m *trust.Manager }

func (t dispenseTrust) Establish(ctx context.Context, d dispense.Domain, login string) error {
	_, err := t.m.Get(ctx, trust.Domain(d), login)
	return err
}

// vmCommands serves `vm …` run over SSH on the bastion (`ssh alice@bastion
// vm dispense --template T NAME`), and the same locally.
type vmCommands struct {
	dispenser *dispense.Dispenser
	pool      *hypervisor.Pool
	policy    interface {
		Decide(policy.Request) policy.Decision
	}
	listen   string
	stateDir string
	log      *slog.Logger
	audit    func(bastion.Event)
}

// run executes args (after "vm") for account, or locally when account is
// empty (the operator at the bastion's own shell, who is not asked the
// policy). It returns the exit status.
func (v *vmCommands) run(ctx context.Context, account *bastion.Account, source net.Addr, args []string, out io.Writer) int {
	fail := func(err error) int {
		fmt.Fprintf(out, "bastion: %v\r\n", err)
		return 1
	}
	if len(args) == 0 {
		return fail(errors.New("usage: vm dispense --template NAME VM | vm ls | vm destroy [--force] VM"))
	}
	fs := flag.NewFlagSet("vm "+args[0], flag.ContinueOnError)
	fs.SetOutput(out)
	template := fs.String("template", "", "template to dispense from")
	force := fs.Bool("force", false, "destroy a VM the bastion did not dispense")
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	allowed := func(kind policy.Channel, vm policy.VM) error {
		if account == nil {
			return nil
		}
		addr, _ := netip.ParseAddrPort(source.String())
		d := v.policy.Decide(policy.Request{Account: account.Name, Groups: account.Groups, Source: addr.Addr(), VM: vm, Channel: kind, Time: time.Now()})
		if !d.Allow {
			v.audit(bastion.Event{Type: bastion.EventDenied, Account: account.Name, Source: source.String(), VM: vm.Name, Channel: string(kind), Rule: d.Rule, Reason: d.Reason})
			return fmt.Errorf("%s %s: denied by policy", kind, vm.Name)
		}
		return nil
	}
	by := "operator"
	if account != nil {
		by = account.Name
	}
	switch args[0] {
	case "dispense":
		if fs.NArg() != 1 || *template == "" {
			return fail(errors.New("usage: vm dispense --template NAME VM"))
		}
		name := fs.Arg(0)
		t, ok := v.dispenser.Templates[*template]
		if !ok {
			_, err := v.dispenser.Dispense(ctx, *template, name, by, out)
			return fail(err)
		}
		if err := allowed(policy.Dispense, policy.VM{Name: name, Hypervisor: t.Hypervisor, Labels: t.Labels}); err != nil {
			return fail(err)
		}
		dom, err := v.dispenser.Dispense(ctx, *template, name, by, out)
		if err != nil {
			v.audit(bastion.Event{Type: bastion.EventDispenseFailed, Account: by, VM: name, Detail: *template, Reason: err.Error()})
			return fail(err)
		}
		v.audit(bastion.Event{Type: bastion.EventDispensed, Account: by, VM: name, Detail: *template})
		host, port, _ := net.SplitHostPort(v.listen)
		if host == "" || host == "0.0.0.0" || host == "::" {
			host = "<bastion>"
		}
		jump := by + "@" + host
		if port != "22" {
			jump += ":" + port
		}
		fmt.Fprintf(out, "ssh -J %s %s@%s\r\n", jump, t.Logins[0], dom.Name)
		return 0
	case "destroy":
		if fs.NArg() != 1 {
			return fail(errors.New("usage: vm destroy [--force] VM"))
		}
		name := fs.Arg(0)
		d, err := v.pool.Find(ctx, name)
		if err != nil {
			return fail(err)
		}
		if err := allowed(policy.Destroy, policy.VM{Name: d.Name, UUID: d.UUID, Hypervisor: d.URI, Labels: d.Labels}); err != nil {
			return fail(err)
		}
		if err := v.dispenser.Destroy(ctx, name, *force, out); err != nil {
			return fail(err)
		}
		v.audit(bastion.Event{Type: bastion.EventDestroyed, Account: by, VM: name})
		return 0
	case "ls":
		return v.list(ctx, account, source, out)
	}
	return fail(fmt.Errorf("unknown command vm %s", args[0]))
}

// list prints the VMs with state, address, trust and labels; over SSH only
// those the account may reach.
func (v *vmCommands) list(ctx context.Context, account *bastion.Account, source net.Addr, out io.Writer) int {
	doms, err := v.pool.List(ctx)
	if err != nil {
		fmt.Fprintf(out, "bastion: %v\r\n", err)
		return 1
	}
	records := readTrustRecords(v.stateDir)
	sort.Slice(doms, func(i, j int) bool { return doms[i].Name < doms[j].Name })
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprint(w, "NAME\tSTATE\tADDRESS\tTRUST\tLABELS\r\n")
	for _, d := range doms {
		if account != nil {
			addr, _ := netip.ParseAddrPort(source.String())
			if !v.policy.Decide(policy.Request{Account: account.Name, Groups: account.Groups, Source: addr.Addr(),
				VM: policy.VM{Name: d.Name, UUID: d.UUID, Hypervisor: d.URI, Labels: d.Labels}, Channel: policy.Connect, Time: time.Now()}).Allow {
				continue
			}
		}
		state, address := "shut off", "-"
		if d.Running {
			state = "running"
			actx, cancel := context.WithTimeout(ctx, 3*time.Second)
			if a, err := v.pool.Address(actx, d); err == nil {
				address = a.IP.String()
			}
			cancel()
		}
		trustState := "-"
		for _, r := range records {
			if r.UUID == d.UUID {
				state := "trusted"
				if time.Now().After(r.Expires) {
					state = "expired"
				}
				trustState = fmt.Sprintf("%s %s until %s", r.Login, state, r.Expires.Format("15:04:05Z"))
			}
		}
		var labels []string
		for k, val := range d.Labels {
			labels = append(labels, k+"="+val)
		}
		sort.Strings(labels)
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\r\n", d.Name, state, address, trustState, strings.Join(labels, ","))
	}
	w.Flush()
	return 0
}

// vmLocal runs `bastion vm …` at the bastion's own shell: it opens the
// hypervisors itself. Trust it establishes is this process's; the serving
// bastion checks again on first use.
func vmLocal(configPath string, args []string, out io.Writer) error {
	c, err := LoadConfig(configPath)
	if err != nil {
		return err
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	v, stop, err := newVMCommands(c, logger, nil, nil)
	if err != nil {
		return err
	}
	defer stop()
	if code := v.run(context.Background(), nil, nil, args, out); code != 0 {
		return fmt.Errorf("vm %s failed", strings.Join(args, " "))
	}
	return nil
}

// newVMCommands wires a dispenser over pool (opened here when nil) and
// manager (made here when nil).
func newVMCommands(c *Config, logger *slog.Logger, pool *hypervisor.Pool, manager *trust.Manager) (*vmCommands, func(), error) {
	templates, err := c.templates()
	if err != nil {
		return nil, nil, err
	}
	stop := func() {}
	if pool == nil {
		var uris []string
		for _, h := range c.Hypervisors {
			uris = append(uris, h.URI)
		}
		if len(uris) == 0 {
			return nil, nil, errors.New("no [[hypervisor]] configured")
		}
		if pool, err = hypervisor.Open(uris, hypervisor.Options{Logger: logger}); err != nil {
			return nil, nil, err
		}
		stop = pool.Close
	}
	if manager == nil {
		manager = newTrustManager(c, logger)
		manager.OOB = outOfBand{pool}
	}
	v := &vmCommands{
		dispenser: &dispense.Dispenser{Hypervisor: dispenseHypervisor{pool}, Trust: dispenseTrust{manager}, Templates: templates, Logger: logger},
		pool:      pool, policy: c.policy, listen: c.Server.Listen, stateDir: c.Server.StateDir, log: logger,
		audit: func(bastion.Event) {},
	}
	return v, stop, nil
}

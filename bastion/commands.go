package bastion

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/policy"
	"github.com/bastionvm/bastion/vm"
)

// Dispenser makes and removes VMs. *dispense.Dispenser is one; it audits
// what it makes and removes.
type Dispenser interface {
	// Plan is the VM that dispensing name from template would make, as the
	// policy sees it, and the logins it is trusted for; nothing is made.
	Plan(template, name string) (vm.Domain, []string, error)
	Dispense(ctx context.Context, template, name, by string, out io.Writer) (vm.Domain, error)
	Destroy(ctx context.Context, name, by string, force bool, out io.Writer) error
}

// Fleet is what `vm ls` reads of the VMs. *hypervisor.Pool is one.
type Fleet interface {
	VMs
	Address(ctx context.Context, d vm.Domain) (vm.Address, error)
}

// VMCommand is `vm dispense|ls|destroy`: run over SSH by a person
// (`ssh alice@bastion vm ls`), who is asked the policy for every VM, or at
// the bastion's own shell by the operator, who is not.
type VMCommand struct {
	Fleet     Fleet
	Dispenser Dispenser
	Policy    Decider // if nil, every request over SSH is denied
	// TrustOf describes the bastion's trust with the VM whose UUID it is
	// given, for `vm ls`; if nil, "-".
	TrustOf func(uuid string) string
	// Listen is the front door's address, for the ssh -J line printed
	// after a dispense.
	Listen string
	Audit  audit.Sink // receives the denials; if nil, they are dropped
}

// Run serves the command over SSH for account, from source; it is a
// CommandFunc.
func (c *VMCommand) Run(ctx context.Context, account Account, source net.Addr, args []string, out io.Writer) int {
	return c.run(ctx, &account, source, args, out)
}

// RunLocal serves the command for the operator at the bastion's own
// shell, who is not asked the policy.
func (c *VMCommand) RunLocal(ctx context.Context, args []string, out io.Writer) int {
	return c.run(ctx, nil, nil, args, out)
}

// vmUsage is what a malformed vm command is told.
const vmUsage = "usage: vm dispense --template NAME VM | vm ls | vm destroy [--force] VM"

func (c *VMCommand) run(ctx context.Context, account *Account, source net.Addr, args []string, out io.Writer) int {
	fail := func(err error) int {
		fmt.Fprintf(out, "bastion: %v\r\n", err)
		return 1
	}
	if len(args) == 0 {
		return fail(errors.New(vmUsage))
	}
	fs := flag.NewFlagSet("vm "+args[0], flag.ContinueOnError)
	fs.SetOutput(out)
	template := fs.String("template", "", "template to dispense from")
	force := fs.Bool("force", false, "destroy a VM the bastion did not dispense")
	if err := fs.Parse(args[1:]); err != nil {
		return 2
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
		planned, logins, err := c.Dispenser.Plan(*template, fs.Arg(0))
		if err != nil {
			return fail(err)
		}
		if err := c.allowed(account, source, policy.Dispense, planned); err != nil {
			return fail(err)
		}
		made, err := c.Dispenser.Dispense(ctx, *template, planned.Name, by, out)
		if err != nil {
			return fail(err)
		}
		fmt.Fprintf(out, "ssh -J %s %s@%s\r\n", c.jumpHost(by), logins[0], made.Name)
		return 0
	case "destroy":
		if fs.NArg() != 1 {
			return fail(errors.New("usage: vm destroy [--force] VM"))
		}
		d, err := c.Fleet.Find(ctx, fs.Arg(0))
		if err != nil {
			return fail(err)
		}
		if err := c.allowed(account, source, policy.Destroy, d); err != nil {
			return fail(err)
		}
		if err := c.Dispenser.Destroy(ctx, d.Name, by, *force, out); err != nil {
			return fail(err)
		}
		return 0
	case "ls":
		return c.list(ctx, account, source, out)
	}
	return fail(fmt.Errorf("unknown command vm %s", args[0]))
}

// allowed asks the policy whether account may do kind to d, and audits a
// denial. The operator (account nil) is not asked.
func (c *VMCommand) allowed(account *Account, source net.Addr, kind policy.Channel, d vm.Domain) error {
	if account == nil {
		return nil
	}
	dec := c.decide(account, source, kind, d)
	if !dec.Allow {
		c.Audit.Emit(audit.Event{Type: audit.Denied, Account: account.Name, Source: source.String(), VM: d.Name,
			Channel: string(kind), Rule: dec.Rule, Reason: dec.Reason})
		return fmt.Errorf("%s %s: denied by policy", kind, d.Name)
	}
	return nil
}

func (c *VMCommand) decide(account *Account, source net.Addr, kind policy.Channel, d vm.Domain) policy.Decision {
	if c.Policy == nil {
		return policy.Decision{Reason: "no policy"}
	}
	return c.Policy.Decide(policy.Request{Account: account.Name, Groups: account.Groups, Source: sourceAddr(source),
		VM: d, Channel: kind, Time: time.Now()})
}

// jumpHost is the -J argument that reaches the front door as by.
func (c *VMCommand) jumpHost(by string) string {
	host, port, _ := net.SplitHostPort(c.Listen)
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "<bastion>"
	}
	jump := by + "@" + host
	if port != "22" {
		jump += ":" + port
	}
	return jump
}

// list prints the VMs with state, address, trust and labels; over SSH only
// those the account may reach.
func (c *VMCommand) list(ctx context.Context, account *Account, source net.Addr, out io.Writer) int {
	doms, err := c.Fleet.List(ctx)
	if err != nil {
		fmt.Fprintf(out, "bastion: %v\r\n", err)
		return 1
	}
	sort.Slice(doms, func(i, j int) bool { return doms[i].Name < doms[j].Name })
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprint(w, "NAME\tSTATE\tADDRESS\tTRUST\tLABELS\r\n")
	for _, d := range doms {
		if account != nil && !c.decide(account, source, policy.Connect, d).Allow {
			continue
		}
		state, address := "shut off", "-"
		if d.Running {
			state = "running"
			actx, cancel := context.WithTimeout(ctx, 3*time.Second)
			if a, err := c.Fleet.Address(actx, d); err == nil {
				address = a.IP.String()
			}
			cancel()
		}
		trust := "-"
		if c.TrustOf != nil {
			trust = c.TrustOf(d.UUID)
		}
		var labels []string
		for k, v := range d.Labels {
			labels = append(labels, k+"="+v)
		}
		sort.Strings(labels)
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\r\n", d.Name, state, address, trust, strings.Join(labels, ","))
	}
	w.Flush()
	return 0
}

// sourceAddr is a client's address as the policy reads it.
func sourceAddr(source net.Addr) netip.Addr {
	if source == nil {
		return netip.Addr{}
	}
	addr, _ := netip.ParseAddrPort(source.String())
	return addr.Addr()
}

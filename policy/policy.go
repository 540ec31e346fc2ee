// Package policy decides whether a request may reach a VM. Decisions are
// pure functions of the request: no I/O, no clock other than the one passed
// in. The default is deny.
package policy

import (
	"errors"
	"fmt"
	"path"
	"slices"
)

// Channel is the kind of access a request asks for.
type Channel string

// Channel kinds. Connect is the connection-level question "may this account
// reach this VM as this login at all", asked before trust is established;
// with an empty login it asks whether any login on the VM is allowed.
const (
	Connect       Channel = "connect"
	Shell         Channel = "shell"
	Exec          Channel = "exec"
	SFTP          Channel = "sftp"
	LocalForward  Channel = "local-forward" // -L and -D: direct-tcpip relative to the VM
	RemoteForward Channel = "remote-forward"
	Agent         Channel = "agent"
	X11           Channel = "x11"
)

var knownChannels = []Channel{Shell, Exec, SFTP, LocalForward, RemoteForward, Agent, X11}

// sessionChannels are what a rule grants when it lists no channels.
var sessionChannels = []Channel{Shell, Exec, SFTP}

// Request is what is being asked.
type Request struct {
	Account string
	Groups  []string
	VM      string
	Login   string
	Channel Channel
}

// Rule allows the accounts and groups it names to reach the VMs matching its
// globs as the logins it names, for the channels it lists.
type Rule struct {
	Name     string    `toml:"name"`
	Accounts []string  `toml:"accounts"`
	Groups   []string  `toml:"groups"`
	VMs      []string  `toml:"vms"`      // path.Match globs
	Logins   []string  `toml:"logins"`   // exact, or "*"
	Channels []Channel `toml:"channels"` // empty means shell, exec and sftp
}

// Policy is an ordered list of allow rules.
type Policy struct {
	Rules []Rule
}

// Decision is the outcome of Decide. Rule names the deciding rule, if any;
// Reason is for the audit log, not for the user.
type Decision struct {
	Allow  bool
	Rule   string
	Reason string
}

// ErrInvalid is wrapped by every validation error.
var ErrInvalid = errors.New("invalid policy")

// Validate reports the first problem in p, naming the rule.
func (p *Policy) Validate() error {
	for i, r := range p.Rules {
		name := r.Name
		if name == "" {
			name = fmt.Sprintf("#%d", i+1)
		}
		fail := func(format string, args ...any) error {
			return fmt.Errorf("%w: rule %s: %s", ErrInvalid, name, fmt.Sprintf(format, args...))
		}
		if len(r.Accounts) == 0 && len(r.Groups) == 0 {
			return fail("names no accounts or groups")
		}
		if len(r.VMs) == 0 {
			return fail("names no vms")
		}
		if len(r.Logins) == 0 {
			return fail("names no logins")
		}
		for _, g := range r.VMs {
			if _, err := path.Match(g, ""); err != nil {
				return fail("vm glob %q: %v", g, err)
			}
		}
		for _, c := range r.Channels {
			if !slices.Contains(knownChannels, c) {
				return fail("unknown channel %q (known: %v)", c, knownChannels)
			}
		}
	}
	return nil
}

// Decide returns the first rule allowing r, or a deny.
func (p *Policy) Decide(r Request) Decision {
	for i := range p.Rules {
		rule := &p.Rules[i]
		if rule.matches(r) {
			return Decision{Allow: true, Rule: rule.Name, Reason: "allowed by rule " + rule.Name}
		}
	}
	return Decision{Reason: fmt.Sprintf("no rule allows %s on %s as %s for %s", r.Account, r.VM, r.Login, r.Channel)}
}

func (rule *Rule) matches(r Request) bool {
	if !slices.Contains(rule.Accounts, r.Account) && !slices.ContainsFunc(r.Groups, func(g string) bool {
		return slices.Contains(rule.Groups, g)
	}) {
		return false
	}
	if !slices.ContainsFunc(rule.VMs, func(g string) bool {
		ok, _ := path.Match(g, r.VM)
		return ok
	}) {
		return false
	}
	anyLogin := r.Channel == Connect && r.Login == ""
	if !anyLogin && !slices.Contains(rule.Logins, r.Login) && !slices.Contains(rule.Logins, "*") {
		return false
	}
	if r.Channel == Connect {
		return true
	}
	channels := rule.Channels
	if len(channels) == 0 {
		channels = sessionChannels
	}
	return slices.Contains(channels, r.Channel)
}

// Package policy decides who may do what on which VM. Decide is a pure
// function of the request: no I/O, and the time is part of the request.
// Deny rules win over allow rules; with no rule allowing a request, it is
// denied.
package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/bastionvm/bastion/vm"
)

// Channel is the kind of access a request asks for.
type Channel string

// Channel kinds. Connect is the connection-level question "may this account
// reach this VM as this login at all", asked before trust is established;
// with an empty login it asks whether any login is allowed.
const (
	Connect       Channel = "connect"
	Shell         Channel = "shell"
	Exec          Channel = "exec"
	SCP           Channel = "scp"       // legacy scp (-O): an exec of "scp -t" or "scp -f" in the forms scp sends (ParseSCP)
	SCPRead       Channel = "scp-read"  // in a rule: legacy scp that may only copy from the VM (scp -f)
	SFTP          Channel = "sftp"      // the sftp subsystem, also used by scp's default mode
	SFTPRead      Channel = "sftp-read" // in a rule: sftp that may only read
	LocalForward  Channel = "local-forward"
	RemoteForward Channel = "remote-forward"
	Agent         Channel = "agent"
	X11           Channel = "x11"
	Dispense      Channel = "dispense" // make a new VM (the VM selectors apply to its name and template labels)
	Destroy       Channel = "destroy"  // remove a VM
	Watch         Channel = "watch"    // follow another person's running session on the VM, read-only (the login is not asked)
)

// Kinds lists the channel kinds a rule may name.
var Kinds = []Channel{Shell, Exec, SCP, SCPRead, SFTP, SFTPRead, LocalForward, RemoteForward, Agent, X11, Dispense, Destroy, Watch}

// vmKinds are about VMs themselves, not logins on them.
var vmKinds = []Channel{Dispense, Destroy, Watch}

// sessionKinds are what an allow rule grants when it lists no channels.
var sessionKinds = []Channel{Shell, Exec, SCP, SFTP}

// loopback is where forwards may go when a rule names no forward hosts:
// the VM's own loopback, in every form (see parseHostEntry).
var loopback = []string{"localhost"}

// Request is what is being asked.
type Request struct {
	Account string
	Groups  []string
	Source  netip.Addr // the client's address
	VM      vm.Domain
	Login   string
	Channel Channel
	Command string // for exec and scp; Decide classifies it itself (CommandKind)
	Host    string // for forwards: the destination (local) or bind address (remote), as the client sent it
	Port    uint32
	Socket  string // for a forward to or from a unix socket on the VM (streamlocal): its path; Host and Port are then unused
	Time    time.Time
}

// Decision is the outcome of Decide. Rule names the deciding rule, if any;
// Reason is for the audit log, not for the user.
type Decision struct {
	Allow    bool
	Rule     string
	Reason   string
	ReadOnly bool          // sftp allowed only to read
	MaxTime  time.Duration // for Connect: how long a session may last; 0 means no limit
	// For allow rules, what is recorded of a session with a terminal
	// (and of exec without one, with RecordExec): "" (the bastion's
	// default), "none", "output" or "input" (input and output).
	Record     string
	RecordExec bool
}

// Effect is what a matching rule does.
type Effect string

const (
	Allow Effect = "allow"
	Deny  Effect = "deny"
)

// Rule is one rule of the policy. Every field that names something narrows
// the rule; an empty one matches anything, except Channels, which for an
// allow rule means shell, exec, scp and sftp.
type Rule struct {
	Name     string
	Effect   Effect
	Accounts []string
	Groups   []string

	VMs         []string          // name globs
	UUIDs       []string          // exact
	Hypervisors []string          // libvirt URI globs
	Labels      map[string]string // label name → value glob; all must match

	Logins   []string  // exact, or "*"
	Channels []Channel // see Kinds
	Commands []string  // exec and scp command patterns, word by word (see docs/policy.md)

	ForwardHosts []string    // forward destinations (-L, -D) or bind addresses (-R): addresses, CIDR prefixes, "localhost", "*" or name globs; empty means the VM's loopback
	ForwardPorts []PortRange // empty means any port
	// ForwardSockets are path globs (path.Match: * stays within a
	// component) for forwards to and from unix sockets on the VM. An allow
	// rule without them allows no socket; a rule with them and no
	// ForwardHosts is about sockets only, and the reverse (see docs).
	ForwardSockets []string

	Sources []netip.Prefix // client address ranges
	Window  *Window        // when the rule applies
	MaxTime time.Duration  // for allow rules: the longest a session may last

	Record     string // for allow rules: "" (the default), "none", "output" or "input"
	RecordExec bool   // record exec without a terminal too

	Line int // where the rule starts in its file, for messages
}

// PortRange is an inclusive range of ports.
type PortRange struct{ From, To uint32 }

func (r PortRange) String() string {
	if r.From == r.To {
		return fmt.Sprint(r.From)
	}
	return fmt.Sprintf("%d-%d", r.From, r.To)
}

// Window is a time window on some days of the week, in a time zone. When
// From is after To, the window spans midnight.
type Window struct {
	Days     []time.Weekday // empty means every day
	From, To time.Duration  // since midnight
	Zone     *time.Location
}

// Policy is a list of rules.
type Policy struct {
	Rules []Rule
}

// Sentinel reasons, wrapped in Decision errors returned by Check.
var (
	ErrNoRule   = errors.New("no rule allows it")
	ErrDenyRule = errors.New("a deny rule matches")
)

// Decide returns the decision for r: the first deny rule that matches, or
// else the first allow rule that matches, or else a deny.
//
// An exec or scp request is classified by its command, whichever of the
// two it says it is: scp only in the forms legacy scp sends (ParseSCP),
// everything else exec.
func (p *Policy) Decide(r Request) Decision {
	if r.Channel == Exec || r.Channel == SCP {
		r.Channel = CommandKind(r.Command)
	}
	var t target
	if r.Channel == LocalForward || r.Channel == RemoteForward {
		t = newTarget(r)
	}
	for i := range p.Rules {
		rule := &p.Rules[i]
		if rule.Effect == Deny && rule.matches(r, t) {
			return Decision{Rule: rule.Name, Reason: fmt.Sprintf("%v: rule %s", ErrDenyRule, rule.Name)}
		}
	}
	if t.err != nil {
		// Refused outright: no allow rule may let it through.
		return Decision{Reason: t.err.Error()}
	}
	for i := range p.Rules {
		rule := &p.Rules[i]
		if rule.Effect != Deny && rule.matches(r, t) {
			d := Decision{Allow: true, Rule: rule.Name, Reason: "allowed by rule " + rule.Name, MaxTime: rule.MaxTime,
				Record: rule.Record, RecordExec: rule.RecordExec}
			if r.Channel == SFTP && !slices.Contains(rule.channels(), SFTP) {
				d.ReadOnly = true
			}
			return d
		}
	}
	reason := fmt.Sprintf("%v: %s as %s on %s for %s", ErrNoRule, r.Account, r.Login, r.VM.Name, r.Channel)
	if _, err := Words(r.Command); r.Channel == Exec && r.Command != "" && err != nil {
		reason += " (" + ErrNotPlain.Error() + ")"
	}
	return Decision{Reason: reason}
}

// Logins lists the logins rules would let account (in groups) use on vm
// from source at t: what the menu offers. "*" means any.
func (p *Policy) Logins(account string, groups []string, source netip.Addr, d vm.Domain, t time.Time) []string {
	var out []string
	reach := Request{Account: account, Groups: groups, Source: source, VM: d, Channel: Connect, Time: t}
	for i := range p.Rules {
		rule := &p.Rules[i]
		if rule.Effect == Deny || !rule.matches(reach, target{}) {
			continue
		}
		for _, login := range rule.Logins {
			if slices.Contains(out, login) {
				continue
			}
			probe := Request{Account: account, Groups: groups, Source: source, VM: d, Login: login, Channel: Connect, Time: t}
			if login == "*" {
				probe.Login = ""
			}
			if p.Decide(probe).Allow {
				out = append(out, login)
			}
		}
	}
	return out
}

// Possible reports whether some allow rule could allow one of kinds to
// r's account (in its groups) from its source on its VM as its login, at
// any time and for any command or forward destination: r's Channel,
// Time, Command, Host, Port and Socket are not read. Deny rules are not
// weighed, so the answer errs towards yes. The bastion asks it when a
// link is made, to learn whether the link may ever need an upstream
// connection of its own (remote forwarding, agent, X11).
func (p *Policy) Possible(r Request, kinds ...Channel) bool {
	for i := range p.Rules {
		rule := &p.Rules[i]
		if rule.Effect == Deny || !rule.matchesSubject(r) || !rule.matchesVM(r.VM) || !rule.matchesSource(r.Source) {
			continue
		}
		for _, k := range kinds {
			probe := r
			probe.Channel = k
			if rule.matchesLogin(probe) && slices.Contains(rule.channels(), k) {
				return true
			}
		}
	}
	return false
}

// VMNamePatterns are the names VMs may be reached by under the allow
// rules: their name globs and UUIDs, for the known_hosts line users add.
// A rule that selects VMs otherwise (by label or hypervisor only, or not
// at all) makes it "*": any name.
func (p *Policy) VMNamePatterns() []string {
	var out []string
	for i := range p.Rules {
		rule := &p.Rules[i]
		if rule.Effect == Deny || slices.Equal(rule.Channels, []Channel{Dispense}) {
			continue
		}
		if len(rule.VMs) == 0 && len(rule.UUIDs) == 0 {
			return []string{"*"}
		}
		for _, n := range slices.Concat(rule.VMs, rule.UUIDs) {
			if !slices.Contains(out, n) {
				out = append(out, n)
			}
		}
	}
	return out
}

func (rule *Rule) channels() []Channel {
	if len(rule.Channels) == 0 && rule.Effect != Deny {
		return sessionKinds
	}
	return rule.Channels
}

// matches reports whether the rule matches r, whose forward host, for a
// forward, has been read as t.
func (rule *Rule) matches(r Request, t target) bool {
	return rule.matchesSubject(r) && rule.matchesVM(r.VM) && rule.matchesLogin(r) &&
		rule.matchesSource(r.Source) && rule.Window.contains(r.Time) && rule.matchesChannel(r, t)
}

func (rule *Rule) matchesSubject(r Request) bool {
	if len(rule.Accounts) == 0 && len(rule.Groups) == 0 {
		return true
	}
	return slices.Contains(rule.Accounts, r.Account) ||
		slices.ContainsFunc(r.Groups, func(g string) bool { return slices.Contains(rule.Groups, g) })
}

func (rule *Rule) matchesVM(d vm.Domain) bool {
	if len(rule.VMs) > 0 && !slices.ContainsFunc(rule.VMs, func(g string) bool { return Glob(g, d.Name) }) {
		return false
	}
	if len(rule.UUIDs) > 0 && !slices.ContainsFunc(rule.UUIDs, func(u string) bool { return strings.EqualFold(u, d.UUID) }) {
		return false
	}
	if len(rule.Hypervisors) > 0 && !slices.ContainsFunc(rule.Hypervisors, func(g string) bool { return Glob(g, d.URI) }) {
		return false
	}
	for name, glob := range rule.Labels {
		value, ok := d.Labels[name]
		if !ok || !Glob(glob, value) {
			return false
		}
	}
	return true
}

func (rule *Rule) matchesLogin(r Request) bool {
	if len(rule.Logins) == 0 || slices.Contains(rule.Logins, "*") || slices.Contains(vmKinds, r.Channel) {
		return true
	}
	if r.Login == "" {
		// Connect with any login: a deny rule naming logins does not deny
		// all of them; an allow rule naming any allows some.
		return r.Channel == Connect && rule.Effect != Deny
	}
	return slices.Contains(rule.Logins, r.Login)
}

func (rule *Rule) matchesSource(source netip.Addr) bool {
	if len(rule.Sources) == 0 {
		return true
	}
	return slices.ContainsFunc(rule.Sources, func(p netip.Prefix) bool { return p.Contains(source.Unmap()) })
}

func (rule *Rule) matchesChannel(r Request, t target) bool {
	if r.Channel == Connect {
		// Reaching the VM: allow rules are about what may be done there;
		// a deny rule stops it only when it names no channels.
		return rule.Effect != Deny || len(rule.Channels) == 0
	}
	channels := rule.channels()
	if len(channels) > 0 {
		want := r.Channel
		ok := slices.Contains(channels, want) || (want == SFTP && slices.Contains(channels, SFTPRead)) ||
			(want == SCP && slices.Contains(channels, SCPRead) && scpDownload(r.Command))
		if !ok {
			return false
		}
	}
	switch r.Channel {
	case Exec, SCP:
		if !rule.matchesCommand(r.Command) {
			return false
		}
	case LocalForward, RemoteForward:
		if t.socket {
			return rule.matchesSocket(t)
		}
		hosts := rule.ForwardHosts
		if len(hosts) == 0 && len(rule.ForwardSockets) > 0 {
			return false // a rule about sockets only
		}
		switch {
		case rule.Effect == Deny:
			if len(hosts) > 0 && !t.deniedBy(hosts) {
				return false
			}
		case len(hosts) == 0:
			if !t.allowedBy(loopback) {
				return false
			}
		default:
			if !t.allowedBy(hosts) {
				return false
			}
		}
		if len(rule.ForwardPorts) > 0 && !slices.ContainsFunc(rule.ForwardPorts, func(pr PortRange) bool { return pr.From <= r.Port && r.Port <= pr.To }) {
			return false
		}
	}
	return true
}

// matchesSocket reports whether the rule takes in a forward to or from a
// unix socket. An allow rule needs a forward_sockets glob that matches. A
// deny rule matches every socket when it names neither forward_sockets nor
// forward_hosts and forward_ports (those make it about TCP), and a path
// that did not canonicalise whatever it names.
func (rule *Rule) matchesSocket(t target) bool {
	if rule.Effect != Deny {
		return t.err == nil && t.socketIn(rule.ForwardSockets)
	}
	switch {
	case t.err != nil:
		return true
	case len(rule.ForwardSockets) > 0:
		return t.socketIn(rule.ForwardSockets)
	default:
		return len(rule.ForwardHosts) == 0 && len(rule.ForwardPorts) == 0
	}
}

// matchesCommand reports whether the rule's commands patterns, if any,
// match command. An allow rule's match only a plain command, word for word.
// A deny rule's match a command that is not plain (so that it cannot be
// sidestepped by quoting or substitution), and otherwise one in which the
// pattern appears starting at any word (see matchDeny).
func (rule *Rule) matchesCommand(command string) bool {
	if len(rule.Commands) == 0 {
		return true
	}
	words, err := Words(command)
	if err != nil {
		return rule.Effect == Deny
	}
	match := matchAllow
	if rule.Effect == Deny {
		match = matchDeny
	}
	return slices.ContainsFunc(rule.Commands, func(p string) bool { return match(patternWords(p), words) })
}

// contains reports whether t falls in the window; a nil window is always.
func (w *Window) contains(t time.Time) bool {
	if w == nil {
		return true
	}
	local := t.In(w.Zone)
	since := time.Duration(local.Hour())*time.Hour + time.Duration(local.Minute())*time.Minute + time.Duration(local.Second())*time.Second
	day := local.Weekday()
	if w.From <= w.To {
		return w.onDay(day) && since >= w.From && since < w.To
	}
	// Spanning midnight: the evening part belongs to today, the morning
	// part to the day the window opened.
	if since >= w.From {
		return w.onDay(day)
	}
	return since < w.To && w.onDay((day+6)%7)
}

func (w *Window) onDay(d time.Weekday) bool {
	return len(w.Days) == 0 || slices.Contains(w.Days, d)
}

// Glob reports whether s matches pattern, where "*" matches any run of
// characters ("/" included) and "?" any one character. There are no
// character classes and no escapes.
func Glob(pattern, s string) bool {
	// Iterative matching with backtracking to the last star: linear in
	// practice, no recursion.
	p, i := 0, 0
	star, mark := -1, 0
	for i < len(s) {
		switch {
		case p < len(pattern) && pattern[p] == '*':
			star, mark = p, i
			p++
		case p < len(pattern) && (pattern[p] == '?' || pattern[p] == s[i]):
			p++
			i++
		case star >= 0:
			p = star + 1
			mark++
			i = mark
		default:
			return false
		}
	}
	for p < len(pattern) && pattern[p] == '*' {
		p++
	}
	return p == len(pattern)
}

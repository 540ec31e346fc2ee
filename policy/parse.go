package policy

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"
	_ "time/tzdata" // time zones even where the system has none

	"github.com/BurntSushi/toml"

	"github.com/bastionvm/bastion/internal/tomlpos"
)

// ruleTOML is one [[rule]] as written.
type ruleTOML struct {
	Name           string            `toml:"name"`
	Effect         string            `toml:"effect"`
	Accounts       []string          `toml:"accounts"`
	Groups         []string          `toml:"groups"`
	VMs            []string          `toml:"vms"`
	UUIDs          []string          `toml:"uuids"`
	Hypervisors    []string          `toml:"hypervisors"`
	Labels         map[string]string `toml:"labels"`
	Logins         []string          `toml:"logins"`
	Channels       []string          `toml:"channels"`
	Commands       []string          `toml:"commands"`
	ForwardHosts   []string          `toml:"forward_hosts"`
	ForwardPorts   []string          `toml:"forward_ports"`
	ForwardSockets []string          `toml:"forward_sockets"`
	Sources        []string          `toml:"sources"`
	Time           *windowTOML       `toml:"time"`
	MaxSession     string            `toml:"max_session"`
	Record         string            `toml:"record"`
	RecordExec     bool              `toml:"record_exec"`
}

type windowTOML struct {
	Days []string `toml:"days"`
	From string   `toml:"from"`
	To   string   `toml:"to"`
	Zone string   `toml:"zone"`
}

// Parse reads the [[rule]] tables of a TOML document called name. When
// standalone, the document is a policy file and any other key is an error;
// otherwise it is the main configuration, whose other keys are someone
// else's. Every error names the file and line.
func Parse(name string, data []byte, standalone bool) (*Policy, error) {
	var doc struct {
		Rule []ruleTOML `toml:"rule"`
	}
	md, err := toml.Decode(string(data), &doc)
	if err != nil {
		return nil, tomlpos.Error(name, err)
	}
	mine := func(table string) bool { return standalone || table == "rule" }
	if err := tomlpos.Undecoded(name, data, md, mine); err != nil {
		return nil, err
	}
	p := &Policy{}
	names := make(map[string]int)
	for i, rt := range doc.Rule {
		line := tomlpos.TableLine(data, "rule", i)
		rule, err := rt.compile(i)
		if err != nil {
			return nil, fmt.Errorf("%s:%d: rule %s: %w", name, line, ruleName(rt.Name, i), err)
		}
		if first, ok := names[rule.Name]; ok {
			return nil, fmt.Errorf("%s:%d: rule %s: the name is taken by the rule at line %d", name, line, rule.Name, first)
		}
		names[rule.Name] = line
		rule.Line = line
		p.Rules = append(p.Rules, rule)
	}
	return p, nil
}

func ruleName(name string, i int) string {
	if name == "" {
		return "#" + strconv.Itoa(i+1)
	}
	return name
}

// ErrInvalid is wrapped by every validation error.
var ErrInvalid = errors.New("invalid rule")

func (rt *ruleTOML) compile(i int) (Rule, error) {
	fail := func(format string, args ...any) (Rule, error) {
		return Rule{}, fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
	}
	r := Rule{
		Name: ruleName(rt.Name, i), Accounts: rt.Accounts, Groups: rt.Groups, VMs: rt.VMs, UUIDs: rt.UUIDs,
		Hypervisors: rt.Hypervisors, Labels: rt.Labels, Logins: rt.Logins, Commands: rt.Commands, ForwardHosts: rt.ForwardHosts,
	}
	switch rt.Effect {
	case "", "allow":
		r.Effect = Allow
	case "deny":
		r.Effect = Deny
	default:
		return fail("effect %q is not allow or deny", rt.Effect)
	}
	if r.Effect == Allow {
		// An allow rule says whom, where and as whom: nothing is allowed by
		// leaving a field out.
		if len(r.Accounts) == 0 && len(r.Groups) == 0 {
			return fail("an allow rule must name accounts or groups")
		}
		if len(r.VMs) == 0 && len(r.UUIDs) == 0 && len(r.Hypervisors) == 0 && len(r.Labels) == 0 {
			return fail("an allow rule must select VMs (vms, uuids, hypervisors or labels)")
		}
		onlyVMs := len(rt.Channels) > 0 && !slices.ContainsFunc(rt.Channels, func(c string) bool { return !slices.Contains(vmKinds, Channel(c)) })
		if len(r.Logins) == 0 && !onlyVMs {
			return fail("an allow rule must name logins (or \"*\")")
		}
	}
	for _, c := range rt.Channels {
		if !slices.Contains(Kinds, Channel(c)) {
			return fail("unknown channel %q (known: %s)", c, joinKinds())
		}
		r.Channels = append(r.Channels, Channel(c))
	}
	if len(r.Commands) > 0 && len(r.Channels) > 0 && !slices.ContainsFunc(r.Channels, func(c Channel) bool { return c == Exec || c == SCP || c == SCPRead }) {
		return fail("commands apply to exec and scp, which channels does not list")
	}
	for _, c := range r.Commands {
		if err := checkPattern(c); err != nil {
			return fail("commands: pattern %q: %v", c, err)
		}
	}
	for _, h := range r.ForwardHosts {
		if _, err := parseHostEntry(h); err != nil {
			return fail("forward_hosts: %v", err)
		}
	}
	for _, g := range rt.ForwardSockets {
		if err := checkSocketGlob(g); err != nil {
			return fail("forward_sockets: %v", err)
		}
	}
	r.ForwardSockets = rt.ForwardSockets
	for _, s := range rt.ForwardPorts {
		pr, err := parsePortRange(s)
		if err != nil {
			return fail("forward_ports: %v", err)
		}
		r.ForwardPorts = append(r.ForwardPorts, pr)
	}
	for _, s := range rt.Sources {
		prefix, err := netip.ParsePrefix(s)
		if err != nil {
			addr, aerr := netip.ParseAddr(s)
			if aerr != nil {
				return fail("sources: %q is not an address or CIDR range", s)
			}
			prefix = netip.PrefixFrom(addr, addr.BitLen())
		}
		r.Sources = append(r.Sources, prefix.Masked())
	}
	if rt.Time != nil {
		w, err := rt.Time.compile()
		if err != nil {
			return fail("time: %v", err)
		}
		r.Window = w
	}
	if rt.MaxSession != "" {
		d, err := time.ParseDuration(rt.MaxSession)
		if err != nil || d <= 0 {
			return fail("max_session %q is not a positive duration like \"8h\"", rt.MaxSession)
		}
		r.MaxTime = d
	}
	switch rt.Record {
	case "", "none", "output", "input":
	default:
		return fail("record %q is not \"none\", \"output\" or \"input\"", rt.Record)
	}
	if r.Effect == Deny && (rt.Record != "" || rt.RecordExec) {
		return fail("record and record_exec apply to allow rules")
	}
	r.Record, r.RecordExec = rt.Record, rt.RecordExec
	return r, nil
}

func joinKinds() string {
	var s []string
	for _, k := range Kinds {
		s = append(s, string(k))
	}
	return strings.Join(s, ", ")
}

func parsePortRange(s string) (PortRange, error) {
	from, to, isRange := strings.Cut(s, "-")
	a, err := strconv.ParseUint(strings.TrimSpace(from), 10, 16)
	if err != nil {
		return PortRange{}, fmt.Errorf("%q is not a port or a range like \"8000-8999\"", s)
	}
	b := a
	if isRange {
		if b, err = strconv.ParseUint(strings.TrimSpace(to), 10, 16); err != nil || b < a {
			return PortRange{}, fmt.Errorf("%q is not a port or a range like \"8000-8999\"", s)
		}
	}
	return PortRange{uint32(a), uint32(b)}, nil
}

var weekdays = []string{"sun", "mon", "tue", "wed", "thu", "fri", "sat"}

func (wt *windowTOML) compile() (*Window, error) {
	w := &Window{Zone: time.UTC}
	if wt.Zone != "" {
		loc, err := time.LoadLocation(wt.Zone)
		if err != nil {
			return nil, fmt.Errorf("zone %q: %v", wt.Zone, err)
		}
		w.Zone = loc
	}
	for _, d := range wt.Days {
		from, to, isRange := strings.Cut(strings.ToLower(d), "-")
		a := slices.Index(weekdays, from)
		b := a
		if isRange {
			b = slices.Index(weekdays, to)
		}
		if a < 0 || b < 0 {
			return nil, fmt.Errorf("day %q is not like \"mon\" or \"mon-fri\"", d)
		}
		for i := a; ; i = (i + 1) % 7 {
			if !slices.Contains(w.Days, time.Weekday(i)) {
				w.Days = append(w.Days, time.Weekday(i))
			}
			if i == b {
				break
			}
		}
	}
	var err error
	if w.From, err = clock(wt.From, 0); err != nil {
		return nil, err
	}
	if w.To, err = clock(wt.To, 24*time.Hour); err != nil {
		return nil, err
	}
	if w.From == w.To {
		return nil, errors.New("from and to are the same time")
	}
	return w, nil
}

// clock parses "HH:MM" as a duration since midnight; empty means def.
func clock(s string, def time.Duration) (time.Duration, error) {
	if s == "" {
		return def, nil
	}
	t, err := time.Parse("15:04", s)
	if err != nil {
		if s == "24:00" {
			return 24 * time.Hour, nil
		}
		return 0, fmt.Errorf("%q is not a time like \"08:30\"", s)
	}
	return time.Duration(t.Hour())*time.Hour + time.Duration(t.Minute())*time.Minute, nil
}

// Explain writes the decision for r as `bastion policy test` prints it.
func (p *Policy) Explain(r Request) string {
	d := p.Decide(r)
	var b bytes.Buffer
	verdict := "DENY"
	if d.Allow {
		verdict = "ALLOW"
	}
	asked := r.Channel
	if r.Channel == Exec || r.Channel == SCP {
		r.Channel = CommandKind(r.Command)
	}
	fmt.Fprintf(&b, "%s %s as %s on %s: %s\n", verdict, r.Account, r.Login, r.VM.Name, r.Channel)
	if r.Channel == LocalForward || r.Channel == RemoteForward {
		t := newTarget(r)
		switch {
		case t.socket && t.err != nil:
			fmt.Fprintf(&b, "socket: %v; refused whatever the rules say\n", t.err)
		case t.socket:
			fmt.Fprintf(&b, "socket: %s (a unix socket on the VM)\n", t.path)
		case t.err != nil:
			fmt.Fprintf(&b, "host:   %v; refused whatever the rules say\n", t.err)
		case t.host.All:
			b.WriteString("host:   * (every address of the VM)\n")
		default:
			fmt.Fprintf(&b, "host:   %s", t.host)
			switch {
			case t.host.surelyLoopback():
				b.WriteString(" (the VM's loopback)")
			case t.host.Loopback():
				b.WriteString(" (loopback to deny rules; to allow rules a name the VM resolves)")
			case t.host.Name != "":
				b.WriteString(" (a name: the VM resolves it)")
			}
			if t.host.String() != r.Host {
				fmt.Fprintf(&b, ", as sent %q", r.Host)
			}
			b.WriteString("\n")
		}
	}
	if asked == SCP && r.Channel != SCP {
		b.WriteString("kind:   exec: the command is not one of the forms legacy scp sends\n")
	}
	if c, ok := ParseSCP(r.Command); r.Channel == SCP && ok {
		direction := "to the VM (-t)"
		if c.Download {
			direction = "from the VM (-f, as scp-read allows)"
		}
		fmt.Fprintf(&b, "scp:    copies %s: %s\n", direction, c.Path)
	}
	if d.Rule != "" {
		for _, rule := range p.Rules {
			if rule.Name == d.Rule {
				fmt.Fprintf(&b, "rule:   %s (%s, line %d)\n", rule.Name, rule.Effect, rule.Line)
			}
		}
	} else {
		b.WriteString("rule:   none (the default is deny)\n")
	}
	fmt.Fprintf(&b, "reason: %s\n", d.Reason)
	if _, err := Words(r.Command); r.Channel == Exec && r.Command != "" && err != nil {
		fmt.Fprintf(&b, "cmd:    %v;\n        allow rules' commands never match it, deny rules' commands always do\n", err)
	}
	if d.ReadOnly {
		b.WriteString("sftp:   read-only\n")
	}
	if d.MaxTime > 0 {
		fmt.Fprintf(&b, "limit:  sessions end after %v\n", d.MaxTime)
	}
	if d.Record != "" || d.RecordExec {
		fmt.Fprintf(&b, "record: %s", or(d.Record, "the default"))
		if d.RecordExec {
			b.WriteString(", exec without a terminal too")
		}
		b.WriteString("\n")
	}
	return b.String()
}

// or is s, or def if s is empty.
func or(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/bastionvm/bastion/policy"
	"github.com/bastionvm/bastion/vm"
)

// policyCheck validates a policy file, or with no file the policy of the
// configuration at configPath.
func policyCheck(configPath, file string, out io.Writer) error {
	var p *policy.Policy
	if file != "" {
		data, err := os.ReadFile(file)
		if err != nil {
			return err
		}
		if isConfiguration(data) {
			// A whole bastion.toml: its policy is what was meant.
			configPath, file = file, ""
		} else if p, err = policy.Parse(file, data, true); err != nil {
			return err
		}
	}
	if file == "" {
		c, err := LoadConfig(configPath)
		if err != nil {
			return err
		}
		file, p = configPath, c.policy
		if c.Server.PolicyFile != "" {
			file = c.Server.PolicyFile
		}
	}
	allow, deny := 0, 0
	for _, r := range p.Rules {
		if r.Effect == policy.Deny {
			deny++
		} else {
			allow++
		}
	}
	fmt.Fprintf(out, "%s: ok: %d allow and %d deny rules\n", file, allow, deny)
	return nil
}

// isConfiguration reports whether data is a bastion configuration rather
// than a policy file: it has a table only a configuration has.
func isConfiguration(data []byte) bool {
	var top map[string]toml.Primitive
	if _, err := toml.Decode(string(data), &top); err != nil {
		return false // policy.Parse will say what is wrong
	}
	for _, k := range []string{"server", "account", "hypervisor", "trust", "template"} {
		if _, ok := top[k]; ok {
			return true
		}
	}
	return false
}

// policyQuery is `bastion policy test`'s request.
type policyQuery struct {
	account, vm, login, channel, command, host, socket, source, when, uuid, hypervisor string
	port                                                                               uint
	labels                                                                             labelFlags
}

func (q *policyQuery) flags(fs *flag.FlagSet) {
	fs.StringVar(&q.account, "account", "", "account name (its groups come from the configuration)")
	fs.StringVar(&q.vm, "vm", "", "VM name")
	fs.StringVar(&q.login, "login", "", "login on the VM")
	fs.StringVar(&q.channel, "channel", "shell", "connect, shell, exec, scp, sftp, local-forward, remote-forward, agent or x11")
	fs.StringVar(&q.command, "command", "", "command, for exec and scp (which of the two it is, the policy decides from the command)")
	fs.StringVar(&q.host, "host", "localhost", "forward destination (local-forward) or bind address (remote-forward)")
	fs.UintVar(&q.port, "port", 0, "forward port")
	fs.StringVar(&q.socket, "socket", "", "a unix socket path on the VM, for a forward to or from a socket instead of --host and --port")
	fs.StringVar(&q.source, "source", "127.0.0.1", "client address")
	fs.StringVar(&q.when, "time", "", "when, as RFC 3339 (default now)")
	fs.StringVar(&q.uuid, "uuid", "", "the VM's UUID")
	fs.StringVar(&q.hypervisor, "hypervisor", "", "the VM's libvirt URI")
	fs.Var(&q.labels, "label", "a label of the VM, KEY=VALUE (repeatable)")
}

func (q *policyQuery) run(configPath string, out io.Writer) error {
	c, err := LoadConfig(configPath)
	if err != nil {
		return err
	}
	if q.account == "" || q.vm == "" || (q.login == "" && q.channel != "connect") {
		return errors.New("policy test: --account, --vm and --login are required")
	}
	var groups []string
	found := false
	for _, a := range c.Accounts {
		if a.Name == q.account {
			groups, found = a.Groups, true
		}
	}
	if !found {
		return fmt.Errorf("policy test: no account %q in %s", q.account, configPath)
	}
	source, err := netip.ParseAddr(q.source)
	if err != nil {
		return fmt.Errorf("policy test: --source: %v", err)
	}
	at := time.Now()
	if q.when != "" {
		if at, err = time.Parse(time.RFC3339, q.when); err != nil {
			return fmt.Errorf("policy test: --time: %v", err)
		}
	}
	ch := policy.Channel(q.channel)
	if ch != policy.Connect && !isKind(ch) {
		return fmt.Errorf("policy test: unknown channel %q", q.channel)
	}
	r := policy.Request{
		Account: q.account, Groups: groups, Source: source, Login: q.login, Channel: ch,
		VM:      vm.Domain{Name: q.vm, UUID: q.uuid, URI: q.hypervisor, Labels: q.labels.m},
		Command: q.command, Host: q.host, Port: uint32(q.port), Socket: q.socket, Time: at,
	}
	fmt.Fprint(out, c.policy.Explain(r))
	return nil
}

func isKind(ch policy.Channel) bool {
	for _, k := range policy.Kinds {
		if k == ch && k != policy.SFTPRead && k != policy.SCPRead {
			return true
		}
	}
	return false
}

// labelFlags collects --label KEY=VALUE flags.
type labelFlags struct{ m map[string]string }

func (l *labelFlags) String() string { return fmt.Sprint(l.m) }

func (l *labelFlags) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("%q is not KEY=VALUE", s)
	}
	if l.m == nil {
		l.m = make(map[string]string)
	}
	l.m[k] = v
	return nil
}

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/bastionvm/bastion/bastion/trust"
	"github.com/bastionvm/bastion/hypervisor"
	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/vm"
)

// doctorTimeout bounds the checks of one hypervisor or one VM.
const doctorTimeout = 30 * time.Second

// checkup prints findings, one line each with a fix under a problem, and
// counts the problems.
type checkup struct {
	out              io.Writer
	problems, advice int
}

func (c *checkup) ok(what, detail string) { fmt.Fprintf(c.out, "ok    %s: %s\n", what, detail) }

// warn is something that works but is likely not what was meant.
func (c *checkup) warn(what, detail, fix string) {
	c.advice++
	c.line("warn", what, detail, fix)
}

// fail is something that stops the bastion, or a VM, from working.
func (c *checkup) fail(what, detail, fix string) {
	c.problems++
	c.line("FAIL", what, detail, fix)
}

func (c *checkup) line(mark, what, detail, fix string) {
	fmt.Fprintf(c.out, "%-5s %s: %s\n", mark, what, detail)
	if fix != "" {
		fmt.Fprintf(c.out, "      fix: %s\n", fix)
	}
}

// doctor checks what a serving bastion needs, and says in plain words what
// is wrong and how to fix it: the configuration, the state directory, the
// listen address, the audit and recording destinations, each hypervisor,
// and each VM's agent, address, host keys, sshd and trust (of the VMs
// named, or of every running one). It changes nothing, on this machine or
// in a guest. The error counts the problems.
func doctor(configPath string, names []string, out io.Writer) error {
	c := &checkup{out: out}
	cfg, err := LoadConfig(configPath)
	if err != nil {
		c.fail("config", err.Error(), "correct what the message names; `bastion config check --config "+configPath+"` checks again")
		return c.verdict()
	}
	c.ok("config "+configPath, fmt.Sprintf("%s, %s, %s, %s", count(len(cfg.Accounts), "account"), count(len(cfg.UserCAs), "user CA"),
		count(len(cfg.policy.Rules), "rule"), count(len(cfg.Hypervisors), "hypervisor")))
	if len(cfg.policy.Rules) == 0 {
		c.warn("policy", "no rule: every request is denied", "add [[rule]] tables (bastion.toml.example shows them)")
	}
	if !anyoneCanLogIn(cfg) {
		c.warn("accounts", "no account has a key and no [[user_ca]] is set: nobody can log in",
			"list each person's public keys under [[account]], or add the [[user_ca]] that signs their certificates")
	}
	c.stateDir(cfg.Server.StateDir)
	c.listen(cfg.Server.Listen)
	c.destinations(cfg)
	if len(cfg.Hypervisors) == 0 {
		c.warn("hypervisors", "none configured: no VM can be reached", `add [[hypervisor]] uri = "qemu:///system" (or qemu+ssh://host/system)`)
		return c.verdict()
	}
	c.fleet(cfg, names)
	return c.verdict()
}

func (c *checkup) verdict() error {
	fmt.Fprintf(c.out, "%s, %s\n", count(c.problems, "problem"), count(c.advice, "warning"))
	if c.problems > 0 {
		return fmt.Errorf("doctor found %s", count(c.problems, "problem"))
	}
	return nil
}

func count(n int, thing string) string {
	if n == 1 {
		return "1 " + thing
	}
	return fmt.Sprintf("%d %ss", n, thing)
}

func anyoneCanLogIn(cfg *Config) bool {
	if len(cfg.UserCAs) > 0 {
		return true
	}
	for _, a := range cfg.Accounts {
		if len(a.Keys) > 0 {
			return true
		}
	}
	return false
}

// stateDir checks the directory of the host keys and the trust state:
// absent is fine (serve makes it), but what is there must be the
// bastion's alone.
func (c *checkup) stateDir(dir string) {
	what := "state directory " + dir
	info, err := os.Stat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		parent := filepath.Dir(filepath.Clean(dir))
		if _, err := os.Stat(parent); err != nil {
			c.fail(what, "neither it nor "+parent+" exists", "make "+parent+", or set server.state_dir to a directory that can be made")
			return
		}
		c.ok(what, "not made yet; `bastion serve` makes it, mode 0700, with a new host key and host CA")
		return
	case err != nil:
		c.fail(what, err.Error(), "make it readable by the user the bastion runs as")
		return
	case !info.IsDir():
		c.fail(what, "not a directory", "set server.state_dir to a directory")
		return
	}
	problem := false
	if info.Mode().Perm()&0o077 != 0 {
		problem = true
		c.fail(what, fmt.Sprintf("mode %04o: others may read the host keys", info.Mode().Perm()), "chmod 700 "+dir)
	}
	for _, name := range []string{"host_key", "host_ca"} {
		path := filepath.Join(dir, name)
		info, err := os.Stat(path)
		if errors.Is(err, fs.ErrNotExist) {
			continue // made on first start
		}
		if err != nil {
			problem = true
			c.fail(path, err.Error(), "")
			continue
		}
		if info.Mode().Perm()&0o077 != 0 {
			problem = true
			c.fail(path, fmt.Sprintf("mode %04o: a private key others may read (the bastion refuses it)", info.Mode().Perm()), "chmod 600 "+path)
		}
	}
	if !problem {
		c.ok(what, "mode 0700, keys 0600")
	}
}

// listen checks that the front door's address can be bound, or tells what
// already answers there.
func (c *checkup) listen(addr string) {
	what := "listen " + addr
	ln, err := net.Listen("tcp", addr)
	if err == nil {
		ln.Close()
		c.ok(what, "free to bind")
		return
	}
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		banner := sshBanner(addr)
		if banner == "" {
			c.fail(what, "in use by a program that does not speak SSH", "stop it, or choose another server.listen")
			return
		}
		if strings.Contains(banner, "bastion") {
			c.ok(what, "a bastion answers there already ("+banner+")")
			return
		}
		c.fail(what, "in use by another SSH server ("+banner+")", "move that sshd to another port (Port in sshd_config), or choose another server.listen")
	case errors.Is(err, syscall.EACCES):
		c.fail(what, "permission denied: ports below 1024 need privilege",
			"run as root, or grant CAP_NET_BIND_SERVICE (the systemd unit does: AmbientCapabilities=CAP_NET_BIND_SERVICE)")
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		c.fail(what, "no interface of this machine has that address", "use one of this machine's addresses, or \":22\" for all")
	default:
		c.fail(what, err.Error(), "check server.listen")
	}
}

// sshBanner is the version line an SSH server at addr sends, or "".
func sshBanner(addr string) string {
	conn, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		return ""
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 256)
	n, _ := conn.Read(buf)
	return trust.VersionLine(buf[:n])
}

// destinations checks where the audit trail and the recordings go.
func (c *checkup) destinations(cfg *Config) {
	switch dest := cfg.Server.Audit; dest {
	case "off":
		c.warn("audit", "off: nothing records who did what", `set server.audit = "stdout" (for the log pipeline) or a file path`)
	case "stdout", "":
		c.ok("audit", "JSON lines on standard output")
	default:
		dir := filepath.Dir(dest)
		if info, err := os.Stat(dir); err != nil || !info.IsDir() {
			c.fail("audit "+dest, "its directory "+dir+" does not exist", "mkdir -p "+dir)
		} else if info, err := os.Lstat(dest); err == nil && !info.Mode().IsRegular() {
			c.fail("audit "+dest, "not a regular file (the bastion refuses links and devices)", "point server.audit at a file")
		} else {
			c.ok("audit "+dest, "JSON lines appended")
		}
	}
	if dir := cfg.Server.Recordings; dir != "" {
		info, err := os.Stat(dir)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			c.ok("recordings "+dir, "not made yet; `bastion serve` makes it, mode 0700")
		case err != nil || !info.IsDir():
			c.fail("recordings "+dir, "not a directory", "set server.recordings to a directory")
		case info.Mode().Perm()&0o077 != 0:
			c.fail("recordings "+dir, fmt.Sprintf("mode %04o: the bastion refuses a recordings directory others may use", info.Mode().Perm()), "chmod 700 "+dir)
		default:
			c.ok("recordings "+dir, "mode 0700")
		}
	}
}

// fleet checks each hypervisor, then each VM on those that answer.
func (c *checkup) fleet(cfg *Config, names []string) {
	var uris []string
	for _, h := range cfg.Hypervisors {
		uris = append(uris, h.URI)
	}
	pool, err := hypervisor.Open(uris, hypervisor.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		c.fail("hypervisors", err.Error(), "")
		return
	}
	defer pool.Close()
	ctx, cancel := context.WithTimeout(context.Background(), doctorTimeout)
	defer cancel()
	domains, _ := pool.List(ctx)
	for _, uri := range uris {
		if err := pool.Dial(ctx, uri); err != nil {
			c.fail("hypervisor "+uri, err.Error(), hypervisorFix(uri, err))
			continue
		}
		n := 0
		for _, d := range domains {
			if d.URI == uri {
				n++
			}
		}
		c.ok("hypervisor "+uri, count(n, "VM"))
	}

	var chosen []vm.Domain
	for _, d := range domains {
		if len(names) == 0 && d.Running || slices.Contains(names, d.Name) || slices.Contains(names, d.UUID) {
			chosen = append(chosen, d)
		}
	}
	for _, name := range names {
		if !slices.ContainsFunc(chosen, func(d vm.Domain) bool { return d.Name == name || d.UUID == name }) {
			c.fail("vm "+name, "no such VM on any hypervisor that answered", "`bastion vm ls --config …` lists the VMs the bastion sees")
		}
	}
	if len(names) == 0 && len(chosen) == 0 {
		c.warn("vms", "no running VM on any hypervisor", "start one (virsh start NAME), or make one: bastion vm dispense")
	}
	records, err := trust.ReadState(cfg.Server.StateDir)
	if err != nil {
		c.warn("trust state", err.Error(), "the serving bastion rewrites it on its next verification")
	}
	manager := &trust.Manager{OOB: pool, SSHPort: cfg.Trust.SSHPort}
	results := make([][]trust.Finding, len(chosen))
	var wg sync.WaitGroup
	turns := make(chan struct{}, 8)
	for i, d := range chosen {
		wg.Add(1)
		go func() {
			defer wg.Done()
			turns <- struct{}{}
			defer func() { <-turns }()
			ctx, cancel := context.WithTimeout(context.Background(), doctorTimeout)
			defer cancel()
			results[i] = manager.Preflight(ctx, d)
		}()
	}
	wg.Wait()
	for i, d := range chosen {
		c.vm(d, results[i], records)
	}
}

// vm reports one VM's preflight and trust.
func (c *checkup) vm(d vm.Domain, found []trust.Finding, records []trust.Record) {
	what := "vm " + d.Name
	var seen []string
	for _, f := range found {
		if f.Err != nil {
			c.fail(what, strings.Join(append(seen, f.Step+": "+f.Err.Error()), "; "), vmFix(d, f))
			return
		}
		seen = append(seen, f.Step+" "+f.Detail)
	}
	c.ok(what, strings.Join(append(seen, "trust "+trustSummary(d, records)), "; "))
}

// trustSummary is what the serving bastion's state file says of d.
func trustSummary(d vm.Domain, records []trust.Record) string {
	var held []string
	now := time.Now()
	for _, r := range records {
		if r.UUID != d.UUID {
			continue
		}
		state := "until " + r.Expires.Format(time.RFC3339)
		if now.After(r.Expires) {
			state = "expired " + r.Expires.Format(time.RFC3339)
		}
		held = append(held, r.Login+" "+state)
	}
	if len(held) == 0 {
		return "not verified yet (the first login through the bastion runs the dual-band check)"
	}
	return "verified for " + strings.Join(held, ", ")
}

// hypervisorFix is the advice for a hypervisor at uri that did not answer
// with err.
func hypervisorFix(uri string, err error) string {
	switch msg := err.Error(); {
	case strings.Contains(msg, "system bus") || strings.Contains(msg, "polkit") || strings.Contains(msg, "authentication failed"):
		return "libvirtd asks polkit whether this user may manage VMs: add the user to the libvirt group where polkit runs, or, with no polkit, set unix_sock_group = \"libvirt\", unix_sock_rw_perms = \"0770\" and auth_unix_rw = \"none\" in /etc/libvirt/libvirtd.conf and restart libvirtd"
	case strings.Contains(msg, "Permission denied"):
		return "this user may not use libvirt's socket: add it to the libvirt group (usermod -a -G libvirt USER) and start the bastion again"
	case strings.Contains(uri, "+ssh://"):
		return "the user the bastion runs as must reach that host with ssh and no prompt (its key in ~/.ssh, the host in known_hosts) and may use libvirt there; try `virsh -c '" + uri + "' list`"
	}
	return "is libvirtd running? (`systemctl start libvirtd`, or `libvirtd -d`); try `virsh -c '" + uri + "' list`"
}

// vmFix is the advice for the step f of d that failed.
func vmFix(d vm.Domain, f trust.Finding) string {
	err := f.Err
	switch {
	case errors.Is(err, vm.ErrNotRunning):
		return fmt.Sprintf("start it: virsh -c '%s' start %s", d.URI, d.Name)
	case errors.Is(err, hypervisor.ErrAgentNotConnected):
		return "run qemu-guest-agent in the guest (apt install qemu-guest-agent), with the domain's <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
	case errors.Is(err, hypervisor.ErrCommandDisabled):
		return "the guest's qemu-ga blocks a command the bastion needs: take it out of block-rpcs in /etc/qemu/qemu-ga.conf and restart qemu-guest-agent"
	case errors.Is(err, hypervisor.ErrAgentSilent), errors.Is(err, hypervisor.ErrTimeout):
		return "the agent is connected but does not answer: restart qemu-guest-agent in the guest"
	case errors.Is(err, hypervisor.ErrNoAddress):
		return "the guest reports no address on its network interfaces: is its network up?"
	case errors.Is(err, hypervisor.ErrAddressUnconfirmed):
		return "the hypervisor knows no DHCP lease or ARP entry for the VM's interfaces: use a libvirt network with DHCP, or check that the guest's address is on the host's network"
	case errors.Is(err, hypervisor.ErrAddressesDisagree):
		return "the guest and the hypervisor see different addresses (a stale lease, or a guest claiming another's address): the bastion will not connect until they agree"
	case f.Step == "guest agent":
		return "the bastion reaches the guest through qemu-guest-agent over libvirt: a QEMU domain with the agent's channel, and the agent running in the guest"
	case f.Step == "host keys":
		return "the guest needs a readable /etc/ssh/ssh_host_ed25519_key.pub (or ecdsa, rsa): run `ssh-keygen -A` in the guest"
	case errors.Is(err, keys.ErrHostKeyMismatch):
		return "the server at the VM's address presents a key the guest's files do not name: another machine answers there, or sshd uses other key files; the bastion refuses it"
	case f.Step == "sshd":
		return "run sshd in the guest on [trust] ssh_port (22 by default), and let this machine through any firewall between"
	}
	return ""
}

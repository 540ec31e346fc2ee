package main

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"syscall"
	"time"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/bastion/dispense"
	"github.com/bastionvm/bastion/bastion/trust"
	"github.com/bastionvm/bastion/hypervisor"
	"github.com/bastionvm/bastion/vm"
)

// heapFloor is allocated once and never touched: the live heap it adds
// raises the collector's target by as much, while its pages, never
// written, cost no memory.
var heapFloor []byte

// reserveHeap keeps the garbage collector from running every few megabytes
// while the live heap is small. x/crypto/ssh allocates a fresh buffer for
// every packet it reads (32 KiB in bulk), so with a few megabytes live and
// the default GOGC a transfer would start a collection every hundred
// packets or so. With n bytes reserved the heap may grow by n more before
// one starts; once the sessions themselves hold more than n the
// reservation no longer matters.
func reserveHeap(n int) { heapFloor = make([]byte, n) }

// fleet is the hypervisors, the trust kept over them and the dispenser
// that makes VMs on them, as the configuration says.
type fleet struct {
	pool      *hypervisor.Pool
	trust     *trust.Manager
	dispenser *dispense.Dispenser
}

// openFleet connects to the configured hypervisors. The trust manager
// hears their lifecycle events; sink, if set, receives the audit events
// of trust and dispense; onEvent, if set, hears the events after it.
func openFleet(c *Config, logger *slog.Logger, sink audit.Sink, onEvent func(vm.Event)) (*fleet, error) {
	templates, err := c.templates()
	if err != nil {
		return nil, err
	}
	var uris []string
	for _, h := range c.Hypervisors {
		uris = append(uris, h.URI)
	}
	instance := c.Trust.Instance
	if instance == "" {
		// Each replica keeps its own epochs: the keys of one are not
		// stale keys of another.
		instance = c.Server.Replica
	}
	var modes []trust.Mode
	for _, m := range c.Trust.Modes {
		modes = append(modes, trust.Mode(m))
	}
	// The check's own connections to the VM keep to the same ciphers as
	// the links the people's sessions travel.
	ciphers := bastion.UpstreamCiphers(c.Server.ciphers)
	manager := &trust.Manager{
		Instance:  instance,
		TTL:       c.Trust.TTL.Duration,
		Modes:     modes,
		SSHPort:   c.Trust.SSHPort,
		Timeout:   c.Trust.CheckTimeout.Duration,
		MaxChecks: c.Trust.MaxChecks,
		Ciphers:   ciphers,
		Logger:    logger,
		Audit:     sink,
	}
	events := manager.HandleEvent
	if onEvent != nil {
		events = func(e vm.Event) {
			manager.HandleEvent(e)
			onEvent(e)
		}
	}
	pool, err := hypervisor.Open(uris, hypervisor.Options{Logger: logger, OnEvent: events})
	if err != nil {
		return nil, err
	}
	manager.OOB = pool
	return &fleet{
		pool:  pool,
		trust: manager,
		dispenser: &dispense.Dispenser{Hypervisor: pool, Trust: manager, Templates: templates,
			Logger: logger, Audit: sink},
	}, nil
}

// vmCommand is `vm …` over this fleet; the TRUST column of `vm ls` is the
// serving bastion's state file in stateDir.
func (f *fleet) vmCommand(policy bastion.Decider, listen, stateDir string, sink audit.Sink) *bastion.VMCommand {
	return &bastion.VMCommand{
		Fleet:     f.pool,
		Dispenser: f.dispenser,
		Policy:    policy,
		TrustOf:   func(uuid string) string { return trust.Summary(stateDir, uuid, time.Now()) },
		Listen:    listen,
		Audit:     sink,
	}
}

func (f *fleet) close() { f.pool.Close() }

// openAudit opens the audit destination: "stdout" (or empty), "off" (a
// nil writer), or a file appended to.
func openAudit(dest string, stdout io.Writer) (*audit.Writer, func(), error) {
	switch dest {
	case "off":
		return nil, func() {}, nil
	case "stdout", "":
		return audit.NewWriter(stdout), func() {}, nil
	default:
		// Not through a symbolic link: whoever could plant one would choose
		// where the trail goes.
		f, err := os.OpenFile(dest, os.O_WRONLY|os.O_APPEND|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
		if err != nil {
			return nil, nil, fmt.Errorf("audit: %w", err)
		}
		if info, err := f.Stat(); err != nil || !info.Mode().IsRegular() {
			f.Close()
			return nil, nil, fmt.Errorf("audit: %s is not a regular file", dest)
		}
		return audit.NewWriter(f), func() { f.Close() }, nil
	}
}

// bastionNames are the names and addresses users reach the front door by,
// the principals of its certificate: server.hostnames, or else this
// machine's host name, "localhost" and the listen address (every address
// of this machine's interfaces when it listens on all).
func bastionNames(c *Config) []string {
	if len(c.Server.Hostnames) > 0 {
		return c.Server.Hostnames
	}
	var names []string
	add := func(n string) {
		if n != "" && !slices.Contains(names, n) {
			names = append(names, n)
		}
	}
	if h, err := os.Hostname(); err == nil {
		add(h)
	}
	add("localhost")
	host, _, _ := net.SplitHostPort(c.Server.Listen)
	if ip := net.ParseIP(host); host != "" && (ip == nil || !ip.IsUnspecified()) {
		add(host)
	} else if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && !ipn.IP.IsLinkLocalUnicast() {
				add(ipn.IP.String())
			}
		}
	}
	return names
}

// knownHostsPatterns are the hosts the line users add trusts the host CA
// for: the bastion's names on any port, and the names VMs may be reached
// by under the policy. While the policy names no VM at all, any host.
func knownHostsPatterns(c *Config) []string {
	vms := c.policy.VMNamePatterns()
	if len(vms) == 0 {
		return nil
	}
	var patterns []string
	for _, n := range bastionNames(c) {
		patterns = append(patterns, n, "["+n+"]:*")
	}
	return append(patterns, vms...)
}

// Command bastion is the SSH bastion for libvirt VMs.
//
//	bastion serve --config bastion.toml
//	bastion keys known-hosts --config bastion.toml
//	bastion config check --config bastion.toml
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/hypervisor"
	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/bastion/trust"
)

const usage = `usage:
  bastion serve --config FILE              run the bastion
  bastion keys known-hosts --config FILE   print the known_hosts line users add once
  bastion config check --config FILE       validate the configuration
  bastion trust ls --config FILE           each VM's trust: state, expiry, pinned host key
  bastion policy check [--config FILE] [POLICY]
                                           validate a policy file, or the configuration's policy
  bastion vm dispense --config FILE --template T VM
  bastion vm ls --config FILE
  bastion vm destroy --config FILE [--force] VM
                                           make, list and remove VMs (also over SSH: ssh you@bastion vm ...)
  bastion policy test --config FILE --account A --vm V --login L --channel C
                      [--command CMD] [--host H --port P] [--source IP] [--time RFC3339]
                      [--uuid U] [--hypervisor URI] [--label K=V]...
                                           print the decision and the deciding rule
`

// heapReserve is the heap the serving bastion reserves (see
// bastion.ReserveHeap): address space, not memory.
const heapReserve = 64 << 20

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "bastion:", err)
		os.Exit(1)
	}
}

func run(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errors.New("no command")
	}
	cmd, args := args[0], args[1:]
	if cmd == "vm" {
		configPath := "bastion.toml"
		var rest []string
		for i := 0; i < len(args); i++ {
			switch {
			case (args[i] == "--config" || args[i] == "-config") && i+1 < len(args):
				configPath = args[i+1]
				i++
			case strings.HasPrefix(args[i], "--config="):
				configPath = strings.TrimPrefix(args[i], "--config=")
			default:
				rest = append(rest, args[i])
			}
		}
		return vmLocal(configPath, rest, stdout)
	}
	if (cmd == "keys" || cmd == "config" || cmd == "trust" || cmd == "policy") && len(args) > 0 {
		cmd, args = cmd+" "+args[0], args[1:]
	}
	fs := flag.NewFlagSet("bastion "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "bastion.toml", "configuration file")
	var q policyQuery
	if cmd == "policy test" {
		q.flags(fs)
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 && !(cmd == "policy check" && fs.NArg() == 1) {
		return fmt.Errorf("%s: unexpected argument %q", cmd, fs.Arg(fs.NArg()-1))
	}
	switch cmd {
	case "policy check":
		return policyCheck(*configPath, fs.Arg(0), stdout)
	case "policy test":
		return q.run(*configPath, stdout)
	case "serve":
		return serve(*configPath, stderr, stdout)
	case "keys known-hosts":
		c, err := LoadConfig(*configPath)
		if err != nil {
			return err
		}
		host, err := keys.LoadOrCreate(c.Server.StateDir)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, host.KnownHostsLine())
		return nil
	case "trust ls":
		c, err := LoadConfig(*configPath)
		if err != nil {
			return err
		}
		return trustList(c.Server.StateDir, stdout, time.Now())
	case "config check":
		if _, err := LoadConfig(*configPath); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%s: ok\n", *configPath)
		return nil
	default:
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("unknown command %q", cmd)
	}
}

func serve(configPath string, stderr, stdout io.Writer) error {
	c, err := LoadConfig(configPath)
	if err != nil {
		return err
	}
	var level slog.Level
	level.UnmarshalText([]byte(c.Server.LogLevel))
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))

	host, err := keys.LoadOrCreate(c.Server.StateDir)
	if err != nil {
		return err
	}
	live, err := newLive(c)
	if err != nil {
		return err
	}
	audit, closeAudit, err := openAudit(c.Server.Audit, stdout)
	if err != nil {
		return err
	}
	defer closeAudit()

	bastion.ReserveHeap(heapReserve)
	srv := &bastion.Server{
		HostKey:        host.Key,
		Certifier:      host,
		Hostnames:      c.Server.Hostnames,
		Accounts:       live,
		Policy:         live,
		EnvAllow:       c.Server.EnvAllow,
		KeepAlive:      c.Server.KeepAlive.Duration,
		ConnectTimeout: c.Server.ConnectTimeout.Duration,
		Logger:         logger,
		Audit:          audit,
	}
	var vmc *vmCommands
	if len(c.Hypervisors) == 0 {
		logger.Warn("no [[hypervisor]] configured: no VM can be reached")
	} else {
		manager, pool, stop, err := startTrust(c, logger, audit)
		if err != nil {
			return err
		}
		defer stop()
		srv.Resolver = resolver{manager, pool}
		vm, _, err := newVMCommands(c, logger, pool, manager)
		if err != nil {
			return err
		}
		vm.policy, vm.audit = live, auditOrNothing(audit)
		vmc = vm
		srv.Commands = map[string]bastion.CommandFunc{"vm": func(ctx context.Context, account bastion.Account, source net.Addr, args []string, out io.Writer) int {
			return vm.run(ctx, &account, source, args, out)
		}}
	}
	ln, err := net.Listen("tcp", c.Server.Listen)
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "bastion: listening on %s\n", ln.Addr())
	if vmc != nil {
		vmc.listen = ln.Addr().String() // for the ssh -J line after a dispense
	}
	fmt.Fprintf(stderr, "bastion: users add this line to ~/.ssh/known_hosts:\n%s\n", host.KnownHostsLine())

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	reloadCtx, stopReload := context.WithCancel(context.Background())
	defer stopReload()
	go (&reloader{path: configPath, live: live, srv: srv, log: logger, audit: auditOrNothing(audit), policy: c.Server.PolicyFile}).run(reloadCtx, hup)

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case err := <-served:
		return err
	case sig := <-sigs:
		logger.Info("draining", "signal", sig.String(), "grace_period", c.Server.GracePeriod.Duration)
		ctx, cancel := context.WithTimeout(context.Background(), c.Server.GracePeriod.Duration)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil && !errors.Is(err, bastion.ErrServerClosed) {
			logger.Warn("grace period over; closed remaining connections", "err", err)
		}
		<-served
		logger.Info("stopped")
		return nil
	}
}

// newTrustManager makes a trust manager as the configuration says; its
// out-of-band channel is the caller's to set.
func newTrustManager(c *Config, logger *slog.Logger) *trust.Manager {
	instance := c.Trust.Instance
	if instance == "" {
		instance, _ = os.Hostname()
	}
	var modes []trust.Mode
	for _, m := range c.Trust.Modes {
		modes = append(modes, trust.Mode(m))
	}
	return &trust.Manager{
		Instance: instance,
		TTL:      c.Trust.TTL.Duration,
		Modes:    modes,
		SSHPort:  c.Trust.SSHPort,
		Timeout:  c.Trust.CheckTimeout.Duration,
		Logger:   logger,
	}
}

// startTrust opens the hypervisors and the trust manager over them, and
// keeps the trust state file current.
func startTrust(c *Config, logger *slog.Logger, audit func(bastion.Event)) (*trust.Manager, *hypervisor.Pool, func(), error) {
	audit = auditOrNothing(audit)
	manager := newTrustManager(c, logger)
	manager.OnChange = func(trusts []trust.Trust) {
		if err := writeTrustState(c.Server.StateDir, trusts); err != nil {
			logger.Error("trust state file", "err", err)
		}
	}
	manager.OnOutcome = func(vm, login string, t *trust.Trust, took time.Duration, err error) {
		if err != nil {
			audit(bastion.Event{Type: bastion.EventTrustFailed, VM: vm, Login: login, Reason: err.Error(),
				Detail: fmt.Sprintf("took %s", took.Round(time.Millisecond))})
			return
		}
		audit(bastion.Event{Type: bastion.EventTrustVerified, VM: vm, Login: login,
			Detail: fmt.Sprintf("addr %s host key %s modes %v expires %s took %s", t.Addr, t.Fingerprint(), t.Modes,
				t.Expires.UTC().Format(time.RFC3339), took.Round(time.Millisecond))})
	}
	var uris []string
	for _, h := range c.Hypervisors {
		uris = append(uris, h.URI)
	}
	pool, err := hypervisor.Open(uris, hypervisor.Options{Logger: logger, OnEvent: func(e hypervisor.Event) {
		switch e.Kind {
		case hypervisor.EventStopped, hypervisor.EventRebooted, hypervisor.EventMigrated, hypervisor.EventUndefined, hypervisor.EventAgentGone:
			go func() {
				manager.Drop(e.UUID, string(e.Kind))
				audit(bastion.Event{Type: bastion.EventTrustDropped, VM: e.Name, Reason: string(e.Kind)})
			}()
		}
	}})
	if err != nil {
		return nil, nil, nil, err
	}
	manager.OOB = outOfBand{pool}
	if err := writeTrustState(c.Server.StateDir, nil); err != nil {
		pool.Close()
		return nil, nil, nil, err
	}
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(30 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				manager.Expire()
			case <-done:
				return
			}
		}
	}()
	return manager, pool, func() { close(done); pool.Close() }, nil
}

func auditOrNothing(audit func(bastion.Event)) func(bastion.Event) {
	if audit == nil {
		return func(bastion.Event) {}
	}
	return audit
}

func openAudit(dest string, stdout io.Writer) (func(bastion.Event), func(), error) {
	switch dest {
	case "off":
		return nil, func() {}, nil
	case "stdout", "":
		return bastion.JSONAudit(stdout), func() {}, nil
	default:
		f, err := os.OpenFile(dest, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			return nil, nil, fmt.Errorf("audit: %w", err)
		}
		return bastion.JSONAudit(f), func() { f.Close() }, nil
	}
}

// Command bastion is the SSH bastion for libvirt VMs.
//
//	bastion serve --config bastion.toml
//	bastion keys known-hosts --config bastion.toml
//	bastion config check --config bastion.toml
//
// bastion help lists every command; cli.go describes them.
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
	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/bastion/metrics"
	"github.com/bastionvm/bastion/bastion/trust"
	"github.com/bastionvm/bastion/hypervisor"
	"github.com/bastionvm/bastion/keys"
)

// heapReserve is the heap the serving bastion reserves (see reserveHeap):
// address space, not memory.
const heapReserve = 64 << 20

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "bastion:", err)
		os.Exit(1)
	}
}

// subcommandAt is the index of a group's subcommand in args: the first
// word that is neither a flag nor the value of --config. It is -1 when
// there is none.
func subcommandAt(args []string) int {
	for i := 0; i < len(args); i++ {
		switch a := args[i]; {
		case a == "--config" || a == "-config":
			i++
		case strings.HasPrefix(a, "-"):
		default:
			return i
		}
	}
	return -1
}

func run(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		printUsage(stderr, "")
		return errors.New("no command")
	}
	switch args[0] {
	case "help", "-h", "-help", "--help":
		if wantsHelp(args[1:]) {
			args = []string{"help", "help"}
		}
		return help(args[1:], stdout)
	}
	cmd, args := args[0], args[1:]
	if isGroup(cmd) {
		i := subcommandAt(args)
		if i < 0 {
			if wantsHelp(args) {
				printUsage(stdout, cmd)
				return nil
			}
			printUsage(stderr, cmd)
			return fmt.Errorf("%s: which command?", cmd)
		}
		// Flags given before the subcommand (bastion vm --config F ls)
		// are kept, after it.
		cmd, args = cmd+" "+args[i], append(append([]string{}, args[:i]...), args[i+1:]...)
	}
	c, known := lookup(cmd)
	if !known {
		printUsage(stderr, "")
		return fmt.Errorf("unknown command %q", cmd)
	}
	fs, f := newFlags(cmd, stderr)
	if wantsHelp(args) {
		printHelp(stdout, c, fs)
		return nil
	}
	if sub, ok := strings.CutPrefix(cmd, "vm "); ok {
		configPath := "bastion.toml"
		rest := []string{sub}
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
	if cmd == "help" {
		return help(args, stdout)
	}
	if cmd == "completion" {
		if len(args) != 1 || args[0] != "bash" {
			return errors.New("completion: bash is the shell it writes for: bastion completion bash")
		}
		completionScript(stdout)
		return nil
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 && !((cmd == "policy check" || cmd == "sessions play") && fs.NArg() == 1) && cmd != "doctor" {
		return fmt.Errorf("%s: unexpected argument %q", cmd, fs.Arg(fs.NArg()-1))
	}
	configPath, q, sq := f.config, &f.q, f.sq
	switch cmd {
	case "policy check":
		return policyCheck(*configPath, fs.Arg(0), stdout)
	case "policy test":
		return q.run(*configPath, stdout)
	case "serve":
		return serve(*configPath, stderr, stdout)
	case "doctor":
		return doctor(*configPath, fs.Args(), stdout)
	case "keys known-hosts":
		c, err := LoadConfig(*configPath)
		if err != nil {
			return err
		}
		host, err := keys.LoadOrCreate(c.Server.StateDir)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, host.KnownHostsLineFor(knownHostsPatterns(c)))
		return nil
	case "trust ls":
		c, err := LoadConfig(*configPath)
		if err != nil {
			return err
		}
		records, err := trust.ReadState(c.Server.StateDir)
		if err != nil {
			return err
		}
		return trust.List(stdout, records, time.Now())
	case "sessions ls":
		return sessionsLs(*configPath, sq, stdout)
	case "sessions play":
		if fs.NArg() != 1 {
			return errors.New("sessions play: which session? (bastion sessions ls lists them)")
		}
		return sessionsPlay(*configPath, fs.Arg(0), sq, stdout)
	case "config check":
		if _, err := LoadConfig(*configPath); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%s: ok\n", *configPath)
		return nil
	}
	return fmt.Errorf("unknown command %q", cmd)
}

// cliFlags are the values of a command's flags.
type cliFlags struct {
	config *string
	q      policyQuery
	sq     sessionFilter
}

// newFlags is the flag set of the command name, writing its errors to out.
func newFlags(name string, out io.Writer) (*flag.FlagSet, *cliFlags) {
	fs := flag.NewFlagSet("bastion "+name, flag.ContinueOnError)
	fs.SetOutput(out)
	fs.Usage = func() { fmt.Fprintf(out, "bastion %s --help shows its flags and an example\n", name) }
	f := &cliFlags{}
	if name == "help" || name == "completion" {
		return fs, f
	}
	f.config = fs.String("config", "bastion.toml", "configuration file")
	if name == "policy test" {
		f.q.flags(fs)
	}
	f.sq.flags(fs, name)
	if c, ok := lookup(name); ok && c.flags != nil {
		c.flags(fs)
	}
	return fs, f
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
	trail, closeAudit, err := openAudit(c.Server.Audit, stdout)
	if err != nil {
		return err
	}
	defer closeAudit()
	var sink audit.Sink
	if trail != nil {
		sink = trail.Emit
	}
	var ops *metrics.Metrics
	if c.Server.OpsListen != "" {
		ops = metrics.New(buildVersion())
		if trail != nil {
			sink = func(e audit.Event) {
				trail.Emit(e)
				if trail.Err() != nil {
					ops.AuditWriteFailed()
				}
			}
		}
		sink = tee(sink, ops.Observe)
	}
	if next, replica := sink, c.Server.Replica; next != nil {
		// Every event names the replica that emitted it, for a trail that
		// gathers several.
		sink = func(e audit.Event) {
			e.Replica = replica
			next(e)
		}
	}

	reserveHeap(heapReserve)
	srv := &bastion.Server{
		HostKey:              host.Key,
		Certifier:            host,
		Hostnames:            bastionNames(c),
		Accounts:             live,
		Policy:               live,
		EnvAllow:             c.Server.EnvAllow,
		Ciphers:              c.Server.ciphers,
		KeepAlive:            c.Server.KeepAlive.Duration,
		ConnectTimeout:       c.Server.ConnectTimeout.Duration,
		LoginGraceTime:       noneIsNegative(c.Server.LoginGraceTime.Duration),
		MaxStartups:          c.Server.MaxStartups.MaxStartups,
		PerSourceMaxStartups: noCapIsNegative(c.Server.PerSourceMaxStartups),
		MaxChannels:          c.Server.MaxChannels,
		MaxPending:           c.Server.MaxPending,
		UpstreamHandshakes:   c.Server.UpstreamHandshakes,
		UpstreamMaxSessions:  c.Server.UpstreamMaxSessions,
		UpstreamLinger:       c.Server.UpstreamLinger.Duration,
		ProxyProtocol:        c.Server.balancers,
		Logger:               logger,
		Audit:                sink,
	}
	if c.Server.AuditRequired {
		srv.AuditRequired = trail.Err
	}
	if dir := c.Server.Recordings; dir != "" {
		// Made if missing; refused if others may read it or plant files.
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("server.recordings: %w", err)
		}
		info, err := os.Stat(dir)
		if err != nil || !info.IsDir() || info.Mode().Perm()&0o077 != 0 {
			return fmt.Errorf("server.recordings: %s must be a directory only its owner may use (mode 0700)", dir)
		}
		srv.Recordings, srv.RecordingMaxBytes = dir, c.Server.RecordingMaxBytes
	}
	ln, err := net.Listen("tcp", c.Server.Listen)
	if err != nil {
		return err
	}
	defer ln.Close() // for the failures before Serve, which closes it itself
	var pool *hypervisor.Pool
	var trusts *trust.Manager
	if len(c.Hypervisors) == 0 {
		logger.Warn("no [[hypervisor]] configured: no VM can be reached")
	} else {
		f, err := openFleet(c, logger, sink, srv.VMEvent)
		if err != nil {
			return err
		}
		defer f.close()
		f.trust.StateDir = c.Server.StateDir
		stopTrust, err := f.trust.Start()
		if err != nil {
			return err
		}
		defer stopTrust()
		srv.VMs, srv.Resolver = f.pool, f.trust
		pool, trusts = f.pool, f.trust
		// The ssh -J line after a dispense names the real listen address.
		vm := f.vmCommand(live, ln.Addr().String(), c.Server.StateDir, sink)
		srv.Commands = map[string]bastion.CommandFunc{"vm": vm.Run}
	}
	if ops != nil {
		stopOps, err := serveOps(c.Server.OpsListen, ops, srv, pool, trusts, logger)
		if err != nil {
			return err
		}
		defer stopOps()
	}
	fmt.Fprintf(stderr, "bastion: listening on %s\n", ln.Addr())
	fmt.Fprintf(stderr, "bastion: users add this line to ~/.ssh/known_hosts:\n%s\n", host.KnownHostsLineFor(knownHostsPatterns(c)))

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	reloadCtx, stopReload := context.WithCancel(context.Background())
	defer stopReload()
	go (&reloader{path: configPath, live: live, srv: srv, log: logger, policy: c.Server.PolicyFile, revoked: c.Server.RevokedKeys}).run(reloadCtx, hup)

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

// noneIsNegative turns a configuration's "0s, no limit" into the
// server's "negative, no limit" (its zero means the default).
func noneIsNegative(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}

// noCapIsNegative does the same for a count.
func noCapIsNegative(n int) int {
	if n == 0 {
		return -1
	}
	return n
}

// vmLocal runs `bastion vm …` at the bastion's own shell: it opens the
// hypervisors itself. Trust it establishes is this process's; the serving
// bastion checks again on first use.
func vmLocal(configPath string, args []string, out io.Writer) error {
	c, err := LoadConfig(configPath)
	if err != nil {
		return err
	}
	if len(c.Hypervisors) == 0 {
		return errors.New("no [[hypervisor]] configured")
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	f, err := openFleet(c, logger, nil, nil)
	if err != nil {
		return err
	}
	defer f.close()
	if code := f.vmCommand(nil, c.Server.Listen, c.Server.StateDir, nil).RunLocal(context.Background(), args, out); code != 0 {
		return fmt.Errorf("vm %s failed", strings.Join(args, " "))
	}
	return nil
}

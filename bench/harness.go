package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/internal/testenv"
	"github.com/bastionvm/bastion/keys"
)

// jumpUser is the user the OpenSSH jump host lets in: an existing
// unprivileged account with no shell (sshd needs no more for -W).
const jumpUser = "nobody"

// Routes: how the client reaches the target.
const (
	viaBastion = "bastion"  // ssh -J bastion <login>@target
	viaTarget  = "login@vm" // ssh <login>@target@bastion: the target in the user name
	viaOpenSSH = "openssh"  // ssh -J jumphost <login>@target-direct
	viaDirect  = "direct"   // ssh <login>@target-direct: no jump host
)

var (
	routes        = []string{viaBastion, viaTarget, viaOpenSSH, viaDirect}
	bastionRoutes = []string{viaBastion, viaTarget}
	jumpRoutes    = []string{viaBastion, viaTarget, viaOpenSSH} // with a jump whose CPU is measured
	routeNames    = map[string]string{viaBastion: "bastion -J", viaTarget: "bastion login@vm", viaOpenSSH: "OpenSSH -J", viaDirect: "direct"}
)

// onBastion reports whether via goes through the bastion in this process.
func onBastion(via string) bool { return via == viaBastion || via == viaTarget }

// hop is one SSH connection of a route and the cipher it negotiated.
type hop struct{ name, cipher string }

// harness holds what the rows share: the target sshd, the jump sshd, the
// in-process bastion, the client's files and the results.
type harness struct {
	opts    options
	log     io.Writer
	started time.Time

	dir          string // working directory: keys, configs, logs, the big file
	login        string
	clientKey    string // private key file
	clientSigner gossh.Signer
	upstream     gossh.Signer // the bastion's key for the target
	knownHosts   string
	configs      map[string]string // cipher ("" for OpenSSH's default) → ssh_config
	bigfile      string

	target  *sshd
	jump    *sshd
	bastion *inProcess // as configured by default
	wide    *inProcess // offering every cipher, for the rows that force one the default leaves out
	cold    *inProcess // as bastion, but with no upstream connection kept for the next login (upstream_linger 0s)

	cleanupOnce sync.Mutex
	cleaned     bool

	rows     []*row
	samples  []sample
	notes    []string
	profiles []string // written profile files
	orphans  struct{ listenerOnly, all int64 }
	env      []string

	maxResult      *maxResult
	idleGoroutines int                         // with the bastion serving nothing
	nofile         uint64                      // the harness's open-file limit
	kex            map[string][]string         // key exchanges negotiated by default, by route
	hops           map[string]map[string][]hop // by bulk variant ("" for a default client) and route
	ioNotes        []string                    // table lines: the bastion's I/O system calls per row
}

// maxResult is the outcome of the session hunt.
type maxResult struct {
	tried, held     int
	err             string
	opened          time.Duration
	pssPerSession   float64 // KiB
	pssMiB          float64 // the whole process
	goroutines      int     // more than before the hunt
	fds             int
	check           string
	stackPerSession float64  // KiB of goroutine stacks
	heapPerSession  float64  // KiB of heap in use
	goroutineSites  string   // a summary of where the goroutines wait
	heapTop         string   // the heap profile's top allocation sites
	bastionErrors   []string // the bastion's last warnings, distinct
}

func (h *harness) logf(format string, args ...any) {
	fmt.Fprintf(h.log, "%7.1fs  %s\n", time.Since(h.started).Seconds(), fmt.Sprintf(format, args...))
}

func (h *harness) note(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	h.notes = append(h.notes, msg)
	h.logf("NOTE: %s", msg)
}

func (h *harness) run() error {
	if err := h.setup(); err != nil {
		return err
	}
	if err := h.verify(); err != nil {
		return err
	}
	o := h.opts
	if o.rows["setup"] {
		if err := h.rowSetup(); err != nil {
			return err
		}
	}
	if o.rows["bulk"] || o.rows["cpu"] {
		if err := h.rowBulk(); err != nil {
			return err
		}
	}
	if o.rows["sftp"] {
		if err := h.rowSFTP(); err != nil {
			return err
		}
	}
	if o.rows["keystroke"] {
		if err := h.rowKeystroke(); err != nil {
			return err
		}
	}
	if o.rows["files"] {
		if err := h.rowSmallFiles(); err != nil {
			return err
		}
	}
	if o.rows["rate"] {
		if err := h.rowRate(); err != nil {
			return err
		}
	}
	if o.rows["mem"] {
		if err := h.rowMem(); err != nil {
			return err
		}
	}
	if o.rows["max"] && o.maxN > 0 {
		if err := h.rowMax(); err != nil {
			return err
		}
	}
	if o.rows["vm"] {
		if err := h.rowVM(); err != nil {
			return err
		}
	}
	if o.rows["soak"] {
		if err := h.rowSoak(); err != nil {
			return err
		}
	}
	return h.report()
}

// setup starts the target sshd, the jump sshd and the bastion, and writes
// the client's files.
func (h *harness) setup() error {
	var err error
	if h.dir, err = os.MkdirTemp("", "bastion-bench-"); err != nil {
		return err
	}
	h.logf("working directory %s", h.dir)
	u, err := user.Current()
	if err != nil {
		return err
	}
	h.login = u.Username
	// Orphans of the clients (ProxyJump's ssh -W) come to the harness, which
	// reaps them, rather than to init.
	if err := setSubreaper(); err != nil {
		return err
	}
	// The bastion holds a descriptor per idle session at its front door and
	// one per upstream connection (one for up to server.upstream_max_sessions
	// of one person's sessions, 10 by default), its clients more: room for
	// the session hunt.
	want := uint64(max(65536, 4*h.opts.maxN+4096))
	got, err := raiseNofile(want)
	if err != nil {
		return err
	}
	h.nofile = got
	if got < want {
		h.note("RLIMIT_NOFILE could only be raised to %d (the hard limit; this process lacks CAP_SYS_RESOURCE), not %d: "+
			"the bastion holds about 1.1 descriptors per session (one at the front door, and an upstream connection per 10 of one person's sessions), so at most about %d sessions fit", got, want, got*10/11)
	}
	var clientPEM []byte
	if h.clientSigner, clientPEM, err = testenv.GenerateKey(); err != nil {
		return err
	}
	h.clientKey = filepath.Join(h.dir, "id_ed25519")
	if err := os.WriteFile(h.clientKey, clientPEM, 0o600); err != nil {
		return err
	}
	if h.upstream, _, err = testenv.GenerateKey(); err != nil {
		return err
	}

	// The target: the client's key (for the OpenSSH route, which logs in
	// end to end) and the bastion's key (for the bastion's upstream).
	h.target, err = startSSHD("target sshd", filepath.Join(h.dir, "target"),
		"AllowTcpForwarding no\nSubsystem sftp /usr/lib/openssh/sftp-server\n", false,
		h.clientSigner.PublicKey(), h.upstream.PublicKey())
	if err != nil {
		return err
	}
	// The jump host: a plain OpenSSH sshd that only forwards TCP, for an
	// unprivileged user with no shell, as jump hosts are set up. (Logging
	// in as root would be unrepresentative: sshd then drops privilege
	// separation after authentication and serves the connection in one
	// process instead of two.)
	if err := os.Chmod(h.dir, 0o711); err != nil {
		return err
	}
	h.jump, err = startSSHD("jump sshd", filepath.Join(h.dir, "jump"), "AllowTcpForwarding yes\nAllowUsers "+jumpUser+"\n", true, h.clientSigner.PublicKey())
	if err != nil {
		return err
	}
	h.bastion, err = startBastion(filepath.Join(h.dir, "bastion-state"), filepath.Join(h.dir, "bastion.log"), h.clientSigner.PublicKey(), h.login, nil,
		bastion.DefaultUpstreamLinger)
	if err != nil {
		return err
	}
	// The same host keys: one known_hosts line trusts them all.
	h.wide, err = startBastion(filepath.Join(h.dir, "bastion-state"), filepath.Join(h.dir, "bastion-wide.log"), h.clientSigner.PublicKey(), h.login,
		gossh.SupportedAlgorithms().Ciphers, bastion.DefaultUpstreamLinger)
	if err != nil {
		return err
	}
	h.cold, err = startBastion(filepath.Join(h.dir, "bastion-state"), filepath.Join(h.dir, "bastion-cold.log"), h.clientSigner.PublicKey(), h.login, nil, 0)
	if err != nil {
		return err
	}
	h.setVM("target", keys.Upstream{Addr: h.target.Addr, HostKeys: []gossh.PublicKey{h.target.HostKey}, Signer: h.upstream})
	h.idleGoroutines = runtime.NumGoroutine()
	h.logf("target sshd %s, jump sshd %s, bastion %s (offering %s), bastion %s (offering %s)", h.target.Addr, h.jump.Addr,
		h.bastion.addr, strings.Join(bastion.DefaultCiphers(), ","), h.wide.addr, strings.Join(gossh.SupportedAlgorithms().Ciphers, ","))

	h.knownHosts = filepath.Join(h.dir, "known_hosts")
	known := h.bastion.host.KnownHostsLine() + "\n" +
		knownHostsLine(h.jump.Addr, h.jump.HostKey) + knownHostsLine(h.target.Addr, h.target.HostKey)
	if err := os.WriteFile(h.knownHosts, []byte(known), 0o600); err != nil {
		return err
	}
	h.configs = map[string]string{}
	for _, c := range append(h.variants(), h.opts.sftpCipher) {
		if _, done := h.configs[c]; !done {
			if h.configs[c], err = h.writeConfig(c, c, ""); err != nil {
				return err
			}
		}
	}
	if h.configs[kexClassic], err = h.writeConfig(kexClassic, "", classicKex); err != nil {
		return err
	}

	if h.opts.rows["bulk"] || h.opts.rows["cpu"] || h.opts.rows["sftp"] {
		h.bigfile = filepath.Join(h.dir, "bigfile")
		start := time.Now()
		if err := testenv.WriteRandomFile(h.bigfile, h.opts.size); err != nil {
			return err
		}
		h.logf("wrote %d MiB of random data to %s in %.1fs", h.opts.size>>20, h.bigfile, time.Since(start).Seconds())
	}

	sshV, _ := exec.Command("ssh", "-V").CombinedOutput()
	h.env = []string{
		"CPU: " + cpuModel() + " (flags: " + cpuFlags() + ")",
		"Go: " + runtime.Version() + ", GOMAXPROCS " + fmt.Sprint(runtime.GOMAXPROCS(0)),
		"OpenSSH: " + strings.TrimSpace(string(sshV)),
		"load average at start: " + loadavg(),
	}
	if busy := otherBusy(2*time.Second, os.Getpid()); len(busy) > 0 {
		h.note("other processes were busy on this machine when the benchmark started (2 s sample): %s", strings.Join(busy, ", "))
	}
	return nil
}

// setVM names a target for both bastions.
func (h *harness) setVM(name string, u keys.Upstream) {
	h.bastion.fleet.Set(name, u)
	h.wide.fleet.Set(name, u)
	h.cold.fleet.Set(name, u)
}

// variants are the clients of the bulk rows: "" is a client at OpenSSH's
// defaults, then one forcing each cipher of -ciphers.
func (h *harness) variants() []string {
	return append([]string{""}, h.opts.ciphers...)
}

func variantName(cipher string) string {
	if cipher == "" {
		return "default client"
	}
	return strings.TrimSuffix(cipher, "@openssh.com") + " forced"
}

// bastionFor is the ssh_config host of the bastion that serves a client
// forcing cipher: the default one, unless its list leaves cipher out.
func bastionFor(cipher string) string {
	if cipher == "" || slices.Contains(bastion.DefaultCiphers(), cipher) {
		return "bastion"
	}
	return "bastion-wide"
}

// throughBastion points args made by sshArgs at the bastion called host
// instead of "bastion"; "" leaves them alone.
func throughBastion(args []string, host string) []string {
	if host == "" {
		return args
	}
	out := slices.Clone(args)
	for i, a := range out {
		if a == "bastion" {
			out[i] = host
		} else if before, ok := strings.CutSuffix(a, "@bastion"); ok {
			out[i] = before + "@" + host
		}
	}
	return out
}

func knownHostsLine(addr string, key gossh.PublicKey) string {
	host, port, _ := strings.Cut(addr, ":")
	return fmt.Sprintf("[%s]:%s %s", host, port, gossh.MarshalAuthorizedKey(key))
}

// Configurations other than a cipher's: the key of h.configs whose ssh_config
// sets KexAlgorithms to classicKex.
const (
	kexClassic = "kex=curve25519"
	classicKex = "curve25519-sha256,curve25519-sha256@libssh.org"
)

// writeConfig writes an ssh_config in which "bastion" is the bastion,
// "jumphost" the jump sshd, "target" the bastion's name for the target VM
// and "target-direct" the target sshd itself. Ciphers (and KexAlgorithms)
// are set under Host * so that ProxyJump's own ssh, which gets -F but not
// -c, uses them too.
func (h *harness) writeConfig(name, cipher, kex string) (string, error) {
	file := "ssh_config"
	if name != "" {
		file += "-" + strings.NewReplacer("@", "-", "=", "-").Replace(name)
	}
	path := filepath.Join(h.dir, file)
	bHost, bPort, _ := strings.Cut(h.bastion.addr, ":")
	wHost, wPort, _ := strings.Cut(h.wide.addr, ":")
	cHost, cPort, _ := strings.Cut(h.cold.addr, ":")
	jHost, jPort, _ := strings.Cut(h.jump.Addr, ":")
	tHost, tPort, _ := strings.Cut(h.target.Addr, ":")
	var b strings.Builder
	fmt.Fprintf(&b, "Host bastion\n  HostName %s\n  Port %s\n  User %s\n", bHost, bPort, benchAccount)
	fmt.Fprintf(&b, "Host bastion-wide\n  HostName %s\n  Port %s\n  User %s\n", wHost, wPort, benchAccount)
	fmt.Fprintf(&b, "Host bastion-cold\n  HostName %s\n  Port %s\n  User %s\n", cHost, cPort, benchAccount)
	fmt.Fprintf(&b, "Host jumphost\n  HostName %s\n  Port %s\n  User %s\n", jHost, jPort, jumpUser)
	fmt.Fprintf(&b, "Host target-direct\n  HostName %s\n  Port %s\n", tHost, tPort)
	fmt.Fprintf(&b, "Host *\n  User %s\n", h.login)
	b.WriteString(testenv.ClientDefaults(h.clientKey, h.knownHosts, "ERROR"))
	b.WriteString("  Compression no\n")
	if cipher != "" {
		fmt.Fprintf(&b, "  Ciphers %s\n", cipher)
	}
	if kex != "" {
		fmt.Fprintf(&b, "  KexAlgorithms %s\n", kex)
	}
	return path, os.WriteFile(path, []byte(b.String()), 0o600)
}

// sshArgs are the arguments of ssh (or sftp) reaching the target by via,
// with the ssh_config of cipher.
func (h *harness) sshArgs(via, cipher string) []string {
	return h.sshArgsConfig(via, cipher, cipher)
}

// sshArgsConfig is sshArgs with the ssh_config called config.
func (h *harness) sshArgsConfig(via, config, cipher string) []string {
	args := []string{"-F", h.configs[config]}
	if cipher != "" {
		args = append(args, "-c", cipher)
	}
	switch via {
	case viaBastion:
		return append(args, "-J", bastionFor(cipher), h.login+"@target")
	case viaTarget:
		return append(args, h.login+"@target@"+bastionFor(cipher))
	case viaOpenSSH:
		return append(args, "-J", "jumphost", h.login+"@target-direct")
	}
	return append(args, h.login+"@target-direct")
}

// cleanup stops everything the harness started; it may run twice.
func (h *harness) cleanup() {
	h.cleanupOnce.Lock()
	defer h.cleanupOnce.Unlock()
	if h.cleaned {
		return
	}
	h.cleaned = true
	defer h.reapOrphans()
	for _, b := range []*inProcess{h.bastion, h.wide, h.cold} {
		if b != nil {
			b.stop()
		}
	}
	for _, s := range []*sshd{h.jump, h.target} {
		if s != nil {
			s.stop()
		}
	}
	if h.dir != "" && !h.opts.keep {
		os.RemoveAll(h.dir)
	} else if h.dir != "" {
		h.logf("kept %s", h.dir)
	}
}

// result is one run of a client command.
type result struct {
	wall   time.Duration
	cpu    int64 // ticks of the jump (bastion: this process; OpenSSH: the jump sshd's processes)
	stdout []byte
	others float64  // CPUs busy outside the harness meanwhile
	io     ioCounts // the bastion's (this process's) I/O system calls
}

// runClient runs program (ssh or sftp) with args, stdin from the file
// stdin (or nothing), stdout to the file stdout (or captured), and measures
// the jump's CPU around it. profile, if not empty, is where the bastion's
// CPU profile of this run goes.
func (h *harness) runClient(via, program string, args []string, stdin, stdout, profile string) (result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, program, args...)
	var files []*os.File
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	if stdin != "" {
		f, err := os.Open(stdin)
		if err != nil {
			return result{}, err
		}
		files = append(files, f)
		cmd.Stdin = f // an *os.File: ssh reads it directly, nothing is copied here
	}
	// Output goes to files, never to pipes: with a pipe, Wait would also
	// wait for every process holding its other end, and ProxyJump's
	// `ssh -W` outlives the client by a few tens of milliseconds. The
	// time measured is the client's, as `time ssh …` shows it.
	if stdout == "" {
		stdout = filepath.Join(h.dir, "run.stdout")
	}
	outFile, err := os.OpenFile(stdout, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return result{}, err
	}
	files = append(files, outFile)
	cmd.Stdout = outFile
	errFile, err := os.Create(filepath.Join(h.dir, "run.stderr"))
	if err != nil {
		return result{}, err
	}
	files = append(files, errFile)
	cmd.Stderr = errFile

	if via == viaOpenSSH {
		if err := h.jump.waitQuiet(30 * time.Second); err != nil {
			return result{}, err
		}
	}
	var before, beforeListener int64
	var ioBefore ioCounts
	switch {
	case onBastion(via):
		ioBefore = selfThreadsIO()
		before = selfCPU()
	case via == viaOpenSSH:
		before, beforeListener, _ = h.jump.cpuTicks()
	}
	if profile != "" {
		f, err := os.Create(profile)
		if err != nil {
			return result{}, err
		}
		files = append(files, f)
		if err := pprof.StartCPUProfile(f); err != nil {
			return result{}, err
		}
	}
	load := probeLoad()
	start := time.Now()
	if err = cmd.Start(); err == nil {
		ownChild(cmd.Process.Pid)
		err = cmd.Wait()
	}
	wall := time.Since(start)
	others := probeLoad().othersSince(load)
	if profile != "" {
		pprof.StopCPUProfile()
	}
	var after, afterListener int64
	var ioDelta ioCounts
	switch {
	case onBastion(via):
		after = selfCPU()
		ioDelta = selfThreadsIO().minus(ioBefore)
	case via == viaOpenSSH:
		// The jump's per-connection processes end just after the client:
		// wait for them, so their CPU has been reaped and counted.
		if err := h.jump.waitQuiet(30 * time.Second); err != nil {
			return result{}, err
		}
		after, afterListener, _ = h.jump.cpuTicks()
		h.orphans.all += after - before
		h.orphans.listenerOnly += afterListener - beforeListener
	}
	h.reapOrphans()
	if err != nil {
		msg, _ := os.ReadFile(errFile.Name())
		return result{}, fmt.Errorf("%s %s: %v\n%s", program, strings.Join(args, " "), err, msg)
	}
	var captured []byte
	if stdout != os.DevNull {
		captured, _ = os.ReadFile(stdout)
	}
	return result{wall: wall, cpu: after - before, stdout: captured, others: others, io: ioDelta}, nil
}

// owned are the children the harness started, which their exec.Cmd
// waits for.
var owned struct {
	sync.Mutex
	pids map[int]bool
}

// ownChild records a child the harness started and waits for itself.
func ownChild(pid int) {
	owned.Lock()
	defer owned.Unlock()
	if owned.pids == nil {
		owned.pids = map[int]bool{}
	}
	owned.pids[pid] = true
}

// reapOrphans waits for the zombies re-parented to the harness (it is a
// child subreaper): the ProxyJump `ssh -W` processes that outlive their
// clients. Children the harness started itself are left to their Wait.
// It runs between measurements, never during one.
func (h *harness) reapOrphans() {
	self := os.Getpid()
	owned.Lock()
	defer owned.Unlock()
	for pid, s := range allStats() {
		if s.ppid == self && s.state == 'Z' && !owned.pids[pid] {
			var ws syscall.WaitStatus
			syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
		}
	}
}

// verify checks every route works and carries the data intact, and
// records the cipher every hop of every route negotiates for each bulk
// variant; a forced cipher must be negotiated on every hop the client
// controls.
func (h *harness) verify() error {
	const n = 4 << 20
	probe := filepath.Join(h.dir, "probe")
	if err := testenv.WriteRandomFile(probe, n); err != nil {
		return err
	}
	want, _ := os.ReadFile(probe)
	for _, via := range routes {
		res, err := h.runClient(via, "ssh", append(h.sshArgs(via, ""), "cat "+probe), "", "", "")
		if err != nil {
			return fmt.Errorf("route %s does not work: %w", via, err)
		}
		if !bytes.Equal(res.stdout, want) {
			return fmt.Errorf("route %s: %d bytes came back, not the %d sent", via, len(res.stdout), n)
		}
	}
	h.logf("every route carries data intact")

	// The bastion's own hop to the target is read from a second target
	// sshd logging at DEBUG1, one connection at a time.
	dbg, err := startSSHD("cipher probe sshd", filepath.Join(h.dir, "target-debug"), "LogLevel DEBUG1\n", false,
		h.clientSigner.PublicKey(), h.upstream.PublicKey())
	if err != nil {
		return err
	}
	defer dbg.stop()
	known, err := os.OpenFile(h.knownHosts, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = known.WriteString(knownHostsLine(dbg.Addr, dbg.HostKey))
	known.Close()
	if err != nil {
		return err
	}
	dbgPort := strings.TrimPrefix(dbg.Addr, "127.0.0.1:")
	// Every hop's cipher, from the client's debug output ("kex:
	// server->client cipher" once per hop it negotiates) and the debug
	// sshd's ("kex: client->server cipher" for the bastion's hop).
	kexLine := regexp.MustCompile(`kex: server->client cipher: (\S+)`)
	upLine := regexp.MustCompile(`kex: client->server cipher: (\S+)`)
	kexAlgo := regexp.MustCompile(`kex: algorithm: (\S+)`)
	clientHops := map[string][]string{
		viaBastion: {"client→bastion", "client→inner hop"},
		viaTarget:  {"client→bastion"},
		viaOpenSSH: {"client→jump", "client→target"},
		viaDirect:  {"client→target"},
	}
	h.hops = map[string]map[string][]hop{}
	probes := 0
	for _, variant := range h.variants() {
		h.hops[variant] = map[string][]hop{}
		for _, via := range routes {
			args := h.sshArgs(via, variant)
			// The same route to the debug sshd: the bastion's name for it,
			// a new one each time (the bastion keeps its connection to a VM
			// for the next login: server.upstream_linger), or its own
			// address.
			dest := &args[len(args)-1]
			if onBastion(via) {
				probes++
				name := fmt.Sprintf("target-debug%d", probes)
				h.setVM(name, keys.Upstream{Addr: dbg.Addr, HostKeys: []gossh.PublicKey{dbg.HostKey}, Signer: h.upstream})
				*dest = strings.Replace(*dest, "@target", "@"+name, 1)
			} else {
				args = append(args[:len(args)-1:len(args)-1], "-p", dbgPort, *dest)
			}
			logBefore, _ := os.ReadFile(dbg.Log)
			out, err := exec.Command("ssh", append(append([]string{"-v"}, args...), "true")...).CombinedOutput()
			if err != nil {
				return fmt.Errorf("ssh -v (%s, %s): %v\n%s", via, variantName(variant), err, out)
			}
			var got []hop
			for i, m := range kexLine.FindAllStringSubmatch(string(out), -1) {
				name := fmt.Sprintf("hop %d", i+1)
				if i < len(clientHops[via]) {
					name = clientHops[via][i]
				}
				if variant != "" && m[1] != variant {
					return fmt.Errorf("%s with %s forced: %s negotiated %s", via, variant, name, m[1])
				}
				got = append(got, hop{name, m[1]})
			}
			if len(got) != len(clientHops[via]) {
				return fmt.Errorf("%s (%s): the client negotiated %d hops, want %d\n%s", via, variantName(variant), len(got), len(clientHops[via]), out)
			}
			if onBastion(via) {
				logAfter, _ := os.ReadFile(dbg.Log)
				m := upLine.FindStringSubmatch(string(logAfter[len(logBefore):]))
				if m == nil {
					return fmt.Errorf("%s (%s): the debug sshd did not log the bastion's cipher", via, variantName(variant))
				}
				got = append(got, hop{"bastion→target", m[1]})
				if variant == "" {
					if k := kexAlgo.FindStringSubmatch(string(logAfter[len(logBefore):])); k != nil {
						h.kex["upstream"] = []string{k[1]}
					}
				}
			}
			h.hops[variant][via] = got
			if variant == "" {
				for _, m := range kexAlgo.FindAllStringSubmatch(string(out), -1) {
					h.kex[via] = append(h.kex[via], m[1])
				}
			}
			h.logf("  %s, %s: %v", variantName(variant), routeNames[via], got)
		}
	}
	h.note("key exchanges by default: bastion -J %v (client→bastion, client→inner hop), bastion login@vm %v, then bastion→target %v; "+
		"OpenSSH -J %v (client→jump, client→target); direct %v",
		h.kex[viaBastion], h.kex[viaTarget], h.kex["upstream"], h.kex[viaOpenSSH], h.kex[viaDirect])
	if slices.ContainsFunc(h.opts.ciphers, func(c string) bool { return bastionFor(c) != "bastion" }) {
		h.note("the bastion offers %s by default on this CPU; the rows forcing another cipher go through a second bastion in this process "+
			"that offers every cipher x/crypto implements (%s), as server.ciphers would",
			strings.Join(bastion.DefaultCiphers(), ", "), strings.Join(gossh.SupportedAlgorithms().Ciphers, ", "))
	}
	return nil
}

// sample is one measurement, for raw.csv.
type sample struct {
	row   string
	via   string
	run   int
	value float64
	extra string
}

func (h *harness) record(r *row, via string, run int, value float64, extra string, others float64) {
	extra += fmt.Sprintf(" others_cpus=%.2f", others)
	r.others = append(r.others, others)
	h.samples = append(h.samples, sample{row: r.name, via: via, run: run, value: value, extra: extra})
	r.values[via] = append(r.values[via], value)
}

// order returns the routes in the order of run i: each run starts with
// the next one, so that a drift in the machine's speed favours none.
func order(i int, routes []string) []string {
	k := i % len(routes)
	return append(slices.Clone(routes[k:]), routes[:k]...)
}

// rowSetup: `ssh … true` by every route, wall time per connection, with
// OpenSSH's default key exchange and again with curve25519 forced on the
// client's hops (OpenSSH 9.2 prefers sntrup761x25519, which x/crypto does
// not offer, so by default the routes do not do the same key exchanges).
// The bastion keeps its connection to the VM open between one login and
// the next (server.upstream_linger); the rows marked "new connection to
// the VM" go through a bastion that does not, so that each login makes
// every handshake OpenSSH's route makes.
func (h *harness) rowSetup() error {
	for _, variant := range []struct{ config, name, bastion string }{
		{"", "connection setup: ssh … true, default KEX", ""},
		{"", "connection setup: ssh … true, default KEX, new connection to the VM", "bastion-cold"},
		{kexClassic, "connection setup: ssh … true, curve25519 KEX", ""},
		{kexClassic, "connection setup: ssh … true, curve25519 KEX, new connection to the VM", "bastion-cold"},
	} {
		args := func(via string) []string {
			return append(throughBastion(h.sshArgsConfig(via, variant.config, ""), variant.bastion), "true")
		}
		r := h.newRow("setup", variant.name, "ms", false)
		// Warm every route up (the bastion caches its certificate per VM).
		for _, via := range routes {
			if _, err := h.runClient(via, "ssh", args(via), "", "", ""); err != nil {
				return err
			}
		}
		for i := 0; i < h.opts.setupRuns; i++ {
			for _, via := range order(i, routes) {
				res, err := h.runClient(via, "ssh", args(via), "", "", "")
				if err != nil {
					return err
				}
				h.record(r, via, i, float64(res.wall.Microseconds())/1000, fmt.Sprintf("cpu_ticks=%d", res.cpu), res.others)
			}
		}
		r.pair()
		h.logf("%s", r.summary())
	}
	return nil
}

// rowBulk: `ssh … 'cat > /dev/null'` and `'cat bigfile'` by every route,
// for a default client and for one forcing each cipher: MB/s, and the
// jump's CPU seconds per GiB from the same runs.
func (h *harness) rowBulk() error {
	for _, cipher := range h.variants() {
		short := variantName(cipher)
		tag := "default"
		if cipher != "" {
			tag = strings.SplitN(cipher, "@", 2)[0]
		}
		for _, dir := range []string{"download", "upload"} {
			cmdline, stdin := "cat "+h.bigfile, ""
			if dir == "upload" {
				cmdline, stdin = "cat > /dev/null", h.bigfile
			}
			args := func(via string) []string { return append(h.sshArgs(via, cipher), cmdline) }
			if err := h.transfer("bulk", fmt.Sprintf("bulk %s, %s", dir, short), fmt.Sprintf("jump CPU, bulk %s, %s", dir, short),
				"ssh", args, stdin, fmt.Sprintf("bulk-%s-%s", dir, tag)); err != nil {
				return err
			}
		}
	}
	return nil
}

// transfer measures one transfer of the big file, with output to
// /dev/null: MB/s in a row of group, and the jump's CPU seconds per GiB in
// a "cpu" row named cpuName, from the same alternating runs; then, if
// profiling, one more bastion run under the profiler, tagged tag.
func (h *harness) transfer(group, name, cpuName, program string, args func(via string) []string, stdin, tag string) error {
	size := h.opts.size
	tput := h.newRow(group, name, "MB/s", true)
	cpu := h.newRow("cpu", cpuName, "CPU s/GiB", false)
	var io ioCounts
	for i := 0; i < h.opts.runs; i++ {
		for _, via := range order(i, routes) {
			res, err := h.runClient(via, program, args(via), stdin, os.DevNull, "")
			if err != nil {
				return err
			}
			mbps := float64(size) / 1e6 / res.wall.Seconds()
			h.record(tput, via, i, mbps, fmt.Sprintf("wall_s=%.3f", res.wall.Seconds()), res.others)
			if via == viaDirect { // no jump
				h.logf("  %s run %d %s: %.0f MB/s", name, i+1, via, mbps)
				continue
			}
			cpuPerGiB := float64(res.cpu) / clockTick / (float64(size) / (1 << 30))
			h.record(cpu, via, i, cpuPerGiB, fmt.Sprintf("cpu_ticks=%d", res.cpu), res.others)
			h.logf("  %s run %d %s: %.0f MB/s, %.2f CPU s/GiB", name, i+1, via, mbps, cpuPerGiB)
			if via == viaBastion {
				io = io.add(res.io)
			}
		}
	}
	h.ioNote(name, io, size*int64(h.opts.runs))
	tput.pair()
	cpu.pair()
	h.logf("%s", tput.summary())
	h.logf("%s", cpu.summary())
	if !h.opts.profile {
		return nil
	}
	return h.profileRun(tag, args(viaBastion), program, stdin, os.DevNull)
}

// profileRun repeats one bastion run under the CPU profiler. It is not
// counted: the profiler's own cost stays out of the figures.
func (h *harness) profileRun(tag string, args []string, program, stdin, stdout string) error {
	path, err := filepath.Abs(filepath.Join(h.opts.out, "cpu-"+tag+".pprof"))
	if err != nil {
		return err
	}
	if _, err := h.runClient(viaBastion, program, args, stdin, stdout, path); err != nil {
		return err
	}
	h.profiles = append(h.profiles, path)
	h.logf("  wrote %s", path)
	return nil
}

// rowSFTP: sftp get and put of the big file (to and from /dev/null).
func (h *harness) rowSFTP() error {
	cipher := h.opts.sftpCipher
	short := "OpenSSH's default cipher"
	if cipher != "" {
		short = strings.SplitN(cipher, "@", 2)[0]
	}
	for _, dir := range []string{"get", "put"} {
		batch := filepath.Join(h.dir, "sftp-"+dir)
		if err := os.WriteFile(batch, []byte(fmt.Sprintf("%s %s /dev/null\n", dir, h.bigfile)), 0o600); err != nil {
			return err
		}
		name := fmt.Sprintf("sftp %s, %s", dir, short)
		argsFor := func(via string) []string {
			args := h.sshArgs(via, cipher)
			dest := args[len(args)-1]
			return append(append(args[:len(args)-1:len(args)-1], "-q", "-b", batch), dest)
		}
		if err := h.transfer("sftp", name, "jump CPU, "+name, "sftp", argsFor, "", "sftp-"+dir); err != nil {
			return err
		}
	}
	return nil
}

// idleClient is a running client process holding sessions.
type idleClient struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  *bufio.Scanner
	held   int
	err    string
	opened time.Duration
}

// startIdle starts a client process opening n sessions by via (to the VM
// named vm, for the bastion) and waits until it has opened them.
func (h *harness) startIdle(via, vm, command string, n int) (*idleClient, error) {
	spec := idleSpec{
		Via: via, TargetUser: h.login, KeyPath: h.clientKey, Command: command, N: n, Concurrency: h.opts.conc,
	}
	if via == viaBastion {
		ca := strings.TrimSpace(string(gossh.MarshalAuthorizedKey(h.bastion.host.CA.PublicKey())))
		spec.JumpAddr, spec.JumpUser, spec.JumpHostKey = h.bastion.addr, benchAccount, ca
		spec.Target, spec.TargetKey = vm+":22", ca
	} else {
		spec.JumpAddr, spec.JumpUser = h.jump.Addr, jumpUser
		spec.JumpHostKey = strings.TrimSpace(string(gossh.MarshalAuthorizedKey(h.jump.HostKey)))
		spec.Target = h.target.Addr
		spec.TargetKey = strings.TrimSpace(string(gossh.MarshalAuthorizedKey(h.target.HostKey)))
	}
	specPath := filepath.Join(h.dir, fmt.Sprintf("idle-%s-%d.json", via, n))
	if err := writeJSON(specPath, spec); err != nil {
		return nil, err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	c := &idleClient{cmd: exec.Command(self, "-mode", "client", "-spec", specPath)}
	c.cmd.Stderr = h.log
	if c.stdin, err = c.cmd.StdinPipe(); err != nil {
		return nil, err
	}
	out, err := c.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	start := time.Now()
	if err := c.cmd.Start(); err != nil {
		return nil, err
	}
	ownChild(c.cmd.Process.Pid)
	c.lines = bufio.NewScanner(out)
	for c.lines.Scan() {
		line := c.lines.Text()
		if strings.HasPrefix(line, "progress ") {
			h.logf("    %s: %s sessions open", via, strings.TrimPrefix(line, "progress "))
			continue
		}
		if rest, ok := strings.CutPrefix(line, "ready "); ok {
			fmt.Sscan(rest, &c.held)
			_, c.err, _ = strings.Cut(rest, " ")
			c.opened = time.Since(start)
			return c, nil
		}
	}
	c.cmd.Wait()
	return nil, errors.New("idle client ended without opening its sessions")
}

// check round-trips a line through a sample of the sessions.
func (c *idleClient) check() string {
	io.WriteString(c.stdin, "check\n")
	if c.lines.Scan() {
		return strings.TrimPrefix(c.lines.Text(), "checked ")
	}
	return "no answer"
}

// stop closes every session and waits for the client to exit.
func (c *idleClient) stop() {
	c.stdin.Close()
	done := make(chan struct{})
	go func() { c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(time.Minute):
		c.cmd.Process.Kill()
		<-done
	}
}

// selfMem is this process's memory after a full collection that returns
// freed memory to the kernel: the bastion's live memory, not the garbage
// its handshakes left behind.
func selfMem() (raw, settled memInfo) {
	raw, _ = readMem("self")
	runtime.GC()
	debug.FreeOSMemory()
	settled, _ = readMem("self")
	return raw, settled
}

// rowMem: memory per idle session at each count in -mem.
func (h *harness) rowMem() error {
	for _, n := range h.opts.memN {
		r := h.newRow("mem", fmt.Sprintf("memory per idle session, %d sessions", n), "KiB PSS", false)
		for i := 0; i < h.opts.memRuns; i++ {
			for _, via := range order(i, []string{viaBastion, viaOpenSSH}) {
				load := probeLoad()
				perSession, detail, err := h.idleRun(via, n)
				if err != nil {
					return err
				}
				h.record(r, via, i, perSession, detail, probeLoad().othersSince(load))
				h.logf("  %d idle sessions run %d %s: %.1f KiB/session (%s)", n, i+1, via, perSession, detail)
			}
		}
		r.pair()
		h.logf("%s", r.summary())
	}
	return nil
}

// settleBastion waits until the sessions of earlier runs are entirely gone
// from the bastion: each connection's keepalive goroutine only notices the
// connection closed at its next tick, up to 30 s later.
func (h *harness) settleBastion() {
	deadline := time.Now().Add(40 * time.Second)
	for runtime.NumGoroutine() > h.idleGoroutines+2 && time.Now().Before(deadline) {
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
}

// idleRun opens n idle sessions by via, each an interactive-style session
// channel running `cat` on the target, and returns the jump's PSS growth
// per session.
func (h *harness) idleRun(via string, n int) (float64, string, error) {
	var base memInfo
	if via == viaBastion {
		h.settleBastion()
		_, base = selfMem()
	} else {
		if err := h.jump.waitQuiet(time.Minute); err != nil {
			return 0, "", err
		}
		base, _ = h.jump.mem()
	}
	c, err := h.startIdle(via, "target", "cat", n)
	if err != nil {
		return 0, "", err
	}
	defer c.stop()
	if c.held < n {
		return 0, "", fmt.Errorf("%s: only %d of %d idle sessions opened: %s", via, c.held, n, c.err)
	}
	time.Sleep(2 * time.Second)
	var after, raw memInfo
	procs := 1
	if via == viaBastion {
		raw, after = selfMem()
	} else {
		after, procs = h.jump.mem()
		raw = after
	}
	check := c.check()
	per := float64(after.pssKB-base.pssKB) / float64(n)
	detail := fmt.Sprintf("pss_kib=%d->%d pss_anon_kib=%d->%d rss_kib=%d->%d pss_before_gc_kib=%d procs=%d opened_s=%.1f check=%s",
		base.pssKB, after.pssKB, base.pssAnonKB, after.pssAnonKB, base.rssKB, after.rssKB, raw.pssKB, procs, c.opened.Seconds(), check)
	if via == viaBastion {
		detail += fmt.Sprintf(" goroutines=%d", runtime.NumGoroutine())
	}
	return per, detail, nil
}

// rowMax: how many idle sessions the bastion holds, against a Go stub
// target in a process of its own.
func (h *harness) rowMax() error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	specPath := filepath.Join(h.dir, "stub.pub")
	if err := os.WriteFile(specPath, gossh.MarshalAuthorizedKey(h.upstream.PublicKey()), 0o600); err != nil {
		return err
	}
	stub := exec.Command(self, "-mode", "stub", "-spec", specPath)
	stub.Stderr = h.log
	out, err := stub.StdoutPipe()
	if err != nil {
		return err
	}
	if err := stub.Start(); err != nil {
		return err
	}
	ownChild(stub.Process.Pid)
	defer func() {
		stub.Process.Kill()
		stub.Wait()
	}()
	line, _ := bufio.NewReader(out).ReadString('\n')
	f := strings.Fields(line)
	if len(f) < 4 || f[0] != "listening" {
		return fmt.Errorf("stub target said %q", line)
	}
	addr := f[1]
	stubKey, _, _, _, err := gossh.ParseAuthorizedKey([]byte(f[2] + " " + f[3]))
	if err != nil {
		return fmt.Errorf("stub target key: %v", err)
	}
	h.bastion.fleet.Set("stub", keys.Upstream{Addr: addr, HostKeys: []gossh.PublicKey{stubKey}, Signer: h.upstream})

	h.settleBastion()
	_, base := selfMem()
	baseG := runtime.NumGoroutine()
	var baseStats runtime.MemStats
	runtime.ReadMemStats(&baseStats)
	h.logf("session hunt: opening up to %d idle sessions through the bastion to a stub target", h.opts.maxN)
	c, err := h.startIdle(viaBastion, "stub", "cat", h.opts.maxN)
	if err != nil {
		return err
	}
	defer c.stop()
	time.Sleep(2 * time.Second)
	_, after := selfMem()
	var stats runtime.MemStats
	runtime.ReadMemStats(&stats)
	fds, _ := os.ReadDir("/proc/self/fd")
	check := c.check()
	m := maxResult{
		tried: h.opts.maxN, held: c.held, err: c.err, opened: c.opened,
		pssPerSession: float64(after.pssKB-base.pssKB) / float64(max(1, c.held)),
		pssMiB:        float64(after.pssKB) / 1024,
		goroutines:    runtime.NumGoroutine() - baseG,
		fds:           len(fds), check: check,
		stackPerSession: float64(stats.StackInuse-baseStats.StackInuse) / 1024 / float64(max(1, c.held)),
		heapPerSession:  float64(stats.HeapInuse-baseStats.HeapInuse) / 1024 / float64(max(1, c.held)),
	}
	m.bastionErrors = lastWarnings(filepath.Join(h.dir, "bastion.log"), 3)
	if path, err := filepath.Abs(filepath.Join(h.opts.out, "heap-hunt.pprof")); err == nil {
		if f, err := os.Create(path); err == nil {
			pprof.Lookup("heap").WriteTo(f, 0)
			f.Close()
			m.heapTop = heapSummary(path)
		}
	}
	if path, err := filepath.Abs(filepath.Join(h.opts.out, "goroutines-hunt.txt")); err == nil {
		if f, err := os.Create(path); err == nil {
			pprof.Lookup("goroutine").WriteTo(f, 1)
			f.Close()
			m.goroutineSites = goroutineSites(path, m.held)
		}
	}
	h.maxResult = &m
	h.logf("session hunt: held %d of %d (%s); %.1f KiB PSS/session, %d goroutines, %d fds; check %s; opened in %.1fs",
		m.held, m.tried, m.err, m.pssPerSession, m.goroutines, m.fds, m.check, m.opened.Seconds())
	return nil
}

// goroutineSites condenses a goroutine profile (debug=1) into a table of
// where goroutines wait: the first frame outside the runtime and the
// standard library's plumbing, with counts per session.
func goroutineSites(path string, sessions int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	counts := map[string]int{}
	plumbing := regexp.MustCompile(`^(runtime\.|internal/|sync\.|io\.|bufio\.|net\.|os\.|syscall\.|time\.|context\.)`)
	frame := regexp.MustCompile(`^#\s+0x[0-9a-f]+\s+(\S+?)\+0x`)
	for _, group := range strings.Split(string(data), "\n\n") {
		lines := strings.Split(group, "\n")
		var n int
		if len(lines) == 0 || !strings.Contains(lines[0], " @ ") {
			continue
		}
		fmt.Sscan(lines[0], &n)
		site := ""
		for _, l := range lines[1:] {
			m := frame.FindStringSubmatch(l)
			if m == nil {
				continue
			}
			if site == "" {
				site = m[1] // fallback: the innermost frame
			}
			if !plumbing.MatchString(m[1]) {
				site = m[1]
				break
			}
		}
		counts[site] += n
	}
	type kv struct {
		site string
		n    int
	}
	var list []kv
	for k, v := range counts {
		list = append(list, kv{k, v})
	}
	slices.SortFunc(list, func(a, b kv) int { return b.n - a.n })
	var b strings.Builder
	fmt.Fprintf(&b, "| goroutines waiting in | count | per session |\n|---|---|---|\n")
	for i, e := range list {
		if i == 15 {
			break
		}
		fmt.Fprintf(&b, "| `%s` | %d | %.2f |\n", e.site, e.n, float64(e.n)/float64(max(1, sessions)))
	}
	return b.String()
}

// ioNote records the bastion's socket system calls over a row's runs.
func (h *harness) ioNote(name string, io ioCounts, payload int64) {
	if payload <= 0 || io.syscw == 0 {
		return
	}
	mib := float64(payload) / (1 << 20)
	h.ioNotes = append(h.ioNotes, fmt.Sprintf("| %s | %.0f | %.0f | %.0f | %.0f | %.2f |",
		name, float64(io.syscr)/mib, float64(io.syscw)/mib, float64(io.rchar)/float64(max(1, io.syscr)),
		float64(io.wchar)/float64(max(1, io.syscw)), float64(io.rchar+io.wchar)/float64(payload)))
}

// lastWarnings returns the last n distinct warnings and errors in the
// bastion's log, without their time stamps.
func lastWarnings(path string, n int) []string {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	lines := strings.Split(string(data), "\n")
	var out []string
	for i := len(lines) - 1; i >= 0 && len(out) < n; i-- {
		l := lines[i]
		if !strings.Contains(l, "level=WARN") && !strings.Contains(l, "level=ERROR") {
			continue
		}
		if _, rest, ok := strings.Cut(l, " level="); ok {
			l = "level=" + rest
		}
		// Drop the per-connection fields that make every line distinct.
		l = regexp.MustCompile(` source=\S+`).ReplaceAllString(l, "")
		if !slices.Contains(out, l) {
			out = append(out, l)
		}
	}
	return out
}

// heapSummary lists the top allocation sites of the live heap.
func heapSummary(path string) string {
	out, err := exec.Command("go", "tool", "pprof", "-top", "-sample_index=inuse_space", "-nodecount=12", path).CombinedOutput()
	if err != nil {
		return ""
	}
	var b strings.Builder
	started := false
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, "flat%") {
			started = true
		}
		if started && strings.TrimSpace(line) != "" {
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

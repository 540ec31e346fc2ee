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

	"github.com/bastionvm/bastion/internal/testenv"
	"github.com/bastionvm/bastion/keys"
)

// jumpUser is the user the OpenSSH jump host lets in: an existing
// unprivileged account with no shell (sshd needs no more for -W).
const jumpUser = "nobody"

// Routes: how the client reaches the target.
const (
	viaBastion = "bastion" // ssh -J bastion <login>@target
	viaOpenSSH = "openssh" // ssh -J jumphost <login>@target-direct
)

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
	bastion *inProcess

	cleanupOnce sync.Mutex
	cleaned     bool

	rows     []*row
	samples  []sample
	notes    []string
	profiles []string // written profile files
	orphans  struct{ listenerOnly, all int64 }
	env      []string

	maxResult      *maxResult
	idleGoroutines int                 // with the bastion serving nothing
	nofile         uint64              // the harness's open-file limit
	kex            map[string][]string // key exchanges negotiated by default, by route
	ioNotes        []string            // table lines: the bastion's I/O system calls per row
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
	// The bastion holds two descriptors per idle session, its clients two
	// more: room for the session hunt.
	want := uint64(max(65536, 4*h.opts.maxN+4096))
	got, err := raiseNofile(want)
	if err != nil {
		return err
	}
	h.nofile = got
	if got < want {
		h.note("RLIMIT_NOFILE could only be raised to %d (the hard limit; this process lacks CAP_SYS_RESOURCE), not %d: "+
			"the bastion holds two descriptors per session (front door and upstream), so at most about %d sessions fit", got, want, got/2)
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
	h.bastion, err = startBastion(filepath.Join(h.dir, "bastion-state"), filepath.Join(h.dir, "bastion.log"), h.clientSigner.PublicKey(), h.login)
	if err != nil {
		return err
	}
	h.bastion.fleet.Set("target", keys.Upstream{Addr: h.target.Addr, HostKeys: []gossh.PublicKey{h.target.HostKey}, Signer: h.upstream})
	h.idleGoroutines = runtime.NumGoroutine()
	h.logf("target sshd %s, jump sshd %s, bastion %s", h.target.Addr, h.jump.Addr, h.bastion.addr)

	h.knownHosts = filepath.Join(h.dir, "known_hosts")
	known := h.bastion.host.KnownHostsLine() + "\n" +
		knownHostsLine(h.jump.Addr, h.jump.HostKey) + knownHostsLine(h.target.Addr, h.target.HostKey)
	if err := os.WriteFile(h.knownHosts, []byte(known), 0o600); err != nil {
		return err
	}
	h.configs = map[string]string{}
	for _, c := range append([]string{"", h.opts.sftpCipher}, h.opts.ciphers...) {
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
	jHost, jPort, _ := strings.Cut(h.jump.Addr, ":")
	tHost, tPort, _ := strings.Cut(h.target.Addr, ":")
	var b strings.Builder
	fmt.Fprintf(&b, "Host bastion\n  HostName %s\n  Port %s\n  User %s\n", bHost, bPort, benchAccount)
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
	if via == viaBastion {
		return append(args, "-J", "bastion", h.login+"@target")
	}
	return append(args, "-J", "jumphost", h.login+"@target-direct")
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
	if h.bastion != nil {
		h.bastion.stop()
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
	if via == viaBastion {
		ioBefore = selfThreadsIO()
		before = selfCPU()
	} else {
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
	if via == viaBastion {
		after = selfCPU()
		ioDelta = selfThreadsIO().minus(ioBefore)
	} else {
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

// verify checks both routes work, carry the data intact, and negotiate the
// cipher asked for on every hop the client controls.
func (h *harness) verify() error {
	const n = 4 << 20
	probe := filepath.Join(h.dir, "probe")
	if err := testenv.WriteRandomFile(probe, n); err != nil {
		return err
	}
	want, _ := os.ReadFile(probe)
	for _, via := range []string{viaBastion, viaOpenSSH} {
		res, err := h.runClient(via, "ssh", append(h.sshArgs(via, ""), "cat "+probe), "", "", "")
		if err != nil {
			return fmt.Errorf("route %s does not work: %w", via, err)
		}
		if !bytes.Equal(res.stdout, want) {
			return fmt.Errorf("route %s: %d bytes came back, not the %d sent", via, len(res.stdout), n)
		}
	}
	h.logf("both routes carry data intact")

	// Every hop's cipher, from the client's debug output: two "kex:
	// server->client cipher" lines (the jump hop and the end-to-end hop).
	kexLine := regexp.MustCompile(`kex: server->client cipher: (\S+)`)
	for _, cipher := range h.opts.ciphers {
		for _, via := range []string{viaBastion, viaOpenSSH} {
			cmd := exec.Command("ssh", append(append([]string{"-v"}, h.sshArgs(via, cipher)...), "true")...)
			out, err := cmd.CombinedOutput()
			if err != nil {
				return fmt.Errorf("ssh -v (%s, %s): %v\n%s", via, cipher, err, out)
			}
			var got []string
			for _, m := range kexLine.FindAllStringSubmatch(string(out), -1) {
				got = append(got, m[1])
			}
			if len(got) != 2 || got[0] != cipher || got[1] != cipher {
				return fmt.Errorf("%s with %s: the client negotiated %v, want %s on both hops", via, cipher, got, cipher)
			}
		}
	}
	h.logf("both hops of both routes negotiate the cipher asked for")

	// Which key exchange each hop does by default.
	kexAlgo := regexp.MustCompile(`kex: algorithm: (\S+)`)
	for _, via := range []string{viaBastion, viaOpenSSH} {
		out, err := exec.Command("ssh", append(append([]string{"-v"}, h.sshArgs(via, "")...), "true")...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("ssh -v (%s): %v\n%s", via, err, out)
		}
		var got []string
		for _, m := range kexAlgo.FindAllStringSubmatch(string(out), -1) {
			got = append(got, m[1])
		}
		h.kex[via] = got
	}

	// The bastion's own upstream hop (x/crypto client to the target) uses
	// x/crypto's preference, whatever the client asked for. Read it from a
	// second target sshd logging at DEBUG1.
	dbg, err := startSSHD("cipher probe sshd", filepath.Join(h.dir, "target-debug"), "LogLevel DEBUG1\n", false, h.upstream.PublicKey())
	if err != nil {
		return err
	}
	defer dbg.stop()
	h.bastion.fleet.Set("target-debug", keys.Upstream{Addr: dbg.Addr, HostKeys: []gossh.PublicKey{dbg.HostKey}, Signer: h.upstream})
	upstreamCiphers := map[string]bool{}
	for _, cipher := range h.opts.ciphers {
		args := h.sshArgs(viaBastion, cipher)
		args[len(args)-1] = h.login + "@target-debug"
		if out, err := exec.Command("ssh", append(args, "true")...).CombinedOutput(); err != nil {
			return fmt.Errorf("probe of the upstream cipher: %v\n%s", err, out)
		}
	}
	logData, _ := os.ReadFile(dbg.Log)
	if m := kexAlgo.FindStringSubmatch(string(logData)); m != nil {
		h.kex["upstream"] = []string{m[1]}
	}
	h.note("key exchanges by default: bastion route %v (client→bastion, client→inner hop), then bastion→target %v; OpenSSH route %v (client→jump, client→target)",
		h.kex[viaBastion], h.kex["upstream"], h.kex[viaOpenSSH])
	for _, m := range regexp.MustCompile(`kex: client->server cipher: (\S+)`).FindAllStringSubmatch(string(logData), -1) {
		upstreamCiphers[m[1]] = true
	}
	var list []string
	for c := range upstreamCiphers {
		list = append(list, c)
	}
	if len(list) > 0 {
		h.note("the bastion's upstream hop (bastion → target sshd) negotiated %s whatever the client's cipher: x/crypto's client preference, not configurable in link.go", strings.Join(list, ", "))
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
	if via == viaBastion {
		r.bastion = append(r.bastion, value)
	} else {
		r.openssh = append(r.openssh, value)
	}
}

// order returns the routes in the order of run i: alternating which goes
// first, so that a drift in the machine's speed favours neither.
func order(i int) []string {
	if i%2 == 0 {
		return []string{viaBastion, viaOpenSSH}
	}
	return []string{viaOpenSSH, viaBastion}
}

// rowSetup: `ssh -J … true`, wall time per connection, with OpenSSH's
// default key exchange and again with curve25519 forced on the client's
// hops (OpenSSH 9.2 prefers sntrup761x25519, which x/crypto does not
// offer, so by default the two routes do not do the same key exchanges).
func (h *harness) rowSetup() error {
	for _, variant := range []struct{ config, name string }{
		{"", "connection setup: ssh -J … true, default KEX"},
		{kexClassic, "connection setup: ssh -J … true, curve25519 KEX"},
	} {
		args := func(via string) []string { return append(h.sshArgsConfig(via, variant.config, ""), "true") }
		r := h.newRow("setup", variant.name, "ms", false)
		// Warm both routes up (the bastion caches its certificate per VM).
		for _, via := range []string{viaBastion, viaOpenSSH} {
			if _, err := h.runClient(via, "ssh", args(via), "", "", ""); err != nil {
				return err
			}
		}
		for i := 0; i < h.opts.setupRuns; i++ {
			for _, via := range order(i) {
				res, err := h.runClient(via, "ssh", args(via), "", "", "")
				if err != nil {
					return err
				}
				h.record(r, via, i, float64(res.wall.Microseconds())/1000, fmt.Sprintf("cpu_ticks=%d", res.cpu), res.others)
			}
		}
		r.pair()
		h.logf("%s", r.summary())
		// For scale: the same command straight to the target, no jump at all.
		var direct []float64
		for i := 0; i < min(h.opts.setupRuns, 11); i++ {
			res, err := h.runClient(viaBastion, "ssh", []string{"-F", h.configs[variant.config], h.login + "@target-direct", "true"}, "", "", "")
			if err != nil {
				return err
			}
			direct = append(direct, float64(res.wall.Microseconds())/1000)
		}
		h.note("for scale (%s), `ssh … true` straight to the target sshd, with no jump host, took %s ms", variant.name, spread(direct))
	}
	return nil
}

// rowBulk: `ssh -J … 'cat > /dev/null'` and `'cat bigfile'` for each
// cipher: MB/s, and the jump's CPU seconds per GiB from the same runs.
func (h *harness) rowBulk() error {
	for _, cipher := range h.opts.ciphers {
		short := strings.SplitN(cipher, "@", 2)[0]
		for _, dir := range []string{"download", "upload"} {
			cmdline, stdin := "cat "+h.bigfile, ""
			if dir == "upload" {
				cmdline, stdin = "cat > /dev/null", h.bigfile
			}
			args := func(via string) []string { return append(h.sshArgs(via, cipher), cmdline) }
			if err := h.transfer("bulk", fmt.Sprintf("bulk %s, %s", dir, short), fmt.Sprintf("jump CPU, bulk %s, %s", dir, short),
				"ssh", args, stdin, fmt.Sprintf("bulk-%s-%s", dir, short)); err != nil {
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
		for _, via := range order(i) {
			res, err := h.runClient(via, program, args(via), stdin, os.DevNull, "")
			if err != nil {
				return err
			}
			mbps := float64(size) / 1e6 / res.wall.Seconds()
			cpuPerGiB := float64(res.cpu) / clockTick / (float64(size) / (1 << 30))
			h.record(tput, via, i, mbps, fmt.Sprintf("wall_s=%.3f", res.wall.Seconds()), res.others)
			h.record(cpu, via, i, cpuPerGiB, fmt.Sprintf("cpu_ticks=%d", res.cpu), res.others)
			h.logf("  %s run %d %s: %.0f MB/s, %.2f CPU s/GiB", name, i+1, via, mbps, cpuPerGiB)
			io = io.add(res.io)
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
			for _, via := range order(i) {
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

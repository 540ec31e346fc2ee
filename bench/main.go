// Command bench measures the bastion against OpenSSH's sshd used as a plain
// ProxyJump host, on one machine, against one target sshd on 127.0.0.1.
// See bench/README.md for what each row measures and how.
//
//	go run ./bench -out bench/results            # the full run
//	go run ./bench -quick -out /tmp/bench        # smaller sizes, fewer runs
//	go run ./bench -rows setup,mem -runs 5
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

// options are the harness's flags.
type options struct {
	out        string
	quick      bool
	rows       map[string]bool
	runs       int
	setupRuns  int
	memRuns    int
	size       int64
	ciphers    []string
	sftpCipher string
	memN       []int
	maxN       int
	conc       int
	profile    bool
	keep       bool
	soakN      int
	soakFor    time.Duration
	keystrokes int
	smallFiles int
	rateLogins int
}

var allRows = []string{"setup", "bulk", "sftp", "keystroke", "files", "rate", "cpu", "mem", "max", "vm", "soak"}

func main() {
	mode := flag.String("mode", "", "internal: reaper, client or stub (the harness re-executes itself)")
	spec := flag.String("spec", "", "internal: the spec file of -mode client or stub")
	out := flag.String("out", "bench/results", "directory for results.md, chart.svg, raw.csv and the CPU profiles")
	quick := flag.Bool("quick", false, "smaller transfers and fewer runs: 128 MiB, 2 runs, 10 connection setups, 100 keystrokes, 32 logins a burst, 100 idle sessions, a 2,000-session hunt")
	rows := flag.String("rows", strings.Join(allRows, ","), "rows to run, comma-separated: "+strings.Join(allRows, ", ")+" (cpu is measured during the bulk and sftp transfers; alone it runs the bulk transfers)")
	runs := flag.Int("runs", 0, "runs of each transfer per side (default 3; 2 with -quick)")
	setupRuns := flag.Int("setup-runs", 0, "connection setups per side (default 21; 10 with -quick)")
	memRuns := flag.Int("mem-runs", 0, "runs of each idle-session count per side (default 2; 1 with -quick)")
	sizeMiB := flag.Int64("size", 0, "transfer size in MiB (default 1024; 128 with -quick)")
	ciphers := flag.String("ciphers", "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com", "ciphers of the bulk rows")
	sftpCipher := flag.String("sftp-cipher", "aes128-gcm@openssh.com", "cipher of the sftp rows; empty means OpenSSH's default")
	memN := flag.String("mem", "", "idle-session counts (default 100,1000; 100 with -quick)")
	maxN := flag.Int("max", -1, "the most idle sessions to try to hold on the bastion (default 10000; 2000 with -quick; 0 skips)")
	conc := flag.Int("concurrency", 16, "connections opened at once by the idle-session clients")
	profile := flag.Bool("profile", true, "write a CPU profile of the bastion for each bulk and sftp row")
	soakN := flag.Int("soak-sessions", 1000, "sessions the soak holds at once")
	soakFor := flag.Duration("soak-duration", 0, "how long the soak's load lasts (default 10m; 1m with -quick)")
	keystrokes := flag.Int("keystrokes", 0, "keystrokes per run of the keystroke row (default 200; 100 with -quick)")
	smallFiles := flag.Int("small-files", 1000, "files of 4 KiB in the tree of the files row")
	rateLogins := flag.Int("rate-logins", 0, "logins per run of the rate row (default 64; 32 with -quick)")
	keep := flag.Bool("keep", false, "keep the working directory (keys, configs, logs, the big file)")
	flag.Parse()

	switch *mode {
	case "reaper":
		reaperMain(flag.Args())
		return
	case "client":
		clientMain(*spec)
		return
	case "stub":
		stubTargetMain(*spec)
		return
	case "":
	default:
		fatalf("unknown -mode %q", *mode)
	}

	o := options{out: *out, quick: *quick, ciphers: splitList(*ciphers), sftpCipher: *sftpCipher, conc: *conc, profile: *profile, keep: *keep}
	o.rows = map[string]bool{}
	for _, r := range splitList(*rows) {
		if !slices.Contains(allRows, r) {
			fatalf("unknown row %q; rows are %s", r, strings.Join(allRows, ", "))
		}
		o.rows[r] = true
	}
	pick := func(flagValue, normal, quickValue int) int {
		switch {
		case flagValue > 0:
			return flagValue
		case *quick:
			return quickValue
		}
		return normal
	}
	o.soakN = *soakN
	o.soakFor = *soakFor
	if o.soakFor <= 0 {
		o.soakFor = 10 * time.Minute
		if *quick {
			o.soakFor = time.Minute
		}
	}
	o.runs = pick(*runs, 3, 2)
	o.keystrokes = pick(*keystrokes, 200, 100)
	o.smallFiles = max(*smallFiles, 1)
	o.rateLogins = pick(*rateLogins, 64, 32)
	o.setupRuns = pick(*setupRuns, 21, 10)
	o.memRuns = pick(*memRuns, 2, 1)
	o.size = int64(pick(int(*sizeMiB), 1024, 128)) << 20
	switch {
	case *maxN >= 0:
		o.maxN = *maxN
	case *quick:
		o.maxN = 2000
	default:
		o.maxN = 10000
	}
	memList := *memN
	if memList == "" {
		memList = "100,1000"
		if *quick {
			memList = "100"
		}
	}
	for _, s := range splitList(memList) {
		var n int
		if _, err := fmt.Sscan(s, &n); err != nil || n <= 0 {
			fatalf("bad -mem %q", s)
		}
		o.memN = append(o.memN, n)
	}

	if err := os.MkdirAll(o.out, 0o755); err != nil {
		fatalf("%v", err)
	}
	logFile, err := os.Create(filepath.Join(o.out, "bench.log"))
	if err != nil {
		fatalf("%v", err)
	}
	h := &harness{opts: o, log: io.MultiWriter(os.Stderr, logFile), started: time.Now(), kex: map[string][]string{}}
	// Interrupted: stop what was started, then exit.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sigs
		h.logf("interrupted; cleaning up")
		h.cleanup()
		os.Exit(130)
	}()
	err = h.run()
	h.cleanup()
	logFile.Close()
	if err != nil {
		fatalf("bench: %v", err)
	}
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

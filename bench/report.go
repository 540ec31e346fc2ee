package main

import (
	"encoding/json"
	"fmt"
	"html"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// row is one line of the results table: a figure for each route, run by
// run, and the ratios of each bastion route to OpenSSH's jump, runs paired
// by index.
type row struct {
	group        string
	name         string
	unit         string
	higherBetter bool
	values       map[string][]float64 // by route
	ratio        map[string][]float64 // by bastion route; > 1: the bastion is better
	others       []float64            // CPUs busy outside the harness during each run
}

func (h *harness) newRow(group, name, unit string, higherBetter bool) *row {
	r := &row{group: group, name: name, unit: unit, higherBetter: higherBetter, values: map[string][]float64{}, ratio: map[string][]float64{}}
	h.rows = append(h.rows, r)
	return r
}

// pair computes the ratio of each run, for each bastion route:
// bastion/OpenSSH where higher is better, OpenSSH/bastion where lower is
// better.
func (r *row) pair() {
	clear(r.ratio)
	o := r.values[viaOpenSSH]
	for _, via := range bastionRoutes {
		b := r.values[via]
		for i := 0; i < min(len(b), len(o)); i++ {
			q := o[i] / b[i]
			if r.higherBetter {
				q = b[i] / o[i]
			}
			if !math.IsInf(q, 0) && !math.IsNaN(q) {
				r.ratio[via] = append(r.ratio[via], q)
			}
		}
	}
}

func (r *row) summary() string {
	var parts []string
	for _, via := range routes {
		if v := r.values[via]; len(v) > 0 {
			parts = append(parts, routeNames[via]+" "+spread(v))
		}
	}
	for _, via := range bastionRoutes {
		if q := r.ratio[via]; len(q) > 0 {
			parts = append(parts, "ratio "+routeNames[via]+" "+spread(q))
		}
	}
	return fmt.Sprintf("%s (%s): %s", r.name, r.unit, strings.Join(parts, ", "))
}

// stats returns the median, minimum and maximum of xs.
func stats(xs []float64) (med, lo, hi float64) {
	if len(xs) == 0 {
		return math.NaN(), math.NaN(), math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		med = s[n/2]
	} else {
		med = (s[n/2-1] + s[n/2]) / 2
	}
	return med, s[0], s[n-1]
}

// spread formats "median [min–max]".
func spread(xs []float64) string {
	if len(xs) == 0 {
		return "–"
	}
	med, lo, hi := stats(xs)
	return fmt.Sprintf("%s [%s–%s]", num(med), num(lo), num(hi))
}

// num formats x with three significant digits, without exponents.
func num(x float64) string {
	a := math.Abs(x)
	switch {
	case math.IsNaN(x):
		return "?"
	case a >= 100:
		return strconv.FormatFloat(x, 'f', 0, 64)
	case a >= 10:
		return strconv.FormatFloat(x, 'f', 1, 64)
	case a >= 1:
		return strconv.FormatFloat(x, 'f', 2, 64)
	default:
		return strconv.FormatFloat(x, 'f', 3, 64)
	}
}

func writeJSON(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, data, 0o600)
}

// report writes results.md, chart.svg and raw.csv to the output directory.
func (h *harness) report() error {
	o := h.opts
	// Rows by kind: setup, throughput, CPU, memory.
	groups := []string{"setup", "rate", "vm", "keystroke", "bulk", "sftp", "files", "cpu", "mem"}
	slices.SortStableFunc(h.rows, func(a, b *row) int {
		return slices.Index(groups, a.group) - slices.Index(groups, b.group)
	})
	var b strings.Builder
	elapsed := time.Since(h.started)
	fmt.Fprintf(&b, "# Bastion vs OpenSSH as a ProxyJump host\n\n")
	fmt.Fprintf(&b, "`go run ./bench %s` on %s, %s; %.1f minutes.\n\n",
		strings.Join(os.Args[1:], " "), hostname(), h.started.Format("2006-01-02 15:04 MST"), elapsed.Minutes())
	for _, e := range h.env {
		fmt.Fprintf(&b, "- %s\n", e)
	}
	fmt.Fprintf(&b, "- load average at the end: %s\n", loadavg())
	fmt.Fprintf(&b, "- transfers of %d MiB; %d runs per route for transfers, %d for connection setup, %d for idle sessions; each run takes the routes in turn, a different one first each time\n\n",
		o.size>>20, o.runs, o.setupRuns, o.memRuns)
	fmt.Fprintf(&b, "Routes: **bastion -J** is `ssh -J bastion login@target`, **bastion login@vm** `ssh login@target@bastion`, "+
		"**OpenSSH -J** `ssh -J nobody@jumphost login@target`, **direct** `ssh login@target` with no jump host (no jump: no jump CPU).\n\n")
	fmt.Fprintf(&b, "Every figure is a median [min–max] over runs. Each ratio is a bastion route against OpenSSH -J, computed run by run, then its median taken:\n"+
		"bastion/OpenSSH for throughput, OpenSSH/bastion for time, CPU and memory, so a ratio above 1 always means the bastion did better.\n\n")
	fmt.Fprintf(&b, "| row | unit |")
	for _, via := range routes {
		fmt.Fprintf(&b, " %s |", routeNames[via])
	}
	for _, via := range bastionRoutes {
		fmt.Fprintf(&b, " ratio, %s |", routeNames[via])
	}
	fmt.Fprintf(&b, "\n|---|---|%s\n", strings.Repeat("---|", len(routes)+len(bastionRoutes)))
	for _, r := range h.rows {
		if len(r.values) == 0 {
			continue
		}
		fmt.Fprintf(&b, "| %s | %s |", r.name, r.unit)
		for _, via := range routes {
			fmt.Fprintf(&b, " %s |", spread(r.values[via]))
		}
		for _, via := range bastionRoutes {
			fmt.Fprintf(&b, " %s |", spread(r.ratio[via]))
		}
		b.WriteString("\n")
	}
	if len(h.hops) > 0 {
		fmt.Fprintf(&b, "\n## Negotiated ciphers, hop by hop\n\n"+
			"From `ssh -v` (the hops the client negotiates) and from a target sshd logging at DEBUG1 (the bastion's own hop to the target), "+
			"one connection per cell. A default client sets no cipher; a forced one sets `-c` and `Ciphers` in its ssh_config, which ProxyJump's own ssh reads too.\n\n"+
			"| client |")
		for _, via := range routes {
			fmt.Fprintf(&b, " %s |", routeNames[via])
		}
		fmt.Fprintf(&b, "\n|---|%s\n", strings.Repeat("---|", len(routes)))
		for _, variant := range h.variants() {
			fmt.Fprintf(&b, "| %s |", variantName(variant))
			for _, via := range routes {
				var cells []string
				for _, hop := range h.hops[variant][via] {
					cells = append(cells, hop.name+": "+strings.TrimSuffix(hop.cipher, "@openssh.com"))
				}
				fmt.Fprintf(&b, " %s |", strings.Join(cells, "<br>"))
			}
			b.WriteString("\n")
		}
	}
	if m := h.maxResult; m != nil {
		status := "no limit reached"
		if m.held < m.tried {
			status = "stopped: " + m.err
		}
		fmt.Fprintf(&b, "\n**Idle sessions held by the bastion** (against a Go stub target in its own process, see README): "+
			"%d of %d tried (%s), opened in %.0f s at %d connections at a time; %.1f KiB PSS per session, %.0f MiB for the whole process; "+
			"runtime.MemStats grew by %.1f KiB of goroutine stacks and %.1f KiB of heap in use (in-use spans, not all of it resident) per session; "+
			"%d more goroutines (%.1f per session); %d file descriptors; end-to-end echo through a random sample (answered/tried, slowest answer): %s.\n",
			m.held, m.tried, status, m.opened.Seconds(), o.conc, m.pssPerSession, m.pssMiB,
			m.stackPerSession, m.heapPerSession, m.goroutines,
			float64(m.goroutines)/float64(max(1, m.held)), m.fds, m.check)
		if len(m.bastionErrors) > 0 {
			fmt.Fprintf(&b, "\nThe bastion's last warnings:\n\n")
			for _, e := range m.bastionErrors {
				fmt.Fprintf(&b, "    %s\n", e)
			}
		}
		if m.heapTop != "" {
			fmt.Fprintf(&b, "\nThe live heap with the sessions held, by allocation site (heap-hunt.pprof, sampled):\n\n```\n%s```\n", m.heapTop)
		}
		if m.goroutineSites != "" {
			fmt.Fprintf(&b, "\nWhere the bastion's goroutines wait with the sessions held (from goroutines-hunt.txt):\n\n%s", m.goroutineSites)
		}
	}
	if h.orphans.all > 0 {
		missed := 100 * float64(h.orphans.all-h.orphans.listenerOnly) / float64(h.orphans.all)
		h.notes = append(h.notes, fmt.Sprintf("of the jump sshd's CPU over all OpenSSH runs (%.1f s), %.0f%% was in processes its listener never reaped "+
			"(adopted and reaped by the harness's subreaper): the listener's cutime alone would have missed it", float64(h.orphans.all)/clockTick, missed))
	}
	fmt.Fprintf(&b, "\n## Load from other processes during the runs\n\n"+
		"CPUs busy outside the harness and its children (from /proc/stat, minus the harness's tree, plus steal), averaged over each run: "+
		"this machine is shared, and 2 CPUs is all it has.\n\n| row | other load, CPUs |\n|---|---|\n")
	for _, r := range h.rows {
		if len(r.others) > 0 {
			fmt.Fprintf(&b, "| %s | %s |\n", r.name, spread(r.others))
		}
	}
	if len(h.notes) > 0 {
		fmt.Fprintf(&b, "\n## Notes\n\n")
		for _, n := range h.notes {
			fmt.Fprintf(&b, "- %s\n", n)
		}
	}
	if len(h.ioNotes) > 0 {
		fmt.Fprintf(&b, "\n## The bastion's socket system calls\n\n"+
			"Summed over the harness's threads from /proc/self/task/*/io, over the bastion's measured runs of each row (the harness does no other I/O meanwhile). "+
			"Two sockets carry the data (client and target), so about 2 bytes read and written per payload byte are the floor.\n\n"+
			"| row | reads per MiB | writes per MiB | bytes per read | bytes per write | bytes moved per payload byte |\n|---|---|---|---|---|---|\n")
		for _, l := range h.ioNotes {
			fmt.Fprintln(&b, l)
		}
	}
	if len(h.profiles) > 0 {
		fmt.Fprintf(&b, "\n## Where the bastion's CPU goes\n\n")
		fmt.Fprintf(&b, "One extra bastion run of each transfer row under runtime/pprof (not counted above). Flat time by category, then the top functions (`go tool pprof -top`).\n")
		for _, p := range h.profiles {
			b.WriteString(profileSummary(p))
		}
	}
	if err := os.WriteFile(filepath.Join(o.out, "results.md"), []byte(b.String()), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(o.out, "chart.svg"), []byte(h.chart()), 0o644); err != nil {
		return err
	}
	var csv strings.Builder
	csv.WriteString("row,route,run,value,detail\n")
	for _, s := range h.samples {
		fmt.Fprintf(&csv, "%q,%s,%d,%g,%q\n", s.row, s.via, s.run+1, s.value, s.extra)
	}
	if err := os.WriteFile(filepath.Join(o.out, "raw.csv"), []byte(csv.String()), 0o644); err != nil {
		return err
	}
	h.logf("wrote %s/results.md, chart.svg, raw.csv in %.1f minutes", o.out, elapsed.Minutes())
	fmt.Fprintln(h.log)
	fmt.Fprint(h.log, b.String())
	return nil
}

func hostname() string {
	n, _ := os.Hostname()
	return n
}

// profileCategories group a profile's flat time. The first match wins.
var profileCategories = []struct {
	name string
	re   *regexp.Regexp
}{
	{"chacha20 (x/crypto/chacha20, generic Go: no amd64 assembly)", regexp.MustCompile(`x/crypto/chacha20\.`)},
	{"poly1305", regexp.MustCompile(`poly1305`)},
	{"AES-GCM (assembly)", regexp.MustCompile(`fips140/aes|gcm|ghash|crypto/cipher\.`)},
	// On the sftp rows SHA-256 is the file-transfer trail hashing every
	// file for the audit; a handshake's share of it is small.
	{"SHA-256 (the sftp trail's file hashes; handshakes)", regexp.MustCompile(`sha256`)},
	{"handshake crypto (ed25519, X25519, SHA-512)", regexp.MustCompile(`ed25519|edwards25519|x25519|curve25519|nistec|sha512|sha3|bigmod|ecdh|mlkem`)},
	{"system calls (read, write, …)", regexp.MustCompile(`^syscall\.|internal/runtime/syscall|runtime/internal/syscall`)},
	{"memmove, memclr", regexp.MustCompile(`^runtime\.mem(move|clr)`)},
	{"GC and allocation", regexp.MustCompile(`^runtime\.(mallocgc|scanobject|scanblock|scanstack|gcDrain|greyobject|findObject|markBits|heapBits|typePointers|wbBuf|bulkBarrier|gcBgMarkWorker|gcMark|sweep|nextFreeFast|memclrNoHeap|spanOf|\(\*mspan\)|\(\*mheap\)|\(\*mcache\)|\(\*mcentral\)|\(\*gcWork\)|\(\*gcControllerState\)|\(\*sweepLocked\)|\(\*pageAlloc\)|\(\*scavenger|gcWriteBarrier|heapSetType|newobject|makeslice|growslice|deductAssistCredit|gcAssist)`)},
	{"scheduler, futex, netpoll", regexp.MustCompile(`^runtime\.(futex|usleep|schedule|findRunnable|runqgrab|stealWork|park_m|netpoll|notesleep|notewakeup|nanotime|procyield|osyield|lock2|unlock2|mcall|gopark|goready|ready|wakep|startm|stopm|mPark|runqput|runqsteal|checkTimers|selectgo|chansend|chanrecv|casgstatus|execute|goexit|systemstack|resetspinning|exitsyscall|entersyscall|reentersyscall|\(\*timers\))`)},
	{"x/crypto/ssh (packets, channels, windows)", regexp.MustCompile(`x/crypto/ssh\.`)},
	{"sync (mutexes, conds)", regexp.MustCompile(`^sync\.|internal/sync`)},
}

// cumWatch are functions whose cumulative share is worth showing.
var cumWatch = []struct {
	name string
	re   *regexp.Regexp
}{
	{"x/crypto/ssh readCipherPacket (decrypt)", regexp.MustCompile(`\)\.readCipherPacket$`)},
	{"x/crypto/ssh writeCipherPacket (encrypt)", regexp.MustCompile(`\)\.writeCipherPacket$`)},
	{"x/crypto/ssh (*channel).adjustWindow", regexp.MustCompile(`\(\*channel\)\.adjustWindow$`)},
	{"internal/poll (*FD).Read", regexp.MustCompile(`^internal/poll\.\(\*FD\)\.Read$`)},
	{"internal/poll (*FD).Write", regexp.MustCompile(`^internal/poll\.\(\*FD\)\.Write$`)},
	{"runtime.mallocgc", regexp.MustCompile(`^runtime\.mallocgc$`)},
	{"runtime.gcBgMarkWorker", regexp.MustCompile(`^runtime\.gcBgMarkWorker$`)},
}

var topLine = regexp.MustCompile(`^\s*(\S+)\s+([\d.]+)%\s+([\d.]+)%\s+(\S+)\s+([\d.]+)%\s+(.+)$`)

// profileSummary runs `go tool pprof -top` on path and condenses it.
func profileSummary(path string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "\n### %s\n\n", filepath.Base(path))
	out, err := exec.Command("go", "tool", "pprof", "-top", "-nodefraction=0", "-edgefraction=0", path).CombinedOutput()
	if err != nil {
		fmt.Fprintf(&b, "`go tool pprof` failed: %v\n", err)
		return b.String()
	}
	type fn struct {
		name      string
		flat, cum float64
	}
	var fns []fn
	var header []string
	for _, line := range strings.Split(string(out), "\n") {
		m := topLine.FindStringSubmatch(line)
		if m == nil {
			if strings.HasPrefix(line, "Duration:") {
				header = append(header, strings.TrimSpace(line))
			}
			continue
		}
		flat, _ := strconv.ParseFloat(m[2], 64)
		cum, _ := strconv.ParseFloat(m[5], 64)
		fns = append(fns, fn{name: m[6], flat: flat, cum: cum})
	}
	if len(header) > 0 {
		fmt.Fprintf(&b, "%s (over 100%% means more than one core).\n\n", header[0])
	}
	shares := make([]float64, len(profileCategories)+1)
	for _, f := range fns {
		i := slices.IndexFunc(profileCategories, func(c struct {
			name string
			re   *regexp.Regexp
		}) bool {
			return c.re.MatchString(f.name)
		})
		if i < 0 {
			i = len(profileCategories)
		}
		shares[i] += f.flat
	}
	fmt.Fprintf(&b, "| flat time in | share |\n|---|---|\n")
	for i, c := range profileCategories {
		if shares[i] >= 0.5 {
			fmt.Fprintf(&b, "| %s | %.1f%% |\n", c.name, shares[i])
		}
	}
	fmt.Fprintf(&b, "| everything else | %.1f%% |\n\n", shares[len(profileCategories)])
	fmt.Fprintf(&b, "| cumulative in | share |\n|---|---|\n")
	for _, w := range cumWatch {
		best := 0.0
		for _, f := range fns {
			if w.re.MatchString(f.name) && f.cum > best {
				best = f.cum
			}
		}
		fmt.Fprintf(&b, "| %s | %.1f%% |\n", w.name, best)
	}
	fmt.Fprintf(&b, "\n```\n   flat%%   cum%%  function\n")
	for i, f := range fns {
		if i == 15 {
			break
		}
		fmt.Fprintf(&b, "%7.1f%% %6.1f%%  %s\n", f.flat, f.cum, f.name)
	}
	fmt.Fprintf(&b, "```\n")
	return b.String()
}

// bar is one bar of the chart: a row's ratios for one bastion route.
type bar struct {
	label string
	ratio []float64
}

// chart draws the median ratio of every row and bastion route as a bar
// from 1.0, on a logarithmic axis, with the runs' range as a whisker.
func (h *harness) chart() string {
	var rows []bar
	for _, r := range h.rows {
		for _, via := range bastionRoutes {
			if q := r.ratio[via]; len(q) > 0 {
				rows = append(rows, bar{fmt.Sprintf("%s (%s), %s", r.name, r.unit, routeNames[via]), q})
			}
		}
	}
	const (
		left, right, top, barH, gap = 560.0, 40.0, 84.0, 20.0, 8.0
		width                       = 1160.0
	)
	height := top + float64(len(rows))*(barH+gap) + 60
	lo, hi := 0.5, 2.0
	for _, r := range rows {
		_, mn, mx := stats(r.ratio)
		lo, hi = math.Min(lo, mn), math.Max(hi, mx)
	}
	// Round the axis out to the 1-2-5 ticks around the data.
	ticks := []float64{}
	for e := -4; e <= 4; e++ {
		for _, m := range []float64{1, 2, 5} {
			ticks = append(ticks, m*math.Pow10(e))
		}
	}
	axisLo, axisHi := 1.0, 1.0
	for _, t := range ticks {
		if t <= lo {
			axisLo = t
		}
	}
	for i := len(ticks) - 1; i >= 0; i-- {
		if ticks[i] >= hi {
			axisHi = ticks[i]
		}
	}
	plotW := width - left - right
	x := func(v float64) float64 {
		v = math.Min(math.Max(v, axisLo), axisHi)
		return left + plotW*(math.Log(v)-math.Log(axisLo))/(math.Log(axisHi)-math.Log(axisLo))
	}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="20" y="24" font-size="15" font-weight="bold">Bastion vs OpenSSH ProxyJump: median ratio per row and bastion route (log scale)</text>`+"\n")
	fmt.Fprintf(&b, `<text x="20" y="44" fill="#555">above 1 (right of the line): the bastion did better — faster, less CPU or less memory. Whiskers: min–max of the per-run ratios.</text>`+"\n")
	axisY := height - 40
	for _, t := range ticks {
		if t < axisLo || t > axisHi {
			continue
		}
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.0f" x2="%.1f" y2="%.0f" stroke="#e4e4e4"/>`+"\n", x(t), top-6, x(t), axisY)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.0f" text-anchor="middle" fill="#555">%s</text>`+"\n", x(t), axisY+16, strconv.FormatFloat(t, 'g', -1, 64))
	}
	for i, r := range rows {
		y := top + float64(i)*(barH+gap)
		med, mn, mx := stats(r.ratio)
		x0, x1 := x(1), x(med)
		color := "#2e7d32"
		if med < 1 {
			color = "#c62828"
			x0, x1 = x1, x0
		}
		label := r.label
		fmt.Fprintf(&b, `<text x="%.0f" y="%.1f" text-anchor="end">%s</text>`+"\n", left-10, y+barH*0.7, html.EscapeString(label))
		fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s" opacity="0.8"/>`+"\n", x0, y, math.Max(x1-x0, 1), barH, color)
		cy := y + barH/2
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", x(mn), cy, x(mx), cy)
		for _, v := range []float64{mn, mx} {
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", x(v), cy-5, x(v), cy+5)
		}
		// The value goes right of the bar (green) or right of the 1.0 line
		// (red), clear of the labels on the left.
		tx := x(math.Max(med, mx)) + 6
		if med < 1 {
			tx = x(math.Max(1, mx)) + 6
		}
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" font-weight="bold">%s×</text>`+"\n", tx, y+barH*0.7, num(med))
	}
	fmt.Fprintf(&b, `<line x1="%.1f" y1="%.0f" x2="%.1f" y2="%.0f" stroke="black" stroke-width="2"/>`+"\n", x(1), top-10, x(1), axisY)
	fmt.Fprintf(&b, `<text x="%.1f" y="%.0f" text-anchor="middle" font-weight="bold">1.0</text>`+"\n", x(1), top-14)
	b.WriteString("</svg>\n")
	return b.String()
}

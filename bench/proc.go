package main

import (
	"bufio"
	"bytes"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// clockTick is USER_HZ, the unit of the times in /proc/PID/stat. Linux
// fixes it at 100 on every architecture that matters here.
const clockTick = 100

// procStat is what the harness reads from /proc/PID/stat.
type procStat struct {
	pid    int
	comm   string
	state  byte
	ppid   int
	utime  int64 // ticks spent by the process's own threads in user mode
	stime  int64 // and in the kernel
	cutime int64 // ticks of children it has waited for (recursively: their own cutime is included)
	cstime int64
}

func (s procStat) own() int64   { return s.utime + s.stime }
func (s procStat) total() int64 { return s.utime + s.stime + s.cutime + s.cstime }

// readStat parses /proc/PID/stat ("self" for this process).
func readStat(pid string) (procStat, error) {
	data, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return procStat{}, err
	}
	// comm is in parentheses and may contain spaces or parentheses: the
	// fields that follow start after the last ')'.
	open := bytes.IndexByte(data, '(')
	closing := bytes.LastIndexByte(data, ')')
	if open < 0 || closing < open {
		return procStat{}, fmt.Errorf("/proc/%s/stat: malformed", pid)
	}
	var s procStat
	s.pid, _ = strconv.Atoi(strings.TrimSpace(string(data[:open])))
	s.comm = string(data[open+1 : closing])
	f := strings.Fields(string(data[closing+1:]))
	// f[0] is field 3 (state); field N is f[N-3].
	if len(f) < 15 {
		return procStat{}, fmt.Errorf("/proc/%s/stat: too few fields", pid)
	}
	s.state = f[0][0]
	num := func(field int) int64 {
		v, _ := strconv.ParseInt(f[field-3], 10, 64)
		return v
	}
	s.ppid = int(num(4))
	s.utime, s.stime, s.cutime, s.cstime = num(14), num(15), num(16), num(17)
	return s, nil
}

// selfCPU returns this process's own user+system ticks: every thread,
// living or gone, and none of its children.
func selfCPU() int64 {
	s, err := readStat("self")
	if err != nil {
		panic(err)
	}
	return s.own()
}

// allStats reads every process's stat, keyed by pid.
func allStats() map[int]procStat {
	entries, _ := os.ReadDir("/proc")
	out := make(map[int]procStat, len(entries))
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		if s, err := readStat(e.Name()); err == nil {
			out[s.pid] = s
		}
	}
	return out
}

// descendants returns root and every process below it, from one snapshot.
func descendants(root int, all map[int]procStat) []procStat {
	children := make(map[int][]int)
	for pid, s := range all {
		children[s.ppid] = append(children[s.ppid], pid)
	}
	var out []procStat
	queue := []int{root}
	for len(queue) > 0 {
		pid := queue[0]
		queue = queue[1:]
		if s, ok := all[pid]; ok {
			out = append(out, s)
		}
		queue = append(queue, children[pid]...)
	}
	return out
}

// memInfo is one process's memory from /proc/PID/smaps_rollup.
type memInfo struct {
	rssKB, pssKB, pssAnonKB int64
}

func readMem(pid string) (memInfo, error) {
	f, err := os.Open("/proc/" + pid + "/smaps_rollup")
	if err != nil {
		return memInfo{}, err
	}
	defer f.Close()
	var m memInfo
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(fields[1], 10, 64)
		switch fields[0] {
		case "Rss:":
			m.rssKB = v
		case "Pss:":
			m.pssKB = v
		case "Pss_Anon:":
			m.pssAnonKB = v
		}
	}
	return m, sc.Err()
}

// treeMem sums the memory of root and its descendants, and counts them.
func treeMem(root int) (memInfo, int) {
	var sum memInfo
	n := 0
	for _, s := range descendants(root, allStats()) {
		m, err := readMem(strconv.Itoa(s.pid))
		if err != nil {
			continue // exited meanwhile, or a zombie
		}
		sum.rssKB += m.rssKB
		sum.pssKB += m.pssKB
		sum.pssAnonKB += m.pssAnonKB
		n++
	}
	return sum, n
}

// raiseNofile raises this process's open-file limit (soft and hard) to n,
// or as far as the hard limit allows when it cannot raise that (no
// CAP_SYS_RESOURCE); children started afterwards inherit it. It returns
// the soft limit in force.
func raiseNofile(n uint64) (uint64, error) {
	lim := syscall.Rlimit{Cur: n, Max: n}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil {
		return n, nil
	}
	var cur syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &cur); err != nil {
		return 0, err
	}
	cur.Cur = min(n, cur.Max)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &cur); err != nil {
		return 0, fmt.Errorf("raise RLIMIT_NOFILE to %d: %w", cur.Cur, err)
	}
	return cur.Cur, nil
}

// prSetChildSubreaper is PR_SET_CHILD_SUBREAPER from <linux/prctl.h>.
const prSetChildSubreaper = 36

func setSubreaper() error {
	_, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// loadavg returns the first three fields of /proc/loadavg.
func loadavg() string {
	data, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// cpuModel returns the CPU's model name and the number of online CPUs.
func cpuModel() string {
	data, _ := os.ReadFile("/proc/cpuinfo")
	model := "?"
	n := 0
	for _, line := range strings.Split(string(data), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "model name":
			model = strings.TrimSpace(v)
		case "processor":
			n++
		}
	}
	return fmt.Sprintf("%s × %d", model, n)
}

// cpuFlags reports which of the crypto-relevant CPU flags are present.
func cpuFlags() string {
	data, _ := os.ReadFile("/proc/cpuinfo")
	for _, line := range strings.Split(string(data), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "flags" {
			have := map[string]bool{}
			for _, f := range strings.Fields(v) {
				have[f] = true
			}
			var out []string
			for _, f := range []string{"aes", "pclmulqdq", "avx2", "avx512f", "sha_ni"} {
				if have[f] {
					out = append(out, f)
				}
			}
			return strings.Join(out, " ")
		}
	}
	return ""
}

// otherBusy lists processes outside exclude's trees that used more than
// 5% of a CPU between two snapshots taken interval apart: what competes
// with the benchmark on this machine.
func otherBusy(interval time.Duration, exclude ...int) []string {
	before := allStats()
	time.Sleep(interval)
	after := allStats()
	skip := map[int]bool{}
	for _, root := range exclude {
		for _, s := range descendants(root, after) {
			skip[s.pid] = true
		}
	}
	var out []string
	for pid, a := range after {
		b, ok := before[pid]
		if !ok || skip[pid] {
			continue
		}
		share := float64(a.own()-b.own()) / clockTick / interval.Seconds()
		if share > 0.05 {
			name := a.comm
			if cmd, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline")); err == nil && len(cmd) > 0 {
				name = filepath.Base(string(bytes.SplitN(cmd, []byte{0}, 2)[0]))
			}
			out = append(out, fmt.Sprintf("%s (pid %d) %.0f%%", name, pid, share*100))
		}
	}
	return out
}

// loadProbe is a snapshot for telling the machine's CPU use by others
// from ours.
type loadProbe struct {
	at    time.Time
	busy  int64 // user+nice+system ticks of all CPUs, from /proc/stat
	steal int64
	ours  int64 // ticks of this process and everything below it, reaped or not
}

func probeLoad() loadProbe {
	p := loadProbe{at: time.Now()}
	if data, err := os.ReadFile("/proc/stat"); err == nil {
		line, _, _ := strings.Cut(string(data), "\n")
		f := strings.Fields(line) // cpu user nice system idle iowait irq softirq steal ...
		val := func(i int) int64 {
			if i >= len(f) {
				return 0
			}
			v, _ := strconv.ParseInt(f[i], 10, 64)
			return v
		}
		p.busy = val(1) + val(2) + val(3)
		p.steal = val(8)
	}
	for _, s := range descendants(os.Getpid(), allStats()) {
		p.ours += s.total()
	}
	return p
}

// othersSince returns how many CPUs, on average since q, were busy with
// processes other than this harness and its descendants (and stolen by
// the hypervisor).
func (p loadProbe) othersSince(q loadProbe) float64 {
	secs := p.at.Sub(q.at).Seconds()
	if secs <= 0 {
		return 0
	}
	others := (p.busy - q.busy) - (p.ours - q.ours) + (p.steal - q.steal)
	return math.Max(0, float64(others)/clockTick/secs)
}

// ioCounts are I/O system call counters from /proc/.../io.
type ioCounts struct {
	syscr, syscw, rchar, wchar int64
}

func readIO(pid string) ioCounts {
	var c ioCounts
	data, err := os.ReadFile("/proc/" + pid + "/io")
	if err != nil {
		return c
	}
	for _, line := range strings.Split(string(data), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		switch k {
		case "syscr":
			c.syscr = n
		case "syscw":
			c.syscw = n
		case "rchar":
			c.rchar = n
		case "wchar":
			c.wchar = n
		}
	}
	return c
}

// selfThreadsIO sums the counters of this process's live threads. Not
// /proc/self/io: that adds the I/O of every child waited for (the ssh
// clients the harness runs). Go's threads live as long as the process,
// so none of the bastion's I/O is lost with an exited thread.
func selfThreadsIO() ioCounts {
	var sum ioCounts
	tasks, _ := os.ReadDir("/proc/self/task")
	for _, t := range tasks {
		sum = sum.add(readIO("self/task/" + t.Name()))
	}
	return sum
}

func (c ioCounts) minus(d ioCounts) ioCounts {
	return ioCounts{c.syscr - d.syscr, c.syscw - d.syscw, c.rchar - d.rchar, c.wchar - d.wchar}
}

func (c ioCounts) add(d ioCounts) ioCounts {
	return ioCounts{c.syscr + d.syscr, c.syscw + d.syscw, c.rchar + d.rchar, c.wchar + d.wchar}
}

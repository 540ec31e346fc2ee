package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// rowRate: logins per second, `ssh … true` by every route, -rate-logins of
// them with -concurrency at a time, and the jump's CPU per login over the
// whole burst. The bastion admits the connections of one source address
// as it does in production: at most per_source_max_startups (10) of them
// unauthenticated at once, the others waiting their turn, and at most 8
// handshakes at once with one VM's sshd. The OpenSSH jump and the target
// have MaxStartups 2000 (see sshdConfig).
func (h *harness) rowRate() error {
	n, conc := h.opts.rateLogins, h.opts.conc
	rate := h.newRow("rate", fmt.Sprintf("connection rate: %d × ssh … true, %d at a time", n, conc), "logins/s", true)
	cpu := h.newRow("cpu", fmt.Sprintf("jump CPU, connection rate, %d at a time", conc), "CPU ms/login", false)
	for i := 0; i < h.opts.runs; i++ {
		for _, via := range order(i, routes) {
			wall, ticks, others, err := h.burst(via, n, conc)
			if err != nil {
				return err
			}
			perSec := float64(n) / wall.Seconds()
			h.record(rate, via, i, perSec, fmt.Sprintf("wall_s=%.3f", wall.Seconds()), others)
			if via == viaDirect {
				h.logf("  connection rate run %d %s: %.1f logins/s", i+1, via, perSec)
				continue
			}
			msPerLogin := float64(ticks) / clockTick * 1000 / float64(n)
			h.record(cpu, via, i, msPerLogin, fmt.Sprintf("cpu_ticks=%d", ticks), others)
			h.logf("  connection rate run %d %s: %.1f logins/s, %.1f CPU ms/login", i+1, via, perSec, msPerLogin)
		}
	}
	rate.pair()
	cpu.pair()
	h.logf("%s", rate.summary())
	h.logf("%s", cpu.summary())
	return nil
}

// burst runs n `ssh … true` by via, conc at a time, and measures the wall
// time and the jump's CPU ticks over all of them.
func (h *harness) burst(via string, n, conc int) (time.Duration, int64, float64, error) {
	args := append(h.sshArgs(via, ""), "true")
	if via == viaOpenSSH {
		if err := h.jump.waitQuiet(30 * time.Second); err != nil {
			return 0, 0, 0, err
		}
	}
	var before int64
	switch {
	case onBastion(via):
		before = selfCPU()
	case via == viaOpenSSH:
		before, _, _ = h.jump.cpuTicks()
	}
	load := probeLoad()
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	next := make(chan struct{})
	for w := range conc {
		// Standard error to a file, not a pipe: Wait would wait for
		// ProxyJump's ssh -W, which outlives the client and holds a pipe.
		errFile, err := os.Create(filepath.Join(h.dir, fmt.Sprintf("burst-%d.stderr", w)))
		if err != nil {
			return 0, 0, 0, err
		}
		defer errFile.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				cmd := exec.CommandContext(ctx, "ssh", args...)
				errFile.Truncate(0)
				errFile.Seek(0, 0)
				cmd.Stderr = errFile
				err := cmd.Start()
				if err == nil {
					ownChild(cmd.Process.Pid)
					err = cmd.Wait()
				}
				if err != nil {
					msg, _ := os.ReadFile(errFile.Name())
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("ssh %s: %v\n%s", strings.Join(args, " "), err, msg)
					}
					mu.Unlock()
				}
			}
		}()
	}
	for range n {
		next <- struct{}{}
	}
	close(next)
	wg.Wait()
	wall := time.Since(start)
	others := probeLoad().othersSince(load)
	var after int64
	switch {
	case onBastion(via):
		after = selfCPU()
	case via == viaOpenSSH:
		if err := h.jump.waitQuiet(30 * time.Second); err != nil {
			return 0, 0, 0, err
		}
		after, _, _ = h.jump.cpuTicks()
	}
	h.reapOrphans()
	return wall, after - before, others, firstErr
}

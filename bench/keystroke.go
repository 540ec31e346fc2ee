package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"os/exec"
	"slices"
	"strings"
	"time"
)

// keystrokeGap is the pause between keystrokes: a fast typist's pace,
// slow enough that each one travels alone.
const keystrokeGap = 20 * time.Millisecond

// rowKeystroke: one byte at a time through a pty on the target and back,
// by every route, as a person typing into a remote shell sees it. The
// client is `ssh -tt` (a pty on the target whatever ssh's own input is);
// the target's command puts the pty in raw mode, says READY, and echoes
// exactly as many bytes as will be sent with dd, which writes each byte
// as it reads it. Each run gives a median and a 99th percentile.
func (h *harness) rowKeystroke() error {
	n := h.opts.keystrokes
	med := h.newRow("keystroke", fmt.Sprintf("keystroke round trip through a pty, median of %d", n), "ms", false)
	p99 := h.newRow("keystroke", fmt.Sprintf("keystroke round trip through a pty, p99 of %d", n), "ms", false)
	remote := fmt.Sprintf("stty raw -echo; echo READY; exec dd bs=1 count=%d 2>/dev/null", n)
	for i := 0; i < h.opts.runs; i++ {
		for _, via := range order(i, routes) {
			load := probeLoad()
			times, err := h.keystrokes(append(append([]string{"-tt"}, h.sshArgs(via, "")...), remote), n)
			if err != nil {
				return fmt.Errorf("keystrokes by %s: %w", via, err)
			}
			others := probeLoad().othersSince(load)
			m, p := percentile(times, 50), percentile(times, 99)
			h.record(med, via, i, m, fmt.Sprintf("max_ms=%.3f", slices.Max(times)), others)
			h.record(p99, via, i, p, "", others)
			h.logf("  keystrokes run %d %s: median %.3f ms, p99 %.3f ms", i+1, via, m, p)
		}
	}
	med.pair()
	p99.pair()
	h.logf("%s", med.summary())
	h.logf("%s", p99.summary())
	return nil
}

// keystrokes runs ssh with args, waits for READY, then sends n bytes one
// at a time, each after the echo of the one before and a pause, and
// returns each round trip in milliseconds.
func (h *harness) keystrokes(args []string, n int) ([]float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ssh", args...)
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	outPipe, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	ownChild(cmd.Process.Pid)
	defer h.reapOrphans()
	fail := func(err error) ([]float64, error) {
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("%v (stderr: %q)", err, stderr.String())
	}
	out := bufio.NewReader(outPipe)
	for {
		line, err := out.ReadString('\n')
		if err != nil {
			return fail(fmt.Errorf("no READY: %w", err))
		}
		if strings.Contains(line, "READY") {
			break
		}
	}
	times := make([]float64, 0, n)
	key := []byte{0}
	echo := make([]byte, 1)
	for i := range n {
		key[0] = 'a' + byte(i%26)
		start := time.Now()
		if _, err := in.Write(key); err != nil {
			return fail(err)
		}
		if _, err := io.ReadFull(out, echo); err != nil {
			return fail(fmt.Errorf("keystroke %d: %w", i+1, err))
		}
		times = append(times, float64(time.Since(start).Nanoseconds())/1e6)
		if echo[0] != key[0] {
			return fail(fmt.Errorf("keystroke %d: sent %q, %q came back", i+1, key, echo))
		}
		time.Sleep(keystrokeGap)
	}
	in.Close()
	if err := cmd.Wait(); err != nil {
		return nil, fmt.Errorf("%v (stderr: %q)", err, stderr.String())
	}
	return times, nil
}

// percentile is the p-th percentile of xs (nearest rank).
func percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Sorted(slices.Values(xs))
	k := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[min(max(k, 0), len(s)-1)]
}

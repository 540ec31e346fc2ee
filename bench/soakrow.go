package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/bastionvm/bastion/bench/soak"
)

// rowSoak holds opts.soakN sessions through an in-process bastion for
// opts.soakFor (see package soak), writes soak.md and notes the figures.
// A lost session or a leak fails the run.
func (h *harness) rowSoak() error {
	o := h.opts
	h.logf("soak: %d sessions for %v", o.soakN, o.soakFor)
	dir, err := os.MkdirTemp("", "bastion-soak")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	rep, err := soak.Run(soak.Config{Sessions: o.soakN, Duration: o.soakFor, StateDir: dir, Log: h.log})
	if err != nil {
		return fmt.Errorf("soak: %w", err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# Soak\n\n%d sessions at once (exec, sftp, -L forward, idle shell in turn) through one in-process bastion for %v, then idle.\n\n",
		rep.Sessions, rep.Duration)
	fmt.Fprintf(&b, "Sessions lost: %d. Operations: %v.\n\n", rep.Lost, rep.Ops)
	fmt.Fprintf(&b, "| | before | peak | after |\n|---|---|---|---|\n")
	fmt.Fprintf(&b, "| file descriptors | %d | %d | %d |\n", rep.Before.FDs, rep.Peak.FDs, rep.After.FDs)
	fmt.Fprintf(&b, "| goroutines | %d | %d | %d |\n", rep.Before.Goroutines, rep.Peak.Goroutines, rep.After.Goroutines)
	fmt.Fprintf(&b, "| heap in use (MiB) | %.1f | %.1f | %.1f |\n", mib(rep.Before.HeapBytes), mib(rep.Peak.HeapBytes), mib(rep.After.HeapBytes))
	for _, e := range rep.Errors {
		fmt.Fprintf(&b, "\n- %s", e)
	}
	if err := os.WriteFile(filepath.Join(o.out, "soak.md"), []byte(b.String()+"\n"), 0o644); err != nil {
		return err
	}
	h.note("soak: %d sessions for %v, %d lost; fds %d/%d/%d, goroutines %d/%d/%d, heap %.1f/%.1f/%.1f MiB (before/peak/after)",
		rep.Sessions, rep.Duration, rep.Lost, rep.Before.FDs, rep.Peak.FDs, rep.After.FDs,
		rep.Before.Goroutines, rep.Peak.Goroutines, rep.After.Goroutines,
		mib(rep.Before.HeapBytes), mib(rep.Peak.HeapBytes), mib(rep.After.HeapBytes))
	if rep.Lost > 0 {
		return fmt.Errorf("soak: %d of %d sessions lost: %v", rep.Lost, rep.Sessions, rep.Errors)
	}
	if leaks := rep.Leaks(); len(leaks) > 0 {
		return fmt.Errorf("soak: %s", strings.Join(leaks, "; "))
	}
	return nil
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

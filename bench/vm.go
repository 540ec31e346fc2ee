package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/bastionvm/bastion/vmtest"
)

// rowVM measures against a real libvirt guest by running the real-guest
// suite's TestTrustTimings (vmtest/timing_test.go), which boots the test
// bed's guests, times the dual-band check cold and for a second login,
// `ssh -J … true` with trust cold and warm, and the warm setup through an
// OpenSSH jump host to the same guest, alternating with the bastion.
func (h *harness) rowVM() error {
	out, err := filepath.Abs(filepath.Join(h.opts.out, "vm-timings.json"))
	if err != nil {
		return err
	}
	os.Remove(out)
	goTool := os.Getenv("GO")
	if goTool == "" {
		goTool = "go"
	}
	args := []string{"test", "-count=1", "-v", "-timeout", "30m", "-run", "^TestTrustTimings$", "./vmtest"}
	if h.opts.quick {
		args = append(args, "-short")
	}
	h.logf("real guest: %s %s (boots the test bed's guests unless they are up)", goTool, strings.Join(args, " "))
	cmd := exec.Command(goTool, args...)
	cmd.Env = append(os.Environ(), "BASTION_VMTEST=1", "BASTION_BENCH_VM_OUT="+out)
	log, err := os.Create(filepath.Join(h.opts.out, "vm-timings.log"))
	if err != nil {
		return err
	}
	defer log.Close()
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("real-guest timings failed (see %s): %v", log.Name(), err)
	}
	data, err := os.ReadFile(out)
	if err != nil {
		return fmt.Errorf("real-guest timings wrote no results: %v", err)
	}
	var v vmtest.TrustTimings
	if err := json.Unmarshal(data, &v); err != nil {
		return fmt.Errorf("%s: %v", out, err)
	}
	ms := func(xs []float64) []float64 {
		out := make([]float64, len(xs))
		for i, x := range xs {
			out[i] = x * 1000
		}
		return out
	}
	add := func(name string, bastion, openssh []float64) {
		r := h.newRow("vm", name, "ms", false)
		r.values[viaBastion], r.values[viaOpenSSH] = ms(bastion), ms(openssh)
		r.pair()
		h.logf("%s", r.summary())
	}
	add(fmt.Sprintf("real guest (%s): dual-band check, cold", v.Guest), v.ColdCheck, nil)
	add(fmt.Sprintf("real guest (%s): dual-band check, second login", v.Guest), v.SecondLoginCheck, nil)
	add(fmt.Sprintf("real guest (%s): ssh -J … true, trust cold", v.Guest), v.ColdSetup, nil)
	add(fmt.Sprintf("real guest (%s): ssh -J … true, trust warm, new connection to the guest", v.Guest), v.WarmSetup, v.OpenSSHSetup)
	add(fmt.Sprintf("real guest (%s): ssh -J … true, trust warm, connection kept (default)", v.Guest), v.LingerSetup, v.OpenSSHSetup)
	return nil
}

package vmtest

import (
	"slices"
	"testing"
	"time"
)

// TestTrustTimings measures, through the bastion binary, `ssh -J … true`
// with no trust yet (a cold dual-band check included) and with trust warm.
// It reports medians; it asserts only that both work.
func TestTrustTimings(t *testing.T) {
	const runs = 5
	var cold, warm []time.Duration
	for i := 0; i < runs; i++ {
		b := startBastion(t, "")
		for _, into := range []*[]time.Duration{&cold, &warm} {
			start := time.Now()
			if res := b.ssh(nil, "root@"+web1, "true"); res.Exit != 0 {
				t.Fatalf("ssh: %v", res)
			}
			*into = append(*into, time.Since(start))
		}
	}
	median := func(d []time.Duration) time.Duration {
		slices.Sort(d)
		return d[len(d)/2].Round(time.Millisecond)
	}
	t.Logf("ssh -J bastion root@%s true: cold trust median %v (min %v, max %v); warm median %v (min %v, max %v)",
		web1, median(cold), cold[0].Round(time.Millisecond), cold[len(cold)-1].Round(time.Millisecond),
		median(warm), warm[0].Round(time.Millisecond), warm[len(warm)-1].Round(time.Millisecond))
}

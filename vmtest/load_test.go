package vmtest

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/bastionvm/bastion/internal/testenv"
)

// TestFiftyParallelJumps: fifty `ssh -J` at once from one machine to one
// real guest, whose sshd drops unauthenticated connections past its
// MaxStartups (10:30:100), all go through with the bastion's defaults: the
// front door lets them in in turn, and the upstream handshakes wait their
// turn and are retried when sshd drops one before authentication.
//
// One setting is not the default: the guest is emulated (TCG, one vCPU)
// and serves one login in 2-4 s of its CPU, so the last of fifty waits
// past connect_timeout's two minutes; a KVM guest serves them all in
// seconds. What is tested is that no one is turned away, not the guest's
// speed.
func TestFiftyParallelJumps(t *testing.T) {
	b := newBastionProc(t, "", defaultRule)
	b.server(`connect_timeout = "10m"`)
	b.launch()
	if res := b.ssh(nil, "root@"+web1, "true"); res.Exit != 0 { // the trust, warm
		t.Fatalf("first login: %v", res)
	}
	const n = 50
	var wg sync.WaitGroup
	results := make([]testenv.Result, n)
	began := time.Now()
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = b.ssh(nil, "root@"+web1, fmt.Sprintf("echo %d", i))
		}()
	}
	wg.Wait()
	failed := 0
	for i, res := range results {
		if res.Exit != 0 || string(res.Stdout) != fmt.Sprintf("%d\n", i) {
			failed++
			t.Logf("failed: %v %q", res, res.Stdout)
		}
	}
	if failed > 0 {
		t.Fatalf("%d of %d parallel ssh -J failed", failed, n)
	}
	t.Logf("%d parallel ssh -J to %s: all succeeded in %v", n, web1, time.Since(began).Round(time.Millisecond))
}

package vmtest

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/hypervisor"
	"github.com/bastionvm/bastion/internal/testenv"
)

var tookPattern = regexp.MustCompile(`took ([0-9.]+m?s)`)

// TestTrustTimings measures, through the bastion binary against a real
// guest: the dual-band check cold (a fresh bastion) and for a second login,
// `ssh -J … true` cold, warm, and warm with the connection to the guest
// kept from the login before (the default), and the same setup through an OpenSSH
// jump host for comparison. It asserts that every run works and that each
// check's duration is in the audit stream; the figures are reported.
func TestTrustTimings(t *testing.T) {
	runs, setups := 5, 21
	if testing.Short() {
		runs, setups = 2, 5
	}
	res := TrustTimings{Guest: web1}
	checkTook := func(b *bastionProc, n int) float64 {
		t.Helper()
		events := b.auditEvents("trust_verified")
		if len(events) < n {
			t.Fatalf("want %d trust_verified events, got %v", n, events)
		}
		detail, _ := events[n-1]["detail"].(string)
		m := tookPattern.FindStringSubmatch(detail)
		if m == nil {
			t.Fatalf("trust_verified without its duration: %q", detail)
		}
		d, err := time.ParseDuration(m[1])
		if err != nil {
			t.Fatal(err)
		}
		return d.Seconds()
	}
	var warm *bastionProc
	for i := 0; i < runs; i++ {
		// Every login a new connection to the guest's sshd.
		b := newBastionProc(t, "", defaultRule)
		b.server(`upstream_linger = "0s"`)
		b.launch()
		start := time.Now()
		if r := b.ssh(nil, "root@"+web1, "true"); r.Exit != 0 {
			t.Fatalf("ssh: %v", r)
		}
		res.ColdSetup = append(res.ColdSetup, time.Since(start).Seconds())
		res.ColdCheck = append(res.ColdCheck, checkTook(b, 1))
		// A second login: host keys are pinned already, the check runs again.
		if r := b.ssh(nil, "user@"+web1, "true"); r.Exit != 0 {
			t.Fatalf("ssh as user: %v", r)
		}
		res.SecondLoginCheck = append(res.SecondLoginCheck, checkTook(b, 2))
		warm = b
	}
	// A bastion as configured by default, whose connection to the guest
	// outlives a login for the next (server.upstream_linger).
	// A name of its own, so that the two bastions' keys in the guest are
	// not taken for each other's stale ones; a rule that lets its links
	// share a connection (no remote forwarding).
	lingering := newBastionProc(t, "", sharingRule)
	lingering.server(`replica = "timing-kept"`)
	lingering.launch()
	if r := lingering.ssh(nil, "root@"+web1, "true"); r.Exit != 0 {
		t.Fatalf("ssh: %v", r)
	}
	// Warm setups by the three routes, each run starting with the next.
	timed := func(b *bastionProc) func() float64 {
		return func() float64 {
			start := time.Now()
			if r := b.ssh(nil, "root@"+web1, "true"); r.Exit != 0 {
				t.Fatalf("ssh: %v", r)
			}
			return time.Since(start).Seconds()
		}
	}
	viaOpenSSH := openSSHRoute(t, warm.client)
	viaOpenSSH() // its first connection learns nothing, but pays for the jump sshd's first fork
	routes := []struct {
		run func() float64
		out *[]float64
	}{{timed(warm), &res.WarmSetup}, {timed(lingering), &res.LingerSetup}, {viaOpenSSH, &res.OpenSSHSetup}}
	for i := 0; i < setups; i++ {
		for k := range routes {
			r := routes[(i+k)%len(routes)]
			*r.out = append(*r.out, r.run())
		}
	}
	if len(lingering.auditEvents("trust_verified")) != 1 {
		t.Fatalf("the default bastion verified %d times, want once", len(lingering.auditEvents("trust_verified")))
	}
	reused := 0
	for _, e := range lingering.auditEvents("connected") {
		if e["reused"] == true {
			reused++
		}
	}
	if reused != setups {
		t.Fatalf("the default bastion's logins after the first: %d of %d reused its connection to the guest", reused, setups)
	}

	med := func(v []float64) string {
		s := slices.Clone(v)
		slices.Sort(s)
		return fmt.Sprintf("median %.2f s (min %.2f, max %.2f, %d runs)", s[len(s)/2], s[0], s[len(s)-1], len(s))
	}
	t.Logf("dual-band check, cold: %s; second login: %s", med(res.ColdCheck), med(res.SecondLoginCheck))
	t.Logf("ssh -J bastion root@%s true: cold %s; warm %s; warm with the connection kept %s", web1, med(res.ColdSetup), med(res.WarmSetup), med(res.LingerSetup))
	t.Logf("ssh -J through an OpenSSH jump host: %s", med(res.OpenSSHSetup))
	if out := os.Getenv("BASTION_BENCH_VM_OUT"); out != "" {
		data, _ := json.MarshalIndent(res, "", "  ")
		if err := os.WriteFile(out, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// openSSHRoute returns a function timing `ssh -J jump root@guest true`
// through an OpenSSH sshd on 127.0.0.1 used as a jump host, with the
// client's key authorized on the guest for the test (through the agent).
func openSSHRoute(t *testing.T, client *testenv.Client) func() float64 {
	t.Helper()
	jump := testenv.StartSSHD(t, client.PublicKey)
	pool, err := hypervisor.Open([]string{"qemu:///system"}, hypervisor.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pool.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	d, err := pool.Find(ctx, web1)
	if err != nil {
		t.Fatal(err)
	}
	line := strings.TrimSpace(string(gossh.MarshalAuthorizedKey(client.PublicKey))) + " bastion-timing-test"
	if err := pool.AddAuthorizedKey(ctx, d, "root", line); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		pool.RemoveAuthorizedKey(ctx, d, "root", line)
	})
	dir := t.TempDir()
	host, port, _ := strings.Cut(jump.Addr, ":")
	knownJump := filepath.Join(dir, "known_jump")
	write(t, knownJump, fmt.Sprintf("[%s]:%s %s", host, port, gossh.MarshalAuthorizedKey(jump.HostKey)))
	config := filepath.Join(dir, "ssh_config")
	write(t, config, fmt.Sprintf(`Host jump
  HostName %s
  Port %s
  User %s
  UserKnownHostsFile %s
  StrictHostKeyChecking yes
Host guest
  HostName %s
  User root
  ProxyJump jump
  UserKnownHostsFile /dev/null
  StrictHostKeyChecking no
  LogLevel ERROR
Host *
  IdentityFile %s
  IdentitiesOnly yes
  IdentityAgent none
  GlobalKnownHostsFile /dev/null
  BatchMode yes
  ControlMaster no
  ControlPath none
`, host, port, jump.Login, knownJump, guests[web1].IP, client.Key))
	return func() float64 {
		start := time.Now()
		cmdCtx, cancel := context.WithTimeout(context.Background(), time.Minute)
		out, err := exec.CommandContext(cmdCtx, "ssh", "-F", config, "guest", "true").CombinedOutput()
		cancel()
		if err != nil {
			t.Fatalf("ssh through the OpenSSH jump host: %v\n%s", err, out)
		}
		return time.Since(start).Seconds()
	}
}

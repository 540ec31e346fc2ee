package vmtest

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bastionvm/bastion/internal/testenv"
)

// replicaRule lets "me" be root on the guests only from 127.0.0.2: the
// client's address, which the replicas see only through the PROXY header
// (HAProxy itself connects from 127.0.0.1).
const replicaRule = `
[[rule]]
name = "from-127.0.0.2"
groups = ["dev"]
vms = ["bt-*"]
logins = ["root"]
channels = ["shell", "exec"]
sources = ["127.0.0.2/32"]
`

// replica is another bastion on b's configuration, host keys and client,
// with a state directory and audit file of its own: what an operator
// runs on a second machine.
func (b *bastionProc) replica() *bastionProc {
	t := b.t
	t.Helper()
	r := &bastionProc{t: t, dir: t.TempDir(), stderr: &testenv.LockedBuffer{}, client: b.client}
	r.config = filepath.Join(r.dir, "bastion.toml")
	r.audit = filepath.Join(r.dir, "audit.jsonl")
	state := filepath.Join(r.dir, "state")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"host_key", "host_ca"} {
		data, err := os.ReadFile(filepath.Join(b.dir, "state", f))
		if err != nil {
			t.Fatalf("the first replica's %s: %v", f, err)
		}
		if err := os.WriteFile(filepath.Join(state, f), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cfg, err := os.ReadFile(b.config)
	if err != nil {
		t.Fatal(err)
	}
	text := strings.Replace(string(cfg), fmt.Sprintf("state_dir = %q", filepath.Join(b.dir, "state")), fmt.Sprintf("state_dir = %q", state), 1)
	text = strings.Replace(text, fmt.Sprintf("audit = %q", b.audit), fmt.Sprintf("audit = %q", r.audit), 1)
	r.base = text
	write(t, r.config, text)
	return r
}

// TestReplicasBehindHAProxy: two replicas behind Debian's HAProxy (TCP
// mode, send-proxy-v2, health checks on /readyz). A rule on the client's
// source works through the balancer; both replicas reach the same guest at
// once; a killed replica's share goes to the other; SIGTERM drains one
// without cutting its open session while new connections go to the other.
func TestReplicasBehindHAProxy(t *testing.T) {
	haproxy := testenv.Need(t, "haproxy")
	b1 := newBastionProc(t, "", replicaRule)
	b2 := b1.replica()
	replicas := []*bastionProc{b1, b2}
	ops := []string{testenv.FreeAddr(t), testenv.FreeAddr(t)}
	listen := []string{testenv.FreeAddr(t), testenv.FreeAddr(t)}
	for i, r := range replicas {
		// Fixed ports, so that a replica started again is where HAProxy
		// looks for it.
		r.base = strings.Replace(r.base, `listen = "127.0.0.1:0"`, fmt.Sprintf("listen = %q", listen[i]), 1)
		cfg, _ := os.ReadFile(r.config)
		write(t, r.config, strings.Replace(string(cfg), `listen = "127.0.0.1:0"`, fmt.Sprintf("listen = %q", listen[i]), 1))
		r.server(fmt.Sprintf("ops_listen = %q\nproxy_protocol = [\"127.0.0.1/32\"]\nreplica = \"r%d\"", ops[i], i+1))
	}

	front := testenv.FreeAddr(t)
	dir := t.TempDir()
	write(t, filepath.Join(dir, "haproxy.cfg"), fmt.Sprintf(`global
    maxconn 200
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    retries 3
    option redispatch
frontend ssh
    bind %s
    default_backend bastions
backend bastions
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    server r1 %s send-proxy-v2 check port %s inter 300ms fall 1 rise 2
    server r2 %s send-proxy-v2 check port %s inter 300ms fall 1 rise 2
`, front, listen[0], port(ops[0]), listen[1], port(ops[1])))
	hp := exec.Command(haproxy, "-db", "-f", filepath.Join(dir, "haproxy.cfg"))
	hpLog := &testenv.LockedBuffer{}
	hp.Stdout, hp.Stderr = hpLog, hpLog
	if err := hp.Start(); err != nil {
		t.Fatalf("haproxy: %v", err)
	}
	t.Cleanup(func() {
		hp.Process.Kill()
		hp.Wait()
		if t.Failed() {
			t.Logf("haproxy:\n%s", hpLog.String())
		}
	})
	testenv.WaitListening(t, front)

	// The client reaches "bastion" through HAProxy (launch points it at the
	// replica it started), from 127.0.0.2, or, to be refused, 127.0.0.3.
	source := "127.0.0.2"
	viaFront := func() {
		cfg, _ := os.ReadFile(b1.client.Config)
		host, p, _ := strings.Cut(front, ":")
		text := regexp.MustCompile(`(?m)^(\s*)HostName \S+$`).ReplaceAllString(string(cfg), "${1}HostName "+host)
		text = regexp.MustCompile(`(?m)^(\s*)Port \d+$`).ReplaceAllString(text, "${1}Port "+p)
		// The jump's own ssh reads this block, not the command line.
		text = regexp.MustCompile(`(?m)^  BindAddress \S+\n`).ReplaceAllString(text, "")
		text = strings.Replace(text, "Host bastion\n", "Host bastion\n  BindAddress "+source+"\n", 1)
		write(t, b1.client.Config, text)
	}
	start := func(r *bastionProc, i int) {
		r.launch()
		viaFront()
		// In service once HAProxy has seen it ready twice (rise 2, 300 ms).
		waitFor(t, func() bool { return httpGet(ops[i], "/readyz") == "ready\n" }, "the replica ready")
		time.Sleep(time.Second)
	}
	start(b1, 0)
	start(b2, 1)
	from := func(src string, args ...string) testenv.Result {
		if src != source {
			source = src
			viaFront()
		}
		return b1.client.Run(nil, "ssh", append([]string{"-J", "bastion", "root@" + web1}, args...)...)
	}
	logins := func(r *bastionProc) int { return len(r.auditEvents("login")) }

	// The policy sees the client, not the balancer.
	res := from("127.0.0.3", "true")
	if res.Exit == 0 {
		t.Fatalf("a source outside the rule was let in: %v", res)
	}
	if len(b1.auditEvents("denied"))+len(b2.auditEvents("denied")) == 0 {
		t.Fatalf("the refusal of 127.0.0.3 is in neither trail: %v", res)
	}

	// Both replicas reach the guest at once: sessions overlapping, shared
	// round robin.
	source = "127.0.0.2"
	viaFront()
	var wg sync.WaitGroup
	results := make([]testenv.Result, 4)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = from("127.0.0.2", "sleep 4; echo replica-ok")
		}()
		time.Sleep(300 * time.Millisecond)
	}
	wg.Wait()
	for i, res := range results {
		if res.Exit != 0 || strings.TrimSpace(string(res.Stdout)) != "replica-ok" {
			t.Fatalf("session %d through the balancer: %v %q", i, res, res.Stdout)
		}
	}
	for i, r := range replicas {
		if len(r.auditEvents("session_end")) == 0 {
			t.Fatalf("no session on replica r%d: the balancer did not share them", i+1)
		}
		for _, l := range r.auditEvents("login") {
			if !regexp.MustCompile(`^127\.0\.0\.[23]:\d+$`).MatchString(fmt.Sprint(l["source"])) ||
				!strings.HasPrefix(fmt.Sprint(l["balancer"]), "127.0.0.1:") || l["replica"] != fmt.Sprintf("r%d", i+1) {
				t.Fatalf("a login event on r%d without the client's address, the balancer's and the replica: %v", i+1, l)
			}
		}
	}

	// r2 killed: every new login goes to r1.
	b2.proc.Kill()
	time.Sleep(time.Second) // fall 1 at 300 ms
	before := logins(b1)
	for i := range 3 {
		if res := from("127.0.0.2", "echo after-kill"); res.Exit != 0 || !strings.Contains(string(res.Stdout), "after-kill") {
			t.Fatalf("login %d with one replica killed: %v", i, res)
		}
	}
	if got := logins(b1) - before; got != 3 {
		t.Fatalf("%d of 3 logins reached the replica left", got)
	}

	// r2 back; then SIGTERM on r1 with a session open on it: the session
	// finishes, r1's /readyz says draining, and new logins go to r2.
	start(b2, 1)
	var long testenv.Result
	done := make(chan struct{})
	opened := len(b1.auditEvents("session_start"))
	for attempt := 0; ; attempt++ {
		done = make(chan struct{})
		go func() {
			defer close(done)
			long = from("127.0.0.2", "sleep 8; echo drained-ok")
		}()
		time.Sleep(3 * time.Second)
		if len(b1.auditEvents("session_start")) > opened {
			break // on r1
		}
		<-done // on r2: round robin gives the next one to r1
		if attempt == 2 {
			t.Fatal("no session reached r1")
		}
	}
	b1.proc.Signal(syscall.SIGTERM)
	waitFor(t, func() bool { return strings.Contains(httpGet(ops[0], "/readyz"), "draining") }, "r1's /readyz to say draining")
	time.Sleep(time.Second)
	before = logins(b2)
	for i := range 2 {
		if res := from("127.0.0.2", "echo while-draining"); res.Exit != 0 || !strings.Contains(string(res.Stdout), "while-draining") {
			t.Fatalf("login %d while r1 drains: %v", i, res)
		}
	}
	if got := logins(b2) - before; got != 2 {
		t.Fatalf("%d of 2 logins went to the replica that is not draining", got)
	}
	<-done
	if long.Exit != 0 || !strings.Contains(string(long.Stdout), "drained-ok") {
		t.Fatalf("the session on the draining replica was cut: %v %q", long, long.Stdout)
	}
}

// port is the port of a host:port address.
func port(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}

// httpGet is the body of GET path on addr, or the error's text.
func httpGet(addr, path string) string {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + addr + path)
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	var b strings.Builder
	buf := make([]byte, 4096)
	n, _ := resp.Body.Read(buf)
	b.Write(buf[:n])
	return b.String()
}

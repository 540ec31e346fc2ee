package main

import (
	"bufio"
	"crypto/ed25519"
	"crypto/rand"
	"flag"
	"fmt"
	"io"
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

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/internal/testenv"
)

// buildBastion builds this command into a temporary directory.
func buildBastion(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "bastion")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// TestServeExampleConfig starts `bastion serve` with the example
// configuration (on a free port, in a scratch directory), expects it to say
// where it listens and the known-hosts line, and stops it with SIGTERM.
func TestServeExampleConfig(t *testing.T) {
	bin := buildBastion(t)
	dir := t.TempDir()
	example, err := os.ReadFile("../../bastion.toml.example")
	if err != nil {
		t.Fatal(err)
	}
	config := strings.Replace(string(example), `listen = "127.0.0.1:2222"`, `listen = "127.0.0.1:0"`, 1)
	os.WriteFile(filepath.Join(dir, "bastion.toml"), []byte(config), 0o600)

	cmd := exec.Command(bin, "serve", "--config", "bastion.toml")
	cmd.Dir = dir
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	lines := make(chan string, 100)
	go func() {
		s := bufio.NewScanner(stderr)
		for s.Scan() {
			lines <- s.Text()
		}
		close(lines)
	}()
	var listening, knownHosts string
	timeout := time.After(30 * time.Second)
	for listening == "" || knownHosts == "" {
		select {
		case line := <-lines:
			if m := regexp.MustCompile(`^bastion: listening on (127\.0\.0\.1:\d+)$`).FindStringSubmatch(line); m != nil {
				listening = m[1]
			}
			if strings.HasPrefix(line, "@cert-authority * ssh-ed25519 ") {
				knownHosts = line
			}
		case <-timeout:
			t.Fatalf("serve did not print its address and known-hosts line (got %q, %q)", listening, knownHosts)
		}
	}
	for _, path := range []string{"state", "state/host_key", "state/host_ca"} {
		if _, err := os.Stat(filepath.Join(dir, path)); err != nil {
			t.Errorf("state: %v", err)
		}
	}

	// state_dir is relative to the working directory.
	keysCmd := exec.Command(bin, "keys", "known-hosts", "--config", "bastion.toml")
	keysCmd.Dir = dir
	out, err := keysCmd.Output()
	if err != nil || strings.TrimSpace(string(out)) != knownHosts {
		t.Fatalf("bastion keys known-hosts: %q, %v; serve printed %q", out, err, knownHosts)
	}

	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() {
		for range lines {
		}
		done <- cmd.Wait()
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("after SIGTERM: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop on SIGTERM")
	}
}

func TestConfigCheckReportsLine(t *testing.T) {
	bin := buildBastion(t)
	path := filepath.Join(t.TempDir(), "bad.toml")
	os.WriteFile(path, []byte("[server]\nlisten = \"127.0.0.1:2222\"\nlisen = \"x\"\n"), 0o600)
	out, err := exec.Command(bin, "config", "check", "--config", path).CombinedOutput()
	if err == nil || !strings.Contains(string(out), path+":3: unknown key server.lisen") {
		t.Fatalf("config check: %v\n%s", err, out)
	}
}

var update = flag.Bool("update", false, "rewrite golden files")

// TestPolicyTestGolden checks what `bastion policy test` prints for the
// example configuration.
func TestPolicyTestGolden(t *testing.T) {
	var out strings.Builder
	for _, args := range [][]string{
		{"--account", "alice", "--vm", "web1", "--login", "dev", "--channel", "local-forward", "--port", "8080"},
		{"--account", "alice", "--vm", "web1", "--login", "dev", "--channel", "local-forward", "--port", "22"},
		{"--account", "alice", "--vm", "web1", "--login", "dev", "--channel", "local-forward", "--host", "0x7f000001", "--port", "8080"},
		{"--account", "alice", "--vm", "web1", "--login", "dev", "--channel", "local-forward", "--host", "10.0.attacker.example", "--port", "8080"},
		{"--account", "alice", "--vm", "web1", "--login", "dev", "--channel", "local-forward", "--host", "127.0.0.1 ", "--port", "8080"},
		{"--account", "bob", "--vm", "db1", "--login", "root", "--channel", "shell", "--label", "env=prod"},
		{"--account", "bob", "--vm", "db1", "--login", "root", "--channel", "sftp", "--time", "2026-11-25T12:00:00Z"},
		{"--account", "bob", "--vm", "db1", "--login", "root", "--channel", "sftp", "--time", "2026-11-29T12:00:00Z"},
		{"--account", "alice", "--vm", "web1", "--login", "dev", "--channel", "scp", "--command", "scp -f /etc/hostname"},
		{"--account", "alice", "--vm", "web1", "--login", "dev", "--channel", "scp", "--command", "scp -f /etc/hostname; id"},
		{"--account", "alice", "--vm", "web1", "--login", "dev", "--channel", "local-forward", "--socket", "/run/user/1000/vscode-ipc-1a7a.sock"},
		{"--account", "alice", "--vm", "web1", "--login", "dev", "--channel", "local-forward", "--socket", "/run/user/1000/../../../var/run/docker.sock"},
		{"--account", "alice", "--vm", "web1", "--login", "dev", "--channel", "local-forward", "--socket", "/var/run/docker.sock"},
	} {
		fmt.Fprintf(&out, "$ bastion policy test %s\n", strings.Join(args, " "))
		if err := run(append([]string{"policy", "test", "--config", "../../bastion.toml.example"}, args...), &out, &out); err != nil {
			t.Fatal(err)
		}
		out.WriteString("\n")
	}
	golden := "testdata/policy-test.golden"
	if *update {
		os.WriteFile(golden, []byte(out.String()), 0o644)
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (go test -update writes it)", err)
	}
	if out.String() != string(want) {
		t.Fatalf("policy test output differs from %s:\n%s", golden, out.String())
	}
}

// TestReloadKeepsPolicyOnError sends SIGHUP to `bastion serve` after
// breaking its configuration, then after mending it.
func TestReloadKeepsPolicyOnError(t *testing.T) {
	bin := buildBastion(t)
	dir := t.TempDir()
	example, _ := os.ReadFile("../../bastion.toml.example")
	good := strings.Replace(string(example), `listen = "127.0.0.1:2222"`, `listen = "127.0.0.1:0"`, 1)
	path := filepath.Join(dir, "bastion.toml")
	os.WriteFile(path, []byte(good), 0o600)
	cmd := exec.Command(bin, "serve", "--config", "bastion.toml")
	cmd.Dir = dir
	var logs lockedLog
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	waitLog := func(want string) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for !strings.Contains(logs.String(), want) {
			if time.Now().After(deadline) {
				t.Fatalf("the log never said %q:\n%s", want, logs.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitLog("listening on")
	os.WriteFile(path, []byte(good+"\n[[rule]]\nname = \"broken\"\neffect = \"deny\"\nchannels = [\"teleport\"]\n"), 0o600)
	cmd.Process.Signal(syscall.SIGHUP)
	waitLog(`reload failed; the running configuration stays`)
	if !strings.Contains(logs.String(), `unknown channel \"teleport\"`) {
		t.Fatalf("the log does not say why:\n%s", logs.String())
	}
	os.WriteFile(path, []byte(good+"\n[[rule]]\nname = \"extra\"\neffect = \"deny\"\nlogins = [\"nobody\"]\n"), 0o600)
	cmd.Process.Signal(syscall.SIGHUP)
	waitLog(`configuration reloaded: accounts and policy`)
	if !strings.Contains(logs.String(), "rules=5") {
		t.Fatalf("the reload did not take the new rule:\n%s", logs.String())
	}
	// A change to the file is enough, without a signal.
	os.WriteFile(path, []byte(good+"\n[[rule]]\nname = \"e1\"\neffect = \"deny\"\nlogins = [\"a\"]\n[[rule]]\nname = \"e2\"\neffect = \"deny\"\nlogins = [\"b\"]\n"), 0o600)
	waitLog(`why="file changed" rules=6`)
}

type lockedLog struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestFrontDoorCertificateNamesTheBastion: with no server.hostnames, the
// front door's certificate names this machine (its host name, localhost,
// the listen address), so a client that calls it by another name
// (HostKeyAlias=github.com) is refused even with the CA trusted for any
// host; and the known_hosts line printed is scoped to the bastion's names
// and the policy's VM names.
func TestFrontDoorCertificateNamesTheBastion(t *testing.T) {
	bin := buildBastion(t)
	dir := t.TempDir()
	client := testenv.NewClient(t, "127.0.0.1:1", "alice", "")
	config := fmt.Sprintf(`[server]
listen = "127.0.0.1:0"
state_dir = "state"
audit = "off"

[[account]]
name = "alice"
groups = ["dev"]
keys = [%q]

[[rule]]
name = "dev"
groups = ["dev"]
vms = ["web*"]
logins = ["root"]
`, strings.TrimSpace(string(gossh.MarshalAuthorizedKey(client.PublicKey))))
	os.WriteFile(filepath.Join(dir, "bastion.toml"), []byte(config), 0o600)
	addr := serveIn(t, bin, dir)
	keysCmd := exec.Command(bin, "keys", "known-hosts", "--config", "bastion.toml")
	keysCmd.Dir = dir
	out, err := keysCmd.Output()
	line := strings.TrimSpace(string(out))
	if err != nil || strings.HasPrefix(line, "@cert-authority * ") || !strings.Contains(line, "[127.0.0.1]:*") || !strings.Contains(line, ",web* ") {
		t.Fatalf("known-hosts line %q, %v; want it scoped to the bastion's names and web*", line, err)
	}
	anyHost := regexp.MustCompile(`^@cert-authority \S+ `).ReplaceAllString(line, "@cert-authority * ")
	for _, tc := range []struct {
		known string
		args  []string
		ok    bool
	}{
		{line, nil, true},
		{line, []string{"-o", "HostKeyAlias=github.com"}, false},
		{anyHost, []string{"-o", "HostKeyAlias=github.com"}, false}, // the certificate names the bastion only
	} {
		c := testenv.NewClient(t, addr, "alice", tc.known)
		os.WriteFile(c.Key, mustRead(t, client.Key), 0o600)
		res := c.Run(nil, "ssh", append(tc.args, "bastion")...)
		if (res.Exit == 0) != tc.ok || (!tc.ok && !strings.Contains(res.Stderr, "Host key verification failed")) {
			t.Errorf("known_hosts %.40q… %v: %v, want ok=%v", tc.known, tc.args, res, tc.ok)
		}
	}
}

// TestServeCiphers: `bastion serve` offers server.ciphers on its front
// door, and an OpenSSH client asking for another is told what it offers.
func TestServeCiphers(t *testing.T) {
	bin := buildBastion(t)
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "bastion.toml"), []byte(`[server]
listen = "127.0.0.1:0"
state_dir = "state"
audit = "off"
ciphers = ["aes256-ctr", "aes128-gcm@openssh.com"]
`), 0o600)
	addr := serveIn(t, bin, dir)
	// The client knows no host key: the key exchange is all there is.
	client := testenv.NewClient(t, addr, "alice", "")
	// OpenSSH's default order puts aes256-ctr before aes128-gcm.
	res := client.Run(nil, "ssh", "-v", "bastion", "true")
	if !strings.Contains(res.Stderr, "kex: server->client cipher: aes256-ctr ") {
		t.Errorf("a default client: %v, want aes256-ctr negotiated", res)
	}
	res = client.Run(nil, "ssh", "-c", "aes128-ctr", "bastion", "true")
	if res.Exit != 255 || !strings.Contains(res.Stderr, "no matching cipher found. Their offer: aes256-ctr,aes128-gcm@openssh.com") {
		t.Errorf("a client asking for aes128-ctr: %v, want no matching cipher found and the bastion's offer", res)
	}
}

// serveIn starts `bastion serve` on dir's bastion.toml, waits for it to
// listen, and returns the address; the test's end kills it.
func serveIn(t *testing.T, bin, dir string) string {
	t.Helper()
	cmd := exec.Command(bin, "serve", "--config", "bastion.toml")
	cmd.Dir = dir
	logs := &lockedLog{}
	cmd.Stderr = logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if m := regexp.MustCompile(`bastion: listening on (\S+)`).FindStringSubmatch(logs.String()); m != nil {
			return m[1]
		}
		if time.Now().After(deadline) {
			t.Fatalf("serve did not start:\n%s", logs.String())
		}
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// TestOpsListener: with server.ops_listen set, /metrics counts what the
// audit trail records (a refused key, a login, a failed reload) and shows
// the connection held open; /readyz answers 503 naming a hypervisor that
// does not answer, and 503 "draining" once SIGTERM has begun a drain while
// a session is still open.
func TestOpsListener(t *testing.T) {
	bin := buildBastion(t)
	free := func() string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		return ln.Addr().String()
	}
	get := func(addr, path string) (int, string) {
		t.Helper()
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	example, _ := os.ReadFile("../../bastion.toml.example")
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	signer, _ := gossh.NewSignerFromKey(priv)
	sshPub, _ := gossh.NewPublicKey(pub)
	start := func(extra string) (cmd *exec.Cmd, listen, ops string, logs *lockedLog) {
		t.Helper()
		dir := t.TempDir()
		listen, ops = free(), free()
		config := strings.Replace(string(example), `listen = "127.0.0.1:2222"`, `listen = "`+listen+`"`, 1)
		config = strings.Replace(config, `# ops_listen = "127.0.0.1:9122"`, `ops_listen = "`+ops+`"`, 1)
		config += "\n[[account]]\nname = \"carol\"\ngroups = [\"dev\"]\nkeys = [\"" + strings.TrimSpace(string(gossh.MarshalAuthorizedKey(sshPub))) + "\"]\n" + extra
		os.WriteFile(filepath.Join(dir, "bastion.toml"), []byte(config), 0o600)
		cmd = exec.Command(bin, "serve", "--config", "bastion.toml")
		cmd.Dir = dir
		logs = &lockedLog{}
		cmd.Stderr = logs
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		deadline := time.Now().Add(30 * time.Second)
		for !strings.Contains(logs.String(), "listening on") {
			if time.Now().After(deadline) {
				t.Fatalf("serve did not start:\n%s", logs.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
		return cmd, listen, ops, logs
	}
	metric := func(body, series string) string {
		for _, line := range strings.Split(body, "\n") {
			if v, ok := strings.CutPrefix(line, series+" "); ok {
				return v
			}
		}
		return "absent"
	}

	// A hypervisor that does not answer: not ready, and the reason says which.
	_, _, ops, _ := start("\n[[hypervisor]]\nuri = \"qemu+tcp://127.0.0.1:1/system\"\n")
	if code, body := get(ops, "/healthz"); code != 200 || body != "ok\n" {
		t.Fatalf("/healthz: %d %q", code, body)
	}
	if code, body := get(ops, "/readyz"); code != 503 || !strings.Contains(body, "hypervisor is unreachable: qemu+tcp://127.0.0.1:1/system") {
		t.Fatalf("/readyz with an unreachable hypervisor: %d %q", code, body)
	}

	cmd, listen, ops, logs := start("")
	if code, body := get(ops, "/readyz"); code != 200 || body != "ready\n" {
		t.Fatalf("/readyz: %d %q", code, body)
	}
	_, stranger, _ := ed25519.GenerateKey(rand.Reader)
	strangerSigner, _ := gossh.NewSignerFromKey(stranger)
	if c, err := gossh.Dial("tcp", listen, &gossh.ClientConfig{User: "carol", Auth: []gossh.AuthMethod{gossh.PublicKeys(strangerSigner)},
		HostKeyCallback: gossh.InsecureIgnoreHostKey(), Timeout: 10 * time.Second}); err == nil {
		c.Close()
		t.Fatal("an unknown key was let in")
	}
	c, err := gossh.Dial("tcp", listen, &gossh.ClientConfig{User: "carol", Auth: []gossh.AuthMethod{gossh.PublicKeys(signer)},
		HostKeyCallback: gossh.InsecureIgnoreHostKey(), Timeout: 10 * time.Second})
	if err != nil {
		t.Fatalf("carol's key: %v", err)
	}
	defer c.Close()
	// The login event comes with the first use of the connection.
	if ok, _, err := c.SendRequest("keepalive@openssh.com", true, nil); err != nil || ok {
		t.Fatalf("keepalive: %v, %v", ok, err)
	}
	path := filepath.Join(cmd.Dir, "bastion.toml")
	good, _ := os.ReadFile(path)
	os.WriteFile(path, append(good, "\n[[rule]]\nname = \"broken\"\nchannels = [\"teleport\"]\n"...), 0o600)
	cmd.Process.Signal(syscall.SIGHUP)
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(logs.String(), "reload failed"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the broken config was not refused:\n%s", logs.String())
		}
	}
	// A connection that has not authenticated: its banner shows it was
	// admitted.
	raw, err := net.Dial("tcp", listen)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	if _, err := raw.Read(make([]byte, 64)); err != nil {
		t.Fatalf("no banner: %v", err)
	}
	// The failed reload is logged before it is counted: wait for the count.
	var body string
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, body = get(ops, "/metrics"); metric(body, `bastion_reloads_total{result="failed"}`) == "1" || time.Now().After(deadline) {
			break
		}
	}
	// Two seconds on, the file watcher has not tried the broken file again.
	time.Sleep(2500 * time.Millisecond)
	_, body = get(ops, "/metrics")
	for series, want := range map[string]string{
		`bastion_connections_unauthenticated`:             "1",
		`bastion_authentications_total{result="failure"}`: "1",
		`bastion_authentications_total{result="success"}`: "1",
		`bastion_audit_events_total{type="login"}`:        "1",
		`bastion_connections_active`:                      "1",
		`bastion_upstream_idle`:                           "0",
		`bastion_reloads_total{result="failed"}`:          "1",
		`bastion_reloads_total{result="ok"}`:              "0",
		`bastion_ready`:                                   "1",
	} {
		if got := metric(body, series); got != want {
			t.Errorf("%s = %s, want %s", series, got, want)
		}
	}
	if !regexp.MustCompile(`(?m)^bastion_build_info\{goversion="go[^"]+",version="[^"]+"\} 1$`).MatchString(body) {
		t.Errorf("no bastion_build_info in:\n%s", body)
	}
	if strings.Contains(body, "carol") || strings.Contains(body, "127.0.0.1") {
		t.Errorf("the metrics name a person or an address:\n%s", body)
	}
	// Prometheus's own linter takes the exposition (promtool comes with
	// Debian's prometheus, which testbed/install-host.sh installs).
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatalf("promtool is not installed (testbed/install-host.sh installs prometheus): %v", err)
	}
	check := exec.Command(promtool, "check", "metrics")
	check.Stdin = strings.NewReader(body)
	if out, err := check.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}

	// SIGTERM with carol's connection open: draining, not ready.
	cmd.Process.Signal(syscall.SIGTERM)
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, body := get(ops, "/readyz")
		if code == 503 && body == "not ready: draining\n" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz while draining: %d %q", code, body)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

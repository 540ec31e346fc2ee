package vmtest

import (
	"bufio"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/internal/testenv"
)

// bastionProc is a `bastion serve` process with a fresh state directory,
// so every one starts with no trust, and an OpenSSH client of account "me".
type bastionProc struct {
	t      *testing.T
	dir    string
	config string
	base   string // the configuration without its rules
	proc   *os.Process
	audit  string
	addr   string
	client *testenv.Client
	stderr *testenv.LockedBuffer
}

// defaultRule lets "me" be root and user on every test guest.
const defaultRule = `
[[rule]]
name = "dev-all"
groups = ["dev"]
vms = ["bt-*"]
logins = ["root", "user"]
channels = ["shell", "exec", "scp", "sftp", "local-forward", "remote-forward"]
`

// sharingRule is defaultRule without remote forwarding: a person's links
// to a login then share one connection to the guest, which outlives them
// for server.upstream_linger.
var sharingRule = strings.Replace(defaultRule, `, "remote-forward"]`, "]", 1)

// startBastion starts the bastion binary allowing "me" root and user on
// every VM, with a short check timeout so that a silent agent costs
// seconds. extra is appended to the configuration.
func startBastion(t *testing.T, extra string) *bastionProc {
	t.Helper()
	return startBastionRules(t, defaultRule+extra)
}

// startBastionRules starts the bastion binary with rules as its policy.
func startBastionRules(t *testing.T, rules string) *bastionProc {
	t.Helper()
	b := newBastionProc(t, "", rules)
	b.launch()
	return b
}

// newBastionProc writes a configuration with rules as its policy and state
// (a new directory if "") as its state directory, and the client's files;
// launch starts it (once: two bastions on one state directory would
// contend for it).
func newBastionProc(t *testing.T, state, rules string) *bastionProc {
	t.Helper()
	b := &bastionProc{t: t, dir: t.TempDir(), stderr: &testenv.LockedBuffer{}}
	b.config = filepath.Join(b.dir, "bastion.toml")
	b.audit = filepath.Join(b.dir, "audit.jsonl")
	if state == "" {
		state = filepath.Join(b.dir, "state")
	}
	// The host CA is made first, so the client can trust it.
	write(t, b.config, fmt.Sprintf("[server]\nstate_dir = %q\n", state))
	out, err := exec.Command(binary, "keys", "known-hosts", "--config", b.config).Output()
	if err != nil {
		t.Fatalf("bastion keys known-hosts: %v", err)
	}
	b.client = testenv.NewClient(t, "127.0.0.1:1", "me", strings.TrimSpace(string(out)))
	b.base = fmt.Sprintf(`[server]
listen = "127.0.0.1:0"
state_dir = %q
audit = %q
log_level = "debug"

[trust]
check_timeout = "25s"

[[hypervisor]]
uri = "qemu:///system"

[[account]]
name = "me"
groups = ["dev"]
keys = [%q]
`, state, b.audit, strings.TrimSpace(string(gossh.MarshalAuthorizedKey(b.client.PublicKey))))
	write(t, b.config, b.base+rules)
	// Now that the policy names its VMs, the line users are given is scoped
	// to the bastion's names and those VMs: the client trusts that one.
	scoped, err := exec.Command(binary, "keys", "known-hosts", "--config", b.config).Output()
	if err != nil {
		t.Fatalf("bastion keys known-hosts: %v", err)
	}
	write(t, filepath.Join(b.client.Dir, "known_hosts"), string(scoped))
	return b
}

// server adds settings to the [server] table of b's configuration; call
// it before launch.
func (b *bastionProc) server(settings string) {
	b.t.Helper()
	b.base = strings.Replace(b.base, "[server]\n", "[server]\n"+strings.TrimSpace(settings)+"\n", 1)
	cfg, err := os.ReadFile(b.config)
	if err != nil {
		b.t.Fatal(err)
	}
	write(b.t, b.config, strings.Replace(string(cfg), "[server]\n", "[server]\n"+strings.TrimSpace(settings)+"\n", 1))
}

// launch starts `bastion serve` on b's configuration and points the
// client at the address it listens on. The process is stopped when the
// test ends.
func (b *bastionProc) launch() {
	t := b.t
	t.Helper()
	cmd := exec.Command(binary, "serve", "--config", b.config)
	pipe, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	b.proc = cmd.Process
	addr := make(chan string, 1)
	go func() {
		s := bufio.NewScanner(pipe)
		for s.Scan() {
			line := s.Text()
			b.stderr.Write([]byte(line + "\n"))
			if m := regexp.MustCompile(`^bastion: listening on (\S+)$`).FindStringSubmatch(line); m != nil {
				addr <- m[1]
			}
		}
	}()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		if t.Failed() {
			t.Logf("bastion stderr:\n%s", b.stderr.String())
		}
	})
	select {
	case b.addr = <-addr:
	case <-time.After(30 * time.Second):
		t.Fatalf("bastion did not start:\n%s", b.stderr.String())
	}
	// Point the client's "bastion" at the real address.
	cfg, _ := os.ReadFile(b.client.Config)
	host, port, _ := strings.Cut(b.addr, ":")
	cfg = regexp.MustCompile(`(?m)^(\s*)HostName 127\.0\.0\.1$`).ReplaceAll(cfg, []byte("${1}HostName "+host))
	cfg = regexp.MustCompile(`(?m)^(\s*)Port \d+$`).ReplaceAll(cfg, []byte("${1}Port "+port))
	write(t, b.client.Config, string(cfg))
}

// reload replaces the policy with rules and sends SIGHUP.
func (b *bastionProc) reload(rules string) {
	b.t.Helper()
	write(b.t, b.config, b.base+rules)
	b.proc.Signal(syscall.SIGHUP)
	deadline := time.Now().Add(30 * time.Second)
	for len(b.auditEvents("reloaded")) == 0 {
		if time.Now().After(deadline) {
			b.t.Fatalf("no reload:\n%s", b.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ssh runs ssh through the bastion: -J bastion login@vm args...
func (b *bastionProc) ssh(stdin []byte, target string, args ...string) testenv.Result {
	b.t.Helper()
	return b.client.Run(stdin, "ssh", append([]string{"-J", "bastion", target}, args...)...)
}

// auditEvents returns the audit events of type typ.
func (b *bastionProc) auditEvents(typ string) []map[string]any {
	data, _ := os.ReadFile(b.audit)
	var out []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		var e map[string]any
		if json.Unmarshal([]byte(line), &e) == nil && e["type"] == typ {
			out = append(out, e)
		}
	}
	return out
}

// trustLs runs `bastion trust ls`.
func (b *bastionProc) trustLs() string {
	b.t.Helper()
	out, err := exec.Command(binary, "trust", "ls", "--config", b.config).CombinedOutput()
	if err != nil {
		b.t.Fatalf("bastion trust ls: %v\n%s", err, out)
	}
	return string(out)
}

func write(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
}

// agentCommand sends a guest agent command through virsh and returns its
// "return" value.
func agentCommand(t *testing.T, vm string, command string, args any) json.RawMessage {
	t.Helper()
	req, _ := json.Marshal(map[string]any{"execute": command, "arguments": args})
	if args == nil {
		req, _ = json.Marshal(map[string]any{"execute": command})
	}
	out := virsh(t, "qemu-agent-command", vm, "--timeout", "20", string(req))
	var reply struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal([]byte(out), &reply); err != nil {
		t.Fatalf("agent %s: %v: %s", command, err, out)
	}
	return reply.Return
}

// guestShell starts `sh -c script` in the guest through the agent and,
// unless background, waits for it to exit 0.
func guestShell(t *testing.T, vm, script string, background bool) {
	t.Helper()
	var started struct {
		PID int `json:"pid"`
	}
	waitAgentPing(t, vm)
	json.Unmarshal(agentCommand(t, vm, "guest-exec", map[string]any{"path": "/bin/sh", "arg": []string{"-c", script}, "capture-output": true}), &started)
	if background {
		return
	}
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		var st struct {
			Exited   bool   `json:"exited"`
			ExitCode int    `json:"exitcode"`
			ErrData  string `json:"err-data"`
		}
		json.Unmarshal(agentCommand(t, vm, "guest-exec-status", map[string]any{"pid": started.PID}), &st)
		if st.Exited {
			if st.ExitCode != 0 {
				msg, _ := base64.StdEncoding.DecodeString(st.ErrData)
				t.Fatalf("guest %s: sh -c %q: exit %d: %s", vm, script, st.ExitCode, msg)
			}
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("guest %s: sh -c %q did not finish", vm, script)
}

// waitAgent waits until vm's agent answers a ping and opens files
// (fileOps) or refuses to because the command is disabled (!fileOps).
func waitAgent(t *testing.T, vm string, fileOps bool) {
	t.Helper()
	agent := func(cmd string) (string, error) {
		out, err := exec.Command("virsh", "-q", "-c", "qemu:///system", "qemu-agent-command", vm, "--timeout", "5", cmd).CombinedOutput()
		return string(out), err
	}
	deadline := time.Now().Add(3 * time.Minute)
	for time.Now().Before(deadline) {
		if _, err := agent(`{"execute":"guest-ping"}`); err == nil {
			out, err := agent(`{"execute":"guest-file-open","arguments":{"path":"/etc/hostname","mode":"r"}}`)
			if err == nil {
				var reply struct{ Return int }
				json.Unmarshal([]byte(out), &reply)
				agent(fmt.Sprintf(`{"execute":"guest-file-close","arguments":{"handle":%d}}`, reply.Return))
				if fileOps {
					return
				}
			} else if !fileOps && strings.Contains(out, "has been disabled") {
				return
			}
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Fatalf("the guest agent of %s did not reach the expected state (file commands enabled: %v)", vm, fileOps)
}

// waitAgentPing waits until vm's agent answers a ping.
func waitAgentPing(t *testing.T, vm string) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for time.Now().Before(deadline) {
		if exec.Command("virsh", "-q", "-c", "qemu:///system", "qemu-agent-command", vm, "--timeout", "5", `{"execute":"guest-ping"}`).Run() == nil {
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Fatalf("the guest agent of %s does not answer", vm)
}

func readJSON(t *testing.T, raw json.RawMessage, v any) {
	t.Helper()
	if err := json.Unmarshal(raw, v); err != nil {
		t.Fatalf("agent reply %s: %v", raw, err)
	}
}

func marshalAuthorized(k gossh.PublicKey) []byte { return gossh.MarshalAuthorizedKey(k) }

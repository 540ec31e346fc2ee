package vmtest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bastionvm/bastion/internal/testenv"
)

// guestRules: root is denied on the test guests by a label deny rule,
// which beats the allow rule naming root; user may run a few commands,
// read through sftp, and forward to the guest's port 22 only.
const guestRules = `
[[rule]]
name = "no-root-on-testbed"
effect = "deny"
logins = ["root"]
labels = { testbed = "true" }

[[rule]]
name = "root-everywhere"
groups = ["dev"]
vms = ["bt-*"]
logins = ["root"]

[[rule]]
name = "user-limited"
groups = ["dev"]
vms = ["bt-*"]
logins = ["user"]
channels = ["exec", "sftp-read", "local-forward"]
commands = ["echo **", "sleep *"]
forward_ports = ["22"]
`

func TestPolicyOnGuest(t *testing.T) {
	b := startBastionRules(t, guestRules)
	user := "user@" + web1

	t.Run("deny rule on a label beats allow", func(t *testing.T) {
		refused(t, b, "root@"+web1, "bastion: "+web1+": denied by policy")
	})
	t.Run("exec patterns", func(t *testing.T) {
		if res := b.ssh(nil, user, "echo inside the patterns"); res.Exit != 0 || string(res.Stdout) != "inside the patterns\n" {
			t.Fatalf("echo: %v %q", res, res.Stdout)
		}
		res := b.ssh(nil, user, "touch /tmp/outside")
		if res.Exit != 255 || !strings.Contains(res.Stderr, "exec denied by policy") {
			t.Fatalf("touch: %v", res)
		}
	})
	t.Run("read-only sftp", func(t *testing.T) {
		local := t.TempDir()
		batch := filepath.Join(local, "batch")
		write(t, batch, "get /etc/os-release "+local+"/os-release\n")
		if res := b.client.Run(nil, "sftp", "-J", "bastion", "-b", batch, user); res.Exit != 0 {
			t.Fatalf("sftp get: %v", res)
		}
		if got, _ := os.ReadFile(local + "/os-release"); !strings.Contains(string(got), "bookworm") {
			t.Fatalf("sftp get /etc/os-release: %q", got)
		}
		write(t, batch, "put "+batch+" /home/user/uploaded\n")
		res := b.client.Run(nil, "sftp", "-J", "bastion", "-b", batch, user)
		if res.Exit == 0 || !strings.Contains(strings.ToLower(res.Stderr), "permission denied") {
			t.Fatalf("sftp put under read-only: %v", res)
		}
	})
	t.Run("forward ports", func(t *testing.T) {
		good, bad := testenv.FreeAddr(t), testenv.FreeAddr(t)
		stop := background(t, b, "-N", "-L", good+":127.0.0.1:22", "-L", bad+":127.0.0.1:25", user)
		defer stop()
		if banner := readBanner(t, good); !strings.HasPrefix(banner, "SSH-2.0-OpenSSH") {
			t.Fatalf("-L to port 22: %q", banner)
		}
		if banner := readBanner(t, bad); banner != "" {
			t.Fatalf("-L to port 25 went through: %q", banner)
		}
	})
	t.Run("reload that closes the window ends the session", func(t *testing.T) {
		before := len(b.auditEvents("connected"))
		done := make(chan testenv.Result, 1)
		go func() { done <- b.ssh(nil, user, "sleep 60") }()
		deadline := time.Now().Add(30 * time.Second)
		for len(b.auditEvents("connected")) == before {
			if time.Now().After(deadline) {
				t.Fatal("the session did not start")
			}
			time.Sleep(100 * time.Millisecond)
		}
		time.Sleep(time.Second)
		hour := time.Now().UTC().Add(3 * time.Hour).Format("15")
		b.reload(strings.Replace(guestRules, `forward_ports = ["22"]`,
			`forward_ports = ["22"]`+"\ntime = { from = \""+hour+":00\", to = \""+hour+":30\" }", 1))
		res := <-done
		if res.Exit != 255 || !strings.Contains(res.Stderr, "access ended by a policy change") {
			t.Fatalf("the session after a reload that closed its window: %v", res)
		}
		refused(t, b, user, "denied by policy")
	})
}

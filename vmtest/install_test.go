package vmtest

import (
	"bufio"
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

// TestMakeInstall: `make install` on this machine, then the bastion
// started as its unit starts it but without systemd, with the installed
// configuration given accounts, a rule and the hypervisor: a person
// reaches a real guest through it. The install runs in a mount namespace
// whose /etc, /var/lib and /usr/local are overlays of the real ones, so
// it is a real install (user, files, modes) that leaves the machine as it
// was.
func TestMakeInstall(t *testing.T) {
	testenv.Need(t, "unshare")
	testenv.Need(t, "systemd-analyze")
	// libvirtd, outside the namespace, must know the user the bastion
	// runs as: it is made here as make install makes it, and removed after.
	if exec.Command("id", "bastion").Run() != nil {
		if out, err := exec.Command("useradd", "--system", "--user-group", "--home-dir", "/var/lib/bastion", "--no-create-home",
			"--shell", "/usr/sbin/nologin", "bastion").CombinedOutput(); err != nil {
			t.Fatalf("useradd bastion: %v\n%s", err, out)
		}
		t.Cleanup(func() { exec.Command("userdel", "bastion").Run() })
	}
	layers := t.TempDir()
	listen := testenv.FreeAddr(t)
	client := testenv.NewClient(t, listen, "me", "")
	key := strings.TrimSpace(string(gossh.MarshalAuthorizedKey(client.PublicKey)))
	script := fmt.Sprintf(`set -euo pipefail
for d in etc var/lib usr/local; do
  n=${d//\//_}; mkdir -p %[1]s/$n.upper %[1]s/$n.work
  mount -t overlay overlay -o lowerdir=/$d,upperdir=%[1]s/$n.upper,workdir=%[1]s/$n.work /$d
done
make -C %[2]s install
systemd-analyze verify /etc/systemd/system/bastion.service
config=/etc/bastion/bastion.toml
sed -i 's|^listen = .*|listen = "%[3]s"|' $config
cat >>$config <<'TOML'

[[hypervisor]]
uri = "qemu:///system"

[[account]]
name = "me"
groups = ["dev"]
keys = ["%[4]s"]
%[5]s
TOML
runuser -u bastion -- /usr/local/bin/bastion doctor --config $config %[6]s
exec runuser -u bastion -- /usr/local/bin/bastion serve --config $config
`, layers, repo, listen, key, defaultRule, web1)
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "bash", "-c", script)
	var output testenv.LockedBuffer
	cmd.Stdout = &output
	pipe, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		if t.Failed() {
			t.Logf("make install and bastion serve:\n%s", output.String())
		}
	})
	knownHosts := make(chan string, 1)
	go func() {
		s := bufio.NewScanner(pipe)
		next := false
		for s.Scan() {
			line := s.Text()
			output.Write([]byte(line + "\n"))
			if next {
				knownHosts <- line
			}
			next = line == "bastion: users add this line to ~/.ssh/known_hosts:"
		}
		close(knownHosts)
	}()
	select {
	case line, ok := <-knownHosts:
		if !ok {
			t.Fatalf("the installed bastion did not start")
		}
		write(t, filepath.Join(client.Dir, "known_hosts"), line+"\n")
	case <-time.After(5 * time.Minute):
		t.Fatalf("the installed bastion did not start in 5 minutes")
	}
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`(?m)^\[install\] /etc/bastion/bastion.toml \(from bastion.toml.example`),
		regexp.MustCompile(`(?m)^ok    vm ` + web1 + `: guest agent answers; `),
		regexp.MustCompile(`(?m)^0 problems, 0 warnings$`),
	} {
		if !want.MatchString(output.String()) {
			t.Errorf("no line matching %s", want)
		}
	}

	// What the install wrote, as the overlays hold it.
	for _, f := range []struct {
		path  string
		mode  os.FileMode
		owner string
	}{
		{"usr_local.upper/bin/bastion", 0o755, "root"},
		{"etc.upper/bastion", os.ModeDir | 0o750, "root"},
		{"etc.upper/bastion/bastion.toml", 0o640, "root"},
		{"var_lib.upper/bastion", os.ModeDir | 0o700, "bastion"},
		{"var_lib.upper/bastion/host_key", 0o600, "bastion"},
		{"etc.upper/systemd/system/bastion.service", 0o644, "root"},
		{"usr_local.upper/share/bash-completion/completions/bastion", 0o644, "root"},
	} {
		info, err := os.Stat(filepath.Join(layers, f.path))
		if err != nil {
			t.Errorf("%s: %v", f.path, err)
			continue
		}
		if info.Mode() != f.mode {
			t.Errorf("%s: mode %v, want %v", f.path, info.Mode(), f.mode)
		}
		uid := info.Sys().(*syscall.Stat_t).Uid
		if (f.owner == "root") != (uid == 0) {
			t.Errorf("%s: owned by uid %d, want %s", f.path, uid, f.owner)
		}
	}

	// A person through the installed bastion to a real guest.
	if r := client.Run(nil, "ssh", "-J", "bastion", "root@"+web1, "id -un; hostname"); r.Exit != 0 || string(r.Stdout) != "root\n"+web1+"\n" {
		t.Fatalf("ssh -J through the installed bastion: %v %q\n%s", r, r.Stdout, output.String())
	}
}

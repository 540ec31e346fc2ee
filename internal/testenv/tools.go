package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Ansible is Debian's ansible-core set up in a directory of its own, as a
// user's would be with its defaults for SSH: a ControlMaster connection
// kept by ControlPersist, ten forks.
type Ansible struct {
	t       testing.TB
	program string
	Dir     string
	Config  string // ansible.cfg
	Control string // the directory of ControlPersist sockets
}

// NewAnsible writes an ansible.cfg whose inventory is the lines of hosts
// (under [vms]), whose ssh runs with sshArgs (-F config, -J ...), and whose
// remote temporary files go under remoteTmp.
func NewAnsible(t testing.TB, hosts []string, sshArgs, remoteTmp string) *Ansible {
	t.Helper()
	a := &Ansible{t: t, program: Need(t, "ansible"), Dir: t.TempDir()}
	inventory := filepath.Join(a.Dir, "hosts")
	write(t, inventory, []byte("[vms]\n"+strings.Join(hosts, "\n")+"\n"), 0o600)
	// ssh's socket paths are short (108 bytes), and ansible adds to this one.
	control, err := os.MkdirTemp("", "cp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(control) })
	a.Control = control
	a.Config = filepath.Join(a.Dir, "ansible.cfg")
	write(t, a.Config, []byte(fmt.Sprintf(`[defaults]
inventory = %s
host_key_checking = False
interpreter_python = /usr/bin/python3
remote_tmp = %s/.ansible-remote
local_tmp = %s/local
forks = 10
[ssh_connection]
ssh_args = %s -o ControlMaster=auto -o ControlPersist=60s
control_path_dir = %s
control_path = %s/%%%%C
`, inventory, remoteTmp, a.Dir, sshArgs, a.Control, a.Control)), 0o600)
	return a
}

// Run runs `ansible args...` and returns its output, failing the test if
// it fails.
func (a *Ansible) Run(args ...string) string {
	a.t.Helper()
	cmd := exec.Command(a.program, args...)
	cmd.Env = append(os.Environ(), "ANSIBLE_CONFIG="+a.Config, "ANSIBLE_HOME="+filepath.Join(a.Dir, "home"), "ANSIBLE_NOCOLOR=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		a.t.Fatalf("ansible %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Sockets are the ControlPersist sockets ansible left open.
func (a *Ansible) Sockets() []string {
	entries, _ := os.ReadDir(a.Control)
	var out []string
	for _, e := range entries {
		out = append(out, filepath.Join(a.Control, e.Name()))
	}
	return out
}

// Git runs git in dir with env added to a neutral environment (no system
// or user configuration, a fixed author) and returns its output and exit
// code.
func Git(t testing.TB, dir string, env []string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(Need(t, "git"), args...)
	cmd.Dir = dir
	cmd.Env = append(append(os.Environ(), "GIT_CONFIG_NOSYSTEM=1", "HOME="+dir, "GIT_AUTHOR_NAME=a", "GIT_AUTHOR_EMAIL=a@example.com",
		"GIT_COMMITTER_NAME=a", "GIT_COMMITTER_EMAIL=a@example.com"), env...)
	out, err := cmd.CombinedOutput()
	code := 0
	if e, ok := err.(*exec.ExitError); ok {
		code = e.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return string(out), code
}

// GitRoundTrip is what a person does with a repository over SSH, with
// git's exact exit codes: a clone of url that speaks protocol v2, a commit
// of a file called name pushed back, a push that is not a fast-forward
// refused (exit 1), and a clone of a repository that is not there (128).
// env carries GIT_SSH_COMMAND.
func GitRoundTrip(t testing.TB, env []string, url, name string) {
	t.Helper()
	env = append(env, "GIT_SSH_VARIANT=ssh", "GIT_TRACE_PACKET=1")
	work := t.TempDir()
	out, code := Git(t, work, env, "clone", "-q", url, "w")
	if code != 0 || !strings.Contains(out, "clone< version 2") {
		t.Fatalf("git clone, protocol v2 through GIT_PROTOCOL: exit %d\n%s", code, out)
	}
	w := filepath.Join(work, "w")
	write(t, filepath.Join(w, name), []byte(name+"\n"), 0o644)
	Git(t, w, nil, "add", ".")
	if out, code := Git(t, w, nil, "commit", "-q", "-m", name); code != 0 {
		t.Fatalf("git commit: %s", out)
	}
	if out, code := Git(t, w, env, "pull", "-q", "--rebase", "origin", "main"); code != 0 && !strings.Contains(out, "couldn't find remote ref") {
		t.Fatalf("git pull: exit %d\n%s", code, out)
	}
	if out, code := Git(t, w, env, "push", "-q", "origin", "HEAD:main"); code != 0 {
		t.Fatalf("git push: exit %d\n%s", code, out)
	}
	Git(t, w, nil, "commit", "-q", "--amend", "-m", "rewritten")
	if out, code := Git(t, w, env, "push", "-q", "origin", "HEAD:main"); code != 1 || !strings.Contains(out, "rejected") {
		t.Fatalf("a push that is not a fast-forward: exit %d, want 1\n%s", code, out)
	}
	if out, code := Git(t, work, env, "clone", "-q", strings.TrimSuffix(url, "repo.git")+"nosuch.git", "x"); code != 128 {
		t.Fatalf("a clone of nothing: exit %d, want 128\n%s", code, out)
	}
}

// Package testenv starts the real programs the tests drive: OpenSSH's sshd
// standing in for a VM, and OpenSSH clients configured to reach it through
// the bastion. A program the tests need but cannot find or start fails the
// test with the reason; it never skips.
package testenv

import (
	"bufio"
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strings"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"
)

// SSHD is a running OpenSSH server on 127.0.0.1.
type SSHD struct {
	Addr    string          // 127.0.0.1:port
	HostKey gossh.PublicKey // its ed25519 host key
	Login   string          // the user it lets in: the one running the tests
	Dir     string          // its configuration and keys
}

// NewKey returns a fresh ed25519 signer and its private key in OpenSSH PEM.
func NewKey(t testing.TB) (gossh.Signer, []byte) {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := gossh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	block, err := gossh.MarshalPrivateKey(priv, "")
	if err != nil {
		t.Fatal(err)
	}
	return signer, pem.EncodeToMemory(block)
}

// Need fails the test unless program is installed, naming the script that
// installs it.
func Need(t testing.TB, program string) string {
	t.Helper()
	path, err := exec.LookPath(program)
	if err != nil {
		t.Fatalf("%s is not installed (make deps installs it): %v", program, err)
	}
	return path
}

// StartSSHD starts sshd on a free port of 127.0.0.1, letting in the current
// user with any of authorized. It is stopped when the test ends.
func StartSSHD(t testing.TB, authorized ...gossh.PublicKey) *SSHD {
	t.Helper()
	return StartSSHDOn(t, "", authorized...)
}

// StartSSHDOn is StartSSHD listening on addr (host:port); an empty addr
// means a free port of 127.0.0.1.
func StartSSHDOn(t testing.TB, listen string, authorized ...gossh.PublicKey) *SSHD {
	t.Helper()
	sshdPath := "/usr/sbin/sshd"
	if _, err := os.Stat(sshdPath); err != nil {
		sshdPath = Need(t, "sshd")
	}
	u, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 {
		// sshd's privilege separation directory.
		if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	signer, hostPEM := NewKey(t)
	write(t, filepath.Join(dir, "host_ed25519"), hostPEM, 0o600)
	var auth bytes.Buffer
	for _, k := range authorized {
		auth.Write(gossh.MarshalAuthorizedKey(k))
	}
	write(t, filepath.Join(dir, "authorized_keys"), auth.Bytes(), 0o600)
	// The login's shell starts in a home of its own, so that the dot files
	// of whoever runs the tests (a pyenv hook in root's .bashrc, say) do
	// not run in every session. Debian's bash reads ~/.bashrc even for
	// commands run by sshd.
	home := filepath.Join(dir, "home")
	if err := os.MkdirAll(home, 0o755); err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(home, ".bashrc"), nil, 0o644)

	for attempt := 0; ; attempt++ {
		addr := listen
		if addr == "" {
			addr = fmt.Sprintf("127.0.0.1:%d", freePort(t))
		}
		config := fmt.Sprintf(`ListenAddress %s
HostKey %s/host_ed25519
AuthorizedKeysFile %s/authorized_keys
PidFile none
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
AllowAgentForwarding yes
X11Forwarding no
AcceptEnv LANG LC_* BASTION_TEST_*
Subsystem sftp /usr/lib/openssh/sftp-server
SetEnv HOME=%s
LogLevel ERROR
`, addr, dir, dir, home)
		write(t, filepath.Join(dir, "sshd_config"), []byte(config), 0o600)
		cmd := exec.Command(sshdPath, "-D", "-e", "-f", filepath.Join(dir, "sshd_config"))
		var stderr LockedBuffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatalf("start sshd: %v", err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		t.Cleanup(func() {
			cmd.Process.Kill()
			<-exited
		})
		if err := WaitBanner(addr, exited, 10*time.Second); err != nil {
			if listen == "" && attempt < 3 && strings.Contains(stderr.String(), "Address already in use") {
				continue
			}
			t.Fatalf("sshd did not start: %v\n%s", err, stderr.String())
		}
		return &SSHD{Addr: addr, HostKey: signer.PublicKey(), Login: u.Username, Dir: dir}
	}
}

// WaitBanner waits until addr answers with an SSH banner, or exited (the
// server's Wait) reports that it ended.
func WaitBanner(addr string, exited <-chan error, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			return fmt.Errorf("exited: %v", err)
		default:
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.SetDeadline(time.Now().Add(2 * time.Second))
			line, _ := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if strings.HasPrefix(line, "SSH-2.0-") {
				return nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("no banner on %s within %v", addr, limit)
}

func freePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func write(t testing.TB, path string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatal(err)
	}
}

// Package testenv starts the real programs the tests drive: OpenSSH's sshd
// standing in for a VM, and OpenSSH clients configured to reach it through
// the bastion. A program the tests need but cannot find or start fails the
// test with the reason; it never skips.
//
// The functions taking a testing.TB are thin wrappers around ones that
// return an error (GenerateKey, StartSSHDWith), which the benchmark in
// bench/ uses outside of any test.
package testenv

import (
	"bufio"
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
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
	Home    string          // $HOME of its sessions (under Dir)
	Log     string          // the file sshd's standard error goes to

	cmd     *exec.Cmd
	done    chan struct{} // closed once the process has been waited for
	waitErr error
}

// Pid is the process id of what was started: sshd, or the program
// SSHDOptions.Command ran it under.
func (s *SSHD) Pid() int { return s.cmd.Process.Pid }

// Done is closed when the process has ended (and been waited for).
func (s *SSHD) Done() <-chan struct{} { return s.done }

// Stop kills the process (sshd, or what it runs under) and waits for it.
// It may be called more than once; it returns what Wait returned.
func (s *SSHD) Stop() error {
	s.cmd.Process.Kill() // once it has been waited for: an error, no signal
	<-s.done
	return s.waitErr
}

// SSHDOptions say how StartSSHDWith starts sshd. Its zero value but for
// Dir is what StartSSHD starts.
type SSHDOptions struct {
	// Dir holds the configuration, the keys, a home for the sessions and
	// sshd's log. It is created if need be; it must be given.
	Dir string
	// Listen is host:port; empty means a free port of 127.0.0.1 (and
	// another one if that was taken meanwhile).
	Listen string
	// Authorized are the keys it lets the users in with.
	Authorized []gossh.PublicKey
	// OtherUsers makes Dir traversable (0711) and authorized_keys
	// readable (0644) by every user, for an sshd that lets in users other
	// than the one running it: sshd reads authorized_keys as the user
	// logging in. Dir's parents must let that user through too.
	OtherUsers bool
	// Config is what the sshd_config says before the settings every sshd
	// here has (the listen address, the host key, the authorized keys,
	// public keys only, root with a key, no X11, a home of its own in Dir,
	// LogLevel ERROR). For most keywords sshd keeps the first value, so
	// Config may override those. Empty means TestConfig.
	Config string
	// Command makes the command that runs sshd (its path and arguments):
	// under a supervisor, say. Nil runs sshd itself. Its standard error is
	// set to the Log file unless Command set it.
	Command func(sshd string, args []string) *exec.Cmd
}

// TestConfig is the sshd_config the tests' sshd has on top of the common
// settings: forwarding, the environment the tests send, and sftp.
const TestConfig = `AllowTcpForwarding yes
AllowAgentForwarding yes
AcceptEnv LANG LC_* BASTION_TEST_* GIT_PROTOCOL
Subsystem sftp /usr/lib/openssh/sftp-server
`

// GenerateKey returns a fresh ed25519 signer and its private key in
// OpenSSH PEM.
func GenerateKey() (gossh.Signer, []byte, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	signer, err := gossh.NewSignerFromKey(priv)
	if err != nil {
		return nil, nil, err
	}
	block, err := gossh.MarshalPrivateKey(priv, "")
	if err != nil {
		return nil, nil, err
	}
	return signer, pem.EncodeToMemory(block), nil
}

// NewKey returns a fresh ed25519 signer and its private key in OpenSSH PEM.
func NewKey(t testing.TB) (gossh.Signer, []byte) {
	t.Helper()
	signer, pemBytes, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return signer, pemBytes
}

// Need fails the test unless program is installed, naming the script that
// installs it.
func Need(t testing.TB, program string) string {
	t.Helper()
	path, err := lookPath(program)
	if err != nil {
		t.Fatal(err)
	}
	return path
}

func lookPath(program string) (string, error) {
	path, err := exec.LookPath(program)
	if err != nil {
		return "", fmt.Errorf("%s is not installed (make deps installs it): %v", program, err)
	}
	return path, nil
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
	s, err := StartSSHDWith(SSHDOptions{Dir: t.TempDir(), Listen: listen, Authorized: authorized})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Stop() })
	return s
}

// StartSSHDWith starts sshd as opts say, letting in the current user (and,
// with OtherUsers, others) with any of opts.Authorized, and returns once it
// answers with its banner. The caller stops it.
func StartSSHDWith(opts SSHDOptions) (*SSHD, error) {
	if opts.Dir == "" {
		return nil, errors.New("sshd: no directory")
	}
	sshdPath := "/usr/sbin/sshd"
	if _, err := os.Stat(sshdPath); err != nil {
		if sshdPath, err = lookPath("sshd"); err != nil {
			return nil, err
		}
	}
	u, err := user.Current()
	if err != nil {
		return nil, err
	}
	if os.Geteuid() == 0 {
		// sshd's privilege separation directory.
		if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
			return nil, err
		}
	}
	dir := opts.Dir
	dirMode, keysMode := os.FileMode(0o700), os.FileMode(0o600)
	if opts.OtherUsers {
		dirMode, keysMode = 0o711, 0o644
	}
	if err := os.MkdirAll(dir, dirMode); err != nil {
		return nil, err
	}
	if err := os.Chmod(dir, dirMode); err != nil {
		return nil, err
	}
	signer, hostPEM, err := GenerateKey()
	if err != nil {
		return nil, err
	}
	if err := writeFile(filepath.Join(dir, "host_ed25519"), hostPEM, 0o600); err != nil {
		return nil, err
	}
	var auth bytes.Buffer
	for _, k := range opts.Authorized {
		auth.Write(gossh.MarshalAuthorizedKey(k))
	}
	if err := writeFile(filepath.Join(dir, "authorized_keys"), auth.Bytes(), keysMode); err != nil {
		return nil, err
	}
	// The login's shell starts in a home of its own, so that the dot files
	// of whoever runs the tests (a pyenv hook in root's .bashrc, say) do
	// not run in every session. Debian's bash reads ~/.bashrc even for
	// commands run by sshd.
	home := filepath.Join(dir, "home")
	if err := os.MkdirAll(home, 0o755); err != nil {
		return nil, err
	}
	if err := writeFile(filepath.Join(home, ".bashrc"), nil, 0o644); err != nil {
		return nil, err
	}
	extra := opts.Config
	if extra == "" {
		extra = TestConfig
	}
	cfgPath := filepath.Join(dir, "sshd_config")
	logPath := filepath.Join(dir, "sshd.log")

	for attempt := 0; ; attempt++ {
		addr := opts.Listen
		if addr == "" {
			port, err := freePort()
			if err != nil {
				return nil, err
			}
			addr = fmt.Sprintf("127.0.0.1:%d", port)
		}
		config := fmt.Sprintf(`%sListenAddress %s
HostKey %s/host_ed25519
AuthorizedKeysFile %s/authorized_keys
PidFile none
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
X11Forwarding no
SetEnv HOME=%s
LogLevel ERROR
`, extra, addr, dir, dir, home)
		if err := writeFile(cfgPath, []byte(config), 0o600); err != nil {
			return nil, err
		}
		s, err := startOnce(opts.Command, sshdPath, cfgPath, logPath)
		if err != nil {
			return nil, err
		}
		s.Addr, s.HostKey, s.Login, s.Dir, s.Home = addr, signer.PublicKey(), u.Username, dir, home
		exited := make(chan error, 1)
		go func() {
			<-s.done
			exited <- s.waitErr
		}()
		if err := WaitBanner(addr, exited, 10*time.Second); err != nil {
			s.Stop()
			log, _ := os.ReadFile(logPath)
			if opts.Listen == "" && attempt < 3 && strings.Contains(string(log), "Address already in use") {
				continue
			}
			return nil, fmt.Errorf("sshd did not start: %v\n%s", err, log)
		}
		return s, nil
	}
}

// startOnce starts sshd -D with the configuration at cfgPath, its standard
// error to a fresh file at logPath.
func startOnce(command func(string, []string) *exec.Cmd, sshdPath, cfgPath, logPath string) (*SSHD, error) {
	args := []string{"-D", "-e", "-f", cfgPath}
	var cmd *exec.Cmd
	if command != nil {
		cmd = command(sshdPath, args)
	} else {
		cmd = exec.Command(sshdPath, args...)
	}
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	// The child has its own copy of the descriptor; sshd writes to the
	// file itself, through nothing of this process.
	defer logFile.Close()
	if cmd.Stderr == nil {
		cmd.Stderr = logFile
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start sshd: %w", err)
	}
	s := &SSHD{Log: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		s.waitErr = cmd.Wait()
		close(s.done)
	}()
	return s, nil
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

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// writeFile writes data to path with mode, also when the file was there
// with another mode.
func writeFile(path string, data []byte, mode os.FileMode) error {
	if err := os.WriteFile(path, data, mode); err != nil {
		return err
	}
	return os.Chmod(path, mode)
}

func write(t testing.TB, path string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatal(err)
	}
}

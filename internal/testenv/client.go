package testenv

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"
)

// Client is a set of OpenSSH client files: a key, a known_hosts file and
// an ssh_config in which the host "bastion" is the bastion under test.
// Every command gets -F with that config, so nothing of the user's own
// ~/.ssh is read.
type Client struct {
	t         testing.TB
	Dir       string
	Config    string // path of the ssh_config
	Key       string // path of the private key
	PublicKey gossh.PublicKey
}

// NewClient writes the files of a client that logs in to the bastion at
// addr as account, trusting what knownHosts says (the bastion's
// "@cert-authority" line).
func NewClient(t testing.TB, addr, account, knownHosts string) *Client {
	t.Helper()
	Need(t, "ssh")
	dir := t.TempDir()
	signer, pemBytes := NewKey(t)
	c := &Client{t: t, Dir: dir, Config: filepath.Join(dir, "ssh_config"), Key: filepath.Join(dir, "id_ed25519"), PublicKey: signer.PublicKey()}
	write(t, c.Key, pemBytes, 0o600)
	write(t, filepath.Join(dir, "known_hosts"), []byte(knownHosts+"\n"), 0o600)
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	config := fmt.Sprintf("Host bastion\n  HostName %s\n  Port %s\n  User %s\nHost *\n", host, port, account) +
		ClientDefaults(c.Key, filepath.Join(dir, "known_hosts"), "INFO")
	write(t, c.Config, []byte(config), 0o600)
	return c
}

// ClientDefaults are the ssh_config lines, indented for a Host block, of a
// client that reads nothing of the user's own ~/.ssh or agent: only the
// key at identityFile, only the hosts in knownHosts (strictly), no
// prompts, no connection sharing, and logging at logLevel.
func ClientDefaults(identityFile, knownHosts, logLevel string) string {
	return fmt.Sprintf(`  IdentityFile %s
  IdentitiesOnly yes
  IdentityAgent none
  UserKnownHostsFile %s
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  UpdateHostKeys no
  BatchMode yes
  ControlMaster no
  ControlPath none
  LogLevel %s
`, identityFile, knownHosts, logLevel)
}

// Result is what a client command left behind.
type Result struct {
	Exit   int
	Stdout []byte
	Stderr string
}

func (r Result) String() string {
	return fmt.Sprintf("exit %d, stderr %q", r.Exit, r.Stderr)
}

// Command returns program (ssh, sftp, scp, rsync) with the client's config.
func (c *Client) Command(ctx context.Context, program string, args ...string) *exec.Cmd {
	c.t.Helper()
	Need(c.t, program)
	if program == "rsync" {
		// rsync takes its ssh through -e; the caller passes the rest.
		return exec.CommandContext(ctx, program, append([]string{"-e", "ssh -F " + c.Config}, args...)...)
	}
	return exec.CommandContext(ctx, program, append([]string{"-F", c.Config}, args...)...)
}

// Run runs program with args, stdin from stdin (if not nil), and waits at
// most five minutes.
func (c *Client) Run(stdin []byte, program string, args ...string) Result {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := c.Command(ctx, program, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		c.t.Fatalf("%s %v: timed out\nstderr: %s", program, args, stderr.String())
	}
	res := Result{Stdout: stdout.Bytes(), Stderr: stderr.String()}
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		res.Exit = exit.ExitCode()
	case err != nil:
		c.t.Fatalf("%s %v: %v", program, args, err)
	}
	return res
}

// LockedBuffer is a bytes.Buffer safe for a writer and a reader at once.
type LockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *LockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *LockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// RandomFile writes size pseudo-random bytes to a file in dir.
func RandomFile(t testing.TB, dir string, size int64) string {
	t.Helper()
	path := filepath.Join(dir, fmt.Sprintf("random-%d", size))
	if err := WriteRandomFile(path, size); err != nil {
		t.Fatal(err)
	}
	return path
}

// WriteRandomFile writes size pseudo-random bytes to a file at path: fast,
// and incompressible enough for transfer tests.
func WriteRandomFile(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	var state uint64 = uint64(time.Now().UnixNano()) | 1
	for written := int64(0); written < size; {
		for i := 0; i+8 <= len(buf); i += 8 {
			// xorshift64
			state ^= state << 13
			state ^= state >> 7
			state ^= state << 17
			binary.LittleEndian.PutUint64(buf[i:], state)
		}
		n := min(int64(len(buf)), size-written)
		if _, err := f.Write(buf[:n]); err != nil {
			f.Close()
			return err
		}
		written += n
	}
	return f.Close()
}

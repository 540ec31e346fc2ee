package trust

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"

	"golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/vm"
)

// Finding is the outcome of one step of Preflight: what it saw, or the
// error that stopped it.
type Finding struct {
	Step   string // "guest agent", "address", "host keys", "sshd"
	Detail string // what the step saw, when it held
	Err    error  // why it failed; nil when it held
}

// Preflight runs the steps of the dual-band check that change nothing in
// the guest, for `bastion doctor`: the agent answers, the address the
// hypervisor confirms, the host keys read through the agent, and the sshd
// at that address proving it holds one of them. It stops at the first step
// that fails, which is the last finding. It installs no key and writes no
// nonce, so what it cannot show is that a login accepts the bastion's key:
// the first connection shows that.
func (m *Manager) Preflight(ctx context.Context, d vm.Domain) []Finding {
	var found []Finding
	step := func(name, detail string, err error) bool {
		found = append(found, Finding{Step: name, Detail: detail, Err: err})
		return err == nil
	}
	if !d.Running {
		step("guest agent", "", fmt.Errorf("%w: %s", vm.ErrNotRunning, d.Name))
		return found
	}
	if !step("guest agent", "answers", m.OOB.Ping(ctx, d)) {
		return found
	}
	address, err := m.OOB.Address(ctx, d)
	confirmed := address.IP.String()
	if address.ConfirmedBy != "" {
		confirmed += " (" + address.ConfirmedBy + ")"
	}
	if !step("address", confirmed, err) {
		return found
	}
	hostKeys, err := m.readHostKeys(ctx, d)
	if !step("host keys", fmt.Sprintf("%d read through the agent", len(hostKeys)), err) {
		return found
	}
	port := m.SSHPort
	if port == 0 {
		port = 22
	}
	addr := net.JoinHostPort(address.IP.String(), strconv.Itoa(port))
	banner, proven, err := proveHostKey(ctx, addr, hostKeys)
	detail := ""
	if err == nil {
		detail = fmt.Sprintf("%s at %s proves host key %s", banner, addr, ssh.FingerprintSHA256(proven))
	}
	step("sshd", detail, err)
	return found
}

// proveHostKey opens an SSH connection to addr far enough for the server
// to prove it holds one of hostKeys (its key exchange signature), and no
// further: it offers no credentials. It returns the server's version line
// and the key it proved.
func proveHostKey(ctx context.Context, addr string, hostKeys []ssh.PublicKey) (string, ssh.PublicKey, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", nil, fmt.Errorf("%w: %w", ErrInBand, err)
	}
	defer conn.Close()
	if deadline, ok := ctx.Deadline(); ok {
		conn.SetDeadline(deadline)
	}
	config := keys.Upstream{HostKeys: hostKeys}.ClientConfig("bastion-doctor", "SSH-2.0-bastion-doctor")
	config.Auth = nil
	pinned := config.HostKeyCallback
	var proven ssh.PublicKey
	var version string
	config.HostKeyCallback = func(host string, remote net.Addr, key ssh.PublicKey) error {
		if err := pinned(host, remote, key); err != nil {
			return err
		}
		proven = key // called once the server's signature with key checked out
		return nil
	}
	seen := &versionConn{Conn: conn}
	_, _, _, err = ssh.NewClientConn(seen, addr, config)
	version = seen.version()
	switch {
	case proven != nil:
		// Authentication failed, as it must with no credentials offered;
		// the key exchange, which is what was asked, held.
		return version, proven, nil
	case errors.Is(err, keys.ErrHostKeyMismatch):
		return "", nil, err
	case version == "":
		return "", nil, fmt.Errorf("%w: %s accepts connections but sends no SSH version line (is it sshd?): %w", ErrInBand, addr, err)
	default:
		return "", nil, fmt.Errorf("%w: %w", ErrInBand, err)
	}
}

// versionConn keeps the first line the server sends: its SSH version.
type versionConn struct {
	net.Conn
	first []byte
}

func (c *versionConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if len(c.first) < 256 && !strings.Contains(string(c.first), "\n") {
		c.first = append(c.first, p[:min(n, 256-len(c.first))]...)
	}
	return n, err
}

func (c *versionConn) version() string { return VersionLine(c.first) }

// VersionLine is the SSH version line at the start of what a server sent
// first ("SSH-2.0-OpenSSH_9.2p1 …"), made printable for an operator's
// terminal (it is the server's choice of bytes), or "" if it sent none.
func VersionLine(first []byte) string {
	line, _, _ := strings.Cut(string(first), "\n")
	line = strings.TrimSpace(line)
	if !strings.HasPrefix(line, "SSH-") {
		return ""
	}
	return strings.Map(func(r rune) rune {
		if r < ' ' || r > '~' {
			return '?'
		}
		return r
	}, line)
}

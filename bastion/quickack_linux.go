package bastion

import (
	"net"
	"syscall"
)

// quickAcker returns a function that asks Linux to acknowledge at once
// what arrives next on c, a TCP connection (behind a PROXY protocol
// reader or not); nil for any other connection.
//
// Why: OpenSSH's client leaves Nagle's algorithm on for a session without
// a terminal (ssh host true, sftp, scp, ProxyJump's -W), so a second small
// packet waits until the first is acknowledged, and Linux delays an
// acknowledgment by up to 40 ms when it has nothing to send back. The
// client writes in pairs where the bastion has nothing to answer between
// them (its key exchange reply after the server's KEXINIT, env requests
// before exec), and each pair stalled a connection's setup by 40 ms; an
// sshd happens to answer sooner. Measured with strace on the ssh client,
// login@vm@bastion true: 195 ms, of it 162 ms in three such waits; 57 ms
// with quick acknowledgments.
func quickAcker(c net.Conn) func() {
	if pc, ok := c.(interface{ Raw() net.Conn }); ok {
		c = pc.Raw()
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return nil
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	set := func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_QUICKACK, 1) }
	// Quick acknowledgment is not a lasting mode: the kernel leaves it
	// again as it sees fit, so it is asked for before every read.
	return func() { raw.Control(set) }
}

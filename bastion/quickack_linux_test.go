package bastion

import (
	"net"
	"syscall"
	"testing"
)

func quickAckSet(t *testing.T, c *net.TCPConn) bool {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	raw.Control(func(fd uintptr) { v, err = syscall.GetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_QUICKACK) })
	if err != nil {
		t.Fatal(err)
	}
	return v == 1
}

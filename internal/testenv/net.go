package testenv

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"testing"
	"time"
)

// FreeAddr returns a 127.0.0.1 address nothing listens on right now.
func FreeAddr(t testing.TB) string {
	t.Helper()
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("127.0.0.1:%d", port)
}

// WaitListening waits up to a minute until something accepts on addr.
func WaitListening(t testing.TB, addr string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("nothing listens on %s", addr)
}

// SHA256File returns the hex SHA-256 of the file at path.
func SHA256File(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

// WaitUnix waits up to ten seconds until a unix socket accepts at path.
func WaitUnix(t testing.TB, path string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("nothing listens on %s", path)
}

// Dial connects to addr over TCP, failing the test if it cannot within ten
// seconds.
func Dial(t testing.TB, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// EchoThrough sends 1 MiB through conn, which leads to an echo server,
// half-closes it and requires every byte back, then closes it.
func EchoThrough(t testing.TB, conn net.Conn) {
	t.Helper()
	defer conn.Close()
	payload := make([]byte, 1<<20)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	go func() {
		conn.Write(payload)
		conn.(interface{ CloseWrite() error }).CloseWrite()
	}()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	got, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if sha256.Sum256(got) != sha256.Sum256(payload) {
		t.Fatalf("echo: got %d bytes, want the %d sent", len(got), len(payload))
	}
}

// SOCKSConnect opens a SOCKS5 CONNECT to target (IPv4 host:port) through
// the proxy at socks (ssh -D).
func SOCKSConnect(t testing.TB, socks, target string) net.Conn {
	t.Helper()
	c := Dial(t, socks)
	host, portText, _ := net.SplitHostPort(target)
	port, err := strconv.ParseUint(portText, 10, 16)
	if err != nil {
		t.Fatalf("socks target %s: %v", target, err)
	}
	req := append([]byte{5, 1, 0, 5, 1, 0, 1}, net.ParseIP(host).To4()...)
	c.Write(binary.BigEndian.AppendUint16(req, uint16(port)))
	reply := make([]byte, 2+10)
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.ReadFull(c, reply); err != nil || reply[0] != 5 || reply[1] != 0 || reply[3] != 0 {
		t.Fatalf("socks handshake: %v %v", reply, err)
	}
	c.SetDeadline(time.Time{})
	return c
}

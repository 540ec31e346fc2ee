package bastion_test

import (
	"bytes"
	"fmt"
	"io"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/internal/testenv"
)

// The benchmarks here push bytes through the bastion's whole data path
// (front door, the ProxyJump inner hop, the upstream connection to a real
// sshd standing in for the VM) with x/crypto's client doing what
// `ssh -J bastion login@web1 cat` does. The client runs in the benchmark's
// process, so the figures count its work with the bastion's: a quick,
// relative measure for the inner loop. `make bench` is the comparison
// with OpenSSH.
//
//	go test -run '^$' -bench ProxyJump -benchtime 4x .

const benchTransfer = 64 << 20

// jumpClient returns an SSH client to web1 through the fixture's bastion,
// as ProxyJump makes one: a direct-tcpip channel to web1:22 on the outer
// connection, and an SSH connection inside it. Both hops offer only
// cipher.
func jumpClient(b *testing.B, f *fixture, cipher string) *gossh.Client {
	b.Helper()
	outer := f.goClient("alice", cipher)
	conn, err := outer.Dial("tcp", "web1:22")
	if err != nil {
		b.Fatal(err)
	}
	c, chans, reqs, err := gossh.NewClientConn(conn, "web1:22", &gossh.ClientConfig{
		User:            f.login,
		HostKeyCallback: f.hostCAChecker().CheckHostKey,
		Timeout:         10 * time.Second,
		Config:          gossh.Config{Ciphers: []string{cipher}},
	})
	if err != nil {
		b.Fatal(err)
	}
	inner := gossh.NewClient(c, chans, reqs)
	b.Cleanup(func() { inner.Close() })
	return inner
}

var benchCiphers = []string{"aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"}

// offerBenchCiphers has the bastion offer every cipher measured, whatever
// its default on this CPU.
func offerBenchCiphers(s *bastion.Server) { s.Ciphers = benchCiphers }

func BenchmarkProxyJumpDownload(b *testing.B) {
	f := newFixture(b, offerBenchCiphers)
	file := testenv.RandomFile(b, b.TempDir(), benchTransfer)
	for _, cipher := range benchCiphers {
		b.Run(cipher, func(b *testing.B) {
			client := jumpClient(b, f, cipher)
			b.SetBytes(benchTransfer)
			for i := 0; i < b.N; i++ {
				s, err := client.NewSession()
				if err != nil {
					b.Fatal(err)
				}
				out, _ := s.StdoutPipe()
				if err := s.Start("cat " + file); err != nil {
					b.Fatal(err)
				}
				n, err := io.Copy(io.Discard, out)
				if err != nil || n != benchTransfer {
					b.Fatalf("read %d bytes, %v", n, err)
				}
				if err := s.Wait(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkProxyJumpUpload(b *testing.B) {
	f := newFixture(b, offerBenchCiphers)
	chunk := bytes.Repeat([]byte("0123456789abcdef"), 4096) // 64 KiB
	for _, cipher := range benchCiphers {
		b.Run(cipher, func(b *testing.B) {
			client := jumpClient(b, f, cipher)
			b.SetBytes(benchTransfer)
			for i := 0; i < b.N; i++ {
				s, err := client.NewSession()
				if err != nil {
					b.Fatal(err)
				}
				var count bytes.Buffer
				s.Stdout = &count
				in, _ := s.StdinPipe()
				if err := s.Start("wc -c"); err != nil {
					b.Fatal(err)
				}
				for sent := 0; sent < benchTransfer; sent += len(chunk) {
					if _, err := in.Write(chunk); err != nil {
						b.Fatal(err)
					}
				}
				in.Close()
				if err := s.Wait(); err != nil {
					b.Fatal(err)
				}
				if got := bytes.TrimSpace(count.Bytes()); string(got) != fmt.Sprint(benchTransfer) {
					b.Fatalf("the VM counted %s bytes, want %d", got, benchTransfer)
				}
			}
		})
	}
}

package vmtest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bastionvm/bastion/internal/testenv"
)

// transferSize is smaller than the local suite's 256 MiB: the guest's
// sshd runs under TCG at about 5 MB/s.
const transferSize = 32 << 20

// TestClientMatrix runs the core path's client matrix against a real
// guest through a bastion that verified it.
func TestClientMatrix(t *testing.T) {
	b := startBastion(t, "")
	root := "root@" + web1

	t.Run("exit status", func(t *testing.T) {
		if res := b.ssh(nil, root, "exit 42"); res.Exit != 42 {
			t.Fatalf("exit 42: %v", res)
		}
		res := b.ssh(nil, root, "hostname; echo err >&2")
		if res.Exit != 0 || string(res.Stdout) != web1+"\n" || !strings.Contains(res.Stderr, "err") {
			t.Fatalf("hostname: %v %q", res, res.Stdout)
		}
	})
	t.Run("signal", func(t *testing.T) {
		if res := b.ssh(nil, root, "kill -TERM $$"); res.Exit != 255 {
			t.Fatalf("kill -TERM $$: %v", res)
		}
	})
	t.Run("stdin to EOF", func(t *testing.T) {
		var in bytes.Buffer
		for i := 0; i < 20000; i++ {
			fmt.Fprintf(&in, "%05d\n", (i*7919)%20000)
		}
		res := b.ssh(in.Bytes(), root, "sort | sha256sum")
		var sorted bytes.Buffer
		for i := 0; i < 20000; i++ {
			fmt.Fprintf(&sorted, "%05d\n", i)
		}
		want := fmt.Sprintf("%x  -\n", sha256.Sum256(sorted.Bytes()))
		if res.Exit != 0 || string(res.Stdout) != want {
			t.Fatalf("sort: %v %q, want %q", res, res.Stdout, want)
		}
	})
	t.Run("pty", func(t *testing.T) {
		p, err := testenv.OpenPty(33, 111)
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		cmd := b.client.Command(ctx, "ssh", "-tt", "-J", "bastion", root, "stty size; tty")
		cmd.Stdin, cmd.Stdout, cmd.Stderr = p.Slave, p.Slave, p.Slave
		cmd.SysProcAttr = p.Attr()
		if err := cmd.Run(); err != nil {
			t.Fatalf("ssh -tt: %v", err)
		}
		p.Slave.Close()
		out, _ := io.ReadAll(p.Master)
		if !strings.Contains(string(out), "33 111") || !strings.Contains(string(out), "/dev/pts/") {
			t.Fatalf("ssh -tt: %q", out)
		}
	})

	local := t.TempDir()
	src := testenv.RandomFile(t, local, transferSize)
	want := testenv.SHA256File(t, src)
	remoteSum := func(path string) string {
		res := b.ssh(nil, root, "sha256sum "+path+" && rm "+path)
		sum, _, _ := strings.Cut(string(res.Stdout), " ")
		return sum
	}
	run := func(t *testing.T, program string, args ...string) {
		t.Helper()
		if res := b.client.Run(nil, program, args...); res.Exit != 0 {
			t.Fatalf("%s %v: %v", program, args, res)
		}
	}
	t.Run("sftp", func(t *testing.T) {
		batch := filepath.Join(local, "batch")
		write(t, batch, fmt.Sprintf("put %s /root/sftp\nget /root/sftp %s/sftp-get\n", src, local))
		run(t, "sftp", "-J", "bastion", "-b", batch, root)
		if testenv.SHA256File(t, local+"/sftp-get") != want || remoteSum("/root/sftp") != want {
			t.Fatal("sftp: bytes differ")
		}
	})
	for _, mode := range []string{"-s", "-O"} {
		t.Run("scp "+mode, func(t *testing.T) {
			run(t, "scp", mode, "-J", "bastion", src, root+":/root/scp")
			run(t, "scp", mode, "-J", "bastion", root+":/root/scp", local+"/scp-get")
			if testenv.SHA256File(t, local+"/scp-get") != want || remoteSum("/root/scp") != want {
				t.Fatalf("scp %s: bytes differ", mode)
			}
		})
	}
	t.Run("cat", func(t *testing.T) {
		data, _ := os.ReadFile(src)
		if res := b.ssh(data, root, "cat > /root/cat"); res.Exit != 0 {
			t.Fatal(res)
		}
		res := b.ssh(nil, root, "cat /root/cat")
		if fmt.Sprintf("%x", sha256.Sum256(res.Stdout)) != want || remoteSum("/root/cat") != want {
			t.Fatalf("cat: %d bytes, differ", len(res.Stdout))
		}
	})
	t.Run("rsync", func(t *testing.T) {
		run(t, "rsync", "-a", "-e", "ssh -F "+b.client.Config+" -J bastion", src, root+":/root/rsync")
		if remoteSum("/root/rsync") != want {
			t.Fatal("rsync: bytes differ")
		}
	})
	t.Run("local forward to the VM's loopback", func(t *testing.T) {
		local := testenv.FreeAddr(t)
		stop := background(t, b, "-N", "-o", "ExitOnForwardFailure=yes", "-L", local+":127.0.0.1:22", root)
		defer stop()
		banner := readBanner(t, local)
		if !strings.HasPrefix(banner, "SSH-2.0-OpenSSH") {
			t.Fatalf("-L to the VM's sshd: banner %q", banner)
		}
	})
	t.Run("dynamic forward", func(t *testing.T) {
		socks := testenv.FreeAddr(t)
		stop := background(t, b, "-N", "-o", "ExitOnForwardFailure=yes", "-D", socks, root)
		defer stop()
		testenv.WaitListening(t, socks)
		c, err := net.Dial("tcp", socks)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		c.Write([]byte{5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 22})
		reply := make([]byte, 12)
		if _, err := io.ReadFull(c, reply); err != nil || reply[1] != 0 || reply[3] != 0 {
			t.Fatalf("socks: %v %v", reply, err)
		}
		line := make([]byte, 15)
		io.ReadFull(c, line)
		if string(line) != "SSH-2.0-OpenSSH" {
			t.Fatalf("-D to the VM's sshd: %q", line)
		}
	})
	t.Run("remote forward", func(t *testing.T) {
		echo, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer echo.Close()
		go func() {
			for {
				c, err := echo.Accept()
				if err != nil {
					return
				}
				go func() { io.Copy(c, c); c.Close() }()
			}
		}()
		stop := background(t, b, "-N", "-o", "ExitOnForwardFailure=yes", "-R", "127.0.0.1:9000:"+echo.Addr().String(), root)
		defer stop()
		var res testenv.Result
		for i := 0; i < 50; i++ {
			res = b.ssh(nil, root, `bash -c 'exec 3<>/dev/tcp/127.0.0.1/9000 && printf through-R >&3 && timeout 10 head -c 9 <&3'`)
			if res.Exit == 0 {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if res.Exit != 0 || string(res.Stdout) != "through-R" {
			t.Fatalf("-R: %v %q", res, res.Stdout)
		}
	})
	t.Run("unprivileged login", func(t *testing.T) {
		res := b.ssh(nil, "user@"+web1, "id -un")
		if res.Exit != 0 || string(res.Stdout) != "user\n" {
			t.Fatalf("user@%s: %v %q", web1, res, res.Stdout)
		}
	})
	t.Run("trust ls", func(t *testing.T) {
		out := b.trustLs()
		for _, want := range []string{web1 + "  root   trusted", guests[web1].IP + ":22", "SHA256:", "[ob-ib ib-ob]"} {
			if !strings.Contains(out, want) {
				t.Errorf("trust ls lacks %q:\n%s", want, out)
			}
		}
	})
	t.Run("audit", func(t *testing.T) {
		if len(b.auditEvents("trust_verified")) < 2 {
			t.Errorf("want trust_verified events for root and user, got %v", b.auditEvents("trust_verified"))
		}
	})
}

// background starts ssh -J bastion args... and returns a stop function.
func background(t *testing.T, b *bastionProc, args ...string) func() {
	_, stop := b.hold(t, append([]string{"-J", "bastion"}, args...)...)
	return stop
}

func readBanner(t *testing.T, addr string) string {
	t.Helper()
	testenv.WaitListening(t, addr)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 64)
	n, _ := io.ReadAtLeast(c, buf, 15)
	return string(buf[:n])
}

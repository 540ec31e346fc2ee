package bastion_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/internal/testenv"
)

// direct runs ssh straight to the stand-in VM's sshd, bypassing the
// bastion, to learn what a user would see without it.
func (f *fixture) direct(args ...string) testenv.Result {
	f.t.Helper()
	host, port, _ := net.SplitHostPort(f.vm.Addr)
	known := filepath.Join(f.t.TempDir(), "known_hosts")
	os.WriteFile(known, []byte(fmt.Sprintf("[%s]:%s %s", host, port, marshal(f.vm.HostKey))), 0o600)
	return f.client.Run(nil, "ssh", append([]string{"-o", "UserKnownHostsFile=" + known, "-i", f.upstreamKeyPath, "-p", port, f.login + "@" + host}, args...)...)
}

func TestRemoteSignal(t *testing.T) {
	f := newFixture(t)
	want := f.direct("kill -TERM $$")
	got := f.jump(nil, "kill -TERM $$")
	if got.Exit != want.Exit || got.Exit != 255 {
		t.Fatalf("kill -TERM $$ through the bastion: %v; directly: %v", got, want)
	}
	// OpenSSH shows a signal only as exit 255; x/crypto names it.
	session, err := f.goClient(f.login + "@web1").NewSession()
	if err != nil {
		t.Fatal(err)
	}
	err = session.Run("kill -TERM $$")
	var exit *gossh.ExitError
	if !errors.As(err, &exit) || exit.Signal() != "TERM" {
		t.Fatalf("want exit signal TERM, got %v", err)
	}
}

func TestPTYSizeAndWindowChange(t *testing.T) {
	f := newFixture(t)
	p, err := testenv.OpenPty(24, 80)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := f.client.Command(ctx, "ssh", "-tt", "-J", "bastion", f.login+"@web1",
		`stty size; while read line; do stty size; done`)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = p.Slave, p.Slave, p.Slave
	cmd.SysProcAttr = p.Attr()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	lines := make(chan string, 100)
	go func() {
		r := bufio.NewReader(p.Master)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				close(lines)
				return
			}
			lines <- strings.TrimSpace(line)
		}
	}()
	expect := func(want string, poke func()) {
		t.Helper()
		timeout := time.After(30 * time.Second)
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case line, ok := <-lines:
				if !ok {
					t.Fatalf("terminal closed before %q", want)
				}
				if line == want {
					return
				}
			case <-tick.C:
				if poke != nil {
					poke()
				}
			case <-timeout:
				t.Fatalf("remote side never printed %q", want)
			}
		}
	}
	expect("24 80", nil)
	if err := p.Resize(50, 132); err != nil {
		t.Fatal(err)
	}
	expect("50 132", func() { p.Master.Write([]byte("\n")) })
}

// transferFile is the size of the large transfer tests.
const transferFile = 256 << 20

func TestLargeTransfers(t *testing.T) {
	f := newFixture(t)
	local := t.TempDir()
	remote := t.TempDir() // the stand-in VM's file system is this one
	src := testenv.RandomFile(t, local, transferFile)
	want := testenv.SHA256File(t, src)
	target := f.login + "@web1"
	check := func(name, path string) {
		t.Helper()
		if got := testenv.SHA256File(t, path); got != want {
			t.Errorf("%s: %s differs from the source", name, path)
		}
		os.Remove(path)
	}
	run := func(name string, stdin []byte, program string, args ...string) testenv.Result {
		t.Helper()
		res := f.client.Run(stdin, program, args...)
		if res.Exit != 0 {
			t.Fatalf("%s: %v", name, res)
		}
		return res
	}

	batch := filepath.Join(local, "batch")
	os.WriteFile(batch, []byte(fmt.Sprintf("put %s %s/sftp-put\nget %s/sftp-put %s/sftp-get\n", src, remote, remote, local)), 0o600)
	run("sftp", nil, "sftp", "-J", "bastion", "-b", batch, target)
	check("sftp get", filepath.Join(local, "sftp-get"))
	check("sftp put", filepath.Join(remote, "sftp-put"))

	for _, mode := range []struct{ name, flag string }{{"scp", "-s"}, {"scp -O", "-O"}} {
		run(mode.name+" upload", nil, "scp", mode.flag, "-J", "bastion", src, target+":"+remote+"/scp-up")
		run(mode.name+" download", nil, "scp", mode.flag, "-J", "bastion", target+":"+remote+"/scp-up", local+"/scp-down")
		check(mode.name+" download", local+"/scp-down")
		check(mode.name+" upload", remote+"/scp-up")
	}

	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	run("cat upload", data, "ssh", "-J", "bastion", target, "cat > "+remote+"/cat-up")
	check("cat upload", remote+"/cat-up")
	res := run("cat download", nil, "ssh", "-J", "bastion", target, "cat "+src)
	if fmt.Sprintf("%x", sha256.Sum256(res.Stdout)) != want {
		t.Errorf("cat download: %d bytes differ from the source", len(res.Stdout))
	}
}

func TestRsync(t *testing.T) {
	f := newFixture(t)
	local := t.TempDir()
	remote := t.TempDir()
	for i := 0; i < 20; i++ {
		os.WriteFile(filepath.Join(local, fmt.Sprintf("f%02d", i)), []byte(strings.Repeat(fmt.Sprint(i), 1000*i)), 0o644)
	}
	res := f.client.Run(nil, "rsync", "-a", "-e", "ssh -F "+f.client.Config+" -J bastion", local+"/", f.login+"@web1:"+remote+"/")
	if res.Exit != 0 {
		t.Fatalf("rsync: %v", res)
	}
	for i := 0; i < 20; i++ {
		name := fmt.Sprintf("f%02d", i)
		if testenv.SHA256File(t, filepath.Join(local, name)) != testenv.SHA256File(t, filepath.Join(remote, name)) {
			t.Errorf("rsync: %s differs", name)
		}
	}
}

// background starts ssh with args, returning its stderr, and stops it
// when the test ends.
func (f *fixture) background(args ...string) *testenv.LockedBuffer {
	f.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := f.client.Command(ctx, "ssh", args...)
	stderr := &testenv.LockedBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() {
		cancel()
		cmd.Wait()
		if f.t.Failed() {
			f.t.Logf("ssh %v: %s", args, stderr.String())
		}
	})
	return stderr
}

// waitFor polls cond for up to 30 seconds.
func waitFor(t *testing.T, cond func() bool, msg func() string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal(msg())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestLocalForward(t *testing.T) {
	f := newFixture(t)
	echo := startEcho(t)
	local := testenv.FreeAddr(t)
	f.background("-N", "-o", "ExitOnForwardFailure=yes", "-J", "bastion", "-L", local+":"+echo.addr, f.login+"@web1")
	testenv.WaitListening(t, local)
	testenv.EchoThrough(t, testenv.Dial(t, local))
}

func TestDynamicForward(t *testing.T) {
	f := newFixture(t)
	echo := startEcho(t)
	socks := testenv.FreeAddr(t)
	f.background("-N", "-o", "ExitOnForwardFailure=yes", "-J", "bastion", "-D", socks, f.login+"@web1")
	testenv.WaitListening(t, socks)
	testenv.EchoThrough(t, testenv.SOCKSConnect(t, socks, echo.addr))
}

func TestRemoteForward(t *testing.T) {
	f := newFixture(t)
	echo := startEcho(t)
	remote := testenv.FreeAddr(t) // bound by the VM's sshd, which here shares the host's loopback
	f.background("-N", "-o", "ExitOnForwardFailure=yes", "-J", "bastion", "-R", remote+":"+echo.addr, f.login+"@web1")
	testenv.WaitListening(t, remote)
	testenv.EchoThrough(t, testenv.Dial(t, remote))
	if echo.count() < 1 {
		t.Fatal("the echo server behind the client saw no connection")
	}
}

func TestFrameOrder(t *testing.T) {
	f := newFixture(t)
	// ssh -vv logs each channel message it receives, in order: a real
	// client as the frame recorder. The outer hop runs as a quiet
	// ProxyCommand so that only the inner session is logged.
	proxy := fmt.Sprintf("ssh -F %s -W %%h:%%p bastion", f.client.Config)
	for i := 0; i < 5; i++ {
		res := f.ssh(nil, "-vv", "-o", "LogLevel=DEBUG2", "-o", "ProxyCommand="+proxy, f.login+"@web1", "head -c 100000 /dev/zero; exit 3")
		if res.Exit != 3 || len(res.Stdout) != 100000 {
			t.Fatalf("got %v and %d bytes", res, len(res.Stdout))
		}
		order := regexp.MustCompile(`channel 0: rcvd eof|channel 0: rcvd close|client_input_channel_req: channel 0 rtype exit-status`).FindAllString(res.Stderr, -1)
		want := []string{"client_input_channel_req: channel 0 rtype exit-status", "channel 0: rcvd eof", "channel 0: rcvd close"}
		if strings.Join(order, "|") != strings.Join(want, "|") {
			t.Fatalf("frames in order %q, want %q", order, want)
		}
	}
}

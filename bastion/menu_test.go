package bastion_test

import (
	"bufio"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/internal/testenv"
	"github.com/bastionvm/bastion/keys"
)

func TestMenuWithoutTerminalLists(t *testing.T) {
	f := newFixture(t)
	f.fleet.Set("web2", keys.Upstream{}) // listed: the policy allows web*
	f.fleet.Set("db1", keys.Upstream{})  // not listed
	res := f.ssh(nil, "bastion")
	out := string(res.Stdout)
	if res.Exit != 0 || !strings.Contains(out, "1) web1") || !strings.Contains(out, "2) web2") || strings.Contains(out, "db1") {
		t.Fatalf("ssh bastion without a terminal: %v\n%s", res, out)
	}
}

func TestMenuConnectsToPickedVM(t *testing.T) {
	recordings := t.TempDir()
	f := newFixture(t, recordTo(recordings, 0))
	p, err := testenv.OpenPty(24, 80)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := f.client.Command(ctx, "ssh", "-tt", "bastion")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = p.Slave, p.Slave, p.Slave
	cmd.SysProcAttr = p.Attr()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p.Slave.Close()
	screen := make(chan string, 1000)
	go func() {
		r := bufio.NewReader(p.Master)
		var sb strings.Builder
		for {
			b, err := r.ReadByte()
			if err != nil {
				close(screen)
				return
			}
			sb.WriteByte(b)
			screen <- sb.String()
		}
	}()
	var last string
	waitScreen := func(want string) {
		t.Helper()
		timeout := time.After(30 * time.Second)
		for {
			select {
			case s, ok := <-screen:
				if !ok {
					t.Fatalf("terminal closed before %q", want)
				}
				last = s
				if strings.Contains(s, want) {
					return
				}
			case <-timeout:
				t.Fatalf("never saw %q; the screen:\n%s", want, last)
			}
		}
	}
	waitScreen("Choose a VM")
	p.Master.Write([]byte("9\r"))
	waitScreen(`No VM "9" on the list.`)
	p.Master.Write([]byte("1\r"))
	waitScreen("Connecting to " + f.login + "@web1")
	p.Master.Write([]byte("stty size; echo sum=$((40+2)); exit 5\r"))
	waitScreen("sum=42")
	waitScreen("24 80")
	if err := cmd.Wait(); err == nil || cmd.ProcessState.ExitCode() != 5 {
		t.Fatalf("ssh ended with %v, want exit 5 from the VM's shell", err)
	}
	f.audit.wait(t, audit.Disconnected, "web1", 1)
	// The shell picked from the menu is a session like another.
	f.audit.wait(t, audit.SessionEnd, "web1", 1)
	start, end := f.audit.of(audit.SessionStart)[0], f.audit.of(audit.SessionEnd)[0]
	if start.Kind != "shell" || start.Term == "" || start.Cols != 80 || start.Rows != 24 || start.Session != f.audit.of(audit.Login)[0].Session {
		t.Fatalf("session_start: %+v %+v", start, start.Activity)
	}
	if end.ExitStatus == nil || *end.ExitStatus != 5 || end.BytesDown == 0 || end.BytesUp == 0 || end.ChannelID != start.ChannelID {
		t.Fatalf("session_end: %+v", end.Activity)
	}
	// And recorded like another.
	if _, evs := castEvents(t, sealed(t, recordings, end)); !strings.Contains(of(evs, "o"), "sum=42") {
		t.Fatalf("the menu session's cast: %v", evs)
	}
}

// A command that is not the bastion's, sent to the bastion itself (an IDE
// or a script given the bastion as its host), fails as a shell's unknown
// command does: exit 127, a message on stderr, no menu, no list.
func TestCommandForAVMSentToTheBastion(t *testing.T) {
	f := newFixture(t)
	res := f.ssh(nil, "bastion", "bash")
	if res.Exit != 127 || len(res.Stdout) != 0 || !strings.Contains(res.Stderr, `bastion: "bash" is not a command of the bastion`) {
		t.Fatalf("ssh bastion bash: %v %q, want exit 127, the message and nothing on stdout", res, res.Stdout)
	}
	// With a terminal: the message, and no menu.
	res = f.ssh(nil, "-tt", "bastion", "uname -a")
	if out := string(res.Stdout) + res.Stderr; res.Exit != 127 || !strings.Contains(out, `bastion: "uname" is not a command of the bastion`) ||
		strings.Contains(out, "web1") || strings.Contains(out, "Choose a VM") {
		t.Fatalf("ssh -tt bastion 'uname -a': %v %q", res, out)
	}
	// sftp to the bastion itself: refused, with no menu either.
	res = f.client.Run([]byte("ls\n"), "sftp", "-b", "-", "bastion")
	if res.Exit == 0 || strings.Contains(string(res.Stdout), "web1") {
		t.Fatalf("sftp bastion: %v %q", res, res.Stdout)
	}
}

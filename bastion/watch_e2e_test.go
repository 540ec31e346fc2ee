package bastion_test

import (
	"context"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/internal/testenv"
	"github.com/bastionvm/bastion/policy"
)

// TestWatch: alice works in a shell on web1 through ProxyJump; carol, an
// auditor the policy allows to watch web*, runs `ssh carol@bastion watch
// ID` with OpenSSH's ssh and sees what alice types and its output, and
// nothing carol types reaches alice's shell. Dave, with no watch rule,
// gets the same answer as for a session that does not exist. When alice
// exits, carol's watch ends with the reason.
func TestWatch(t *testing.T) {
	f := newFixture(t)
	carol := testenv.NewClient(t, f.addr, "carol", f.host.KnownHostsLine())
	dave := testenv.NewClient(t, f.addr, "dave", f.host.KnownHostsLine())
	f.setAccounts(
		bastion.Account{Name: "alice", Groups: []string{"dev"}, Keys: []gossh.PublicKey{f.client.PublicKey}},
		bastion.Account{Name: "carol", Groups: []string{"auditors"}, Keys: []gossh.PublicKey{carol.PublicKey}},
		bastion.Account{Name: "dave", Groups: []string{"ops"}, Keys: []gossh.PublicKey{dave.PublicKey}},
	)
	f.rules(f.devRule(), policy.Rule{Name: "audit", Effect: policy.Allow, Groups: []string{"auditors"}, VMs: []string{"web*"}, Channels: []policy.Channel{policy.Watch}})

	p, err := testenv.OpenPty(24, 80)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	shell := f.client.Command(ctx, "ssh", "-tt", "-J", "bastion", f.login+"@web1")
	shell.Stdin, shell.Stdout, shell.Stderr = p.Slave, p.Slave, p.Slave
	shell.SysProcAttr = p.Attr()
	if err := shell.Start(); err != nil {
		t.Fatal(err)
	}
	p.Slave.Close()
	alice := watchScreen(p)
	p.Master.Write([]byte("echo ready\r"))
	alice.wait(t, "ready")
	f.audit.wait(t, audit.SessionStart, "web1", 1)
	start := f.audit.of(audit.SessionStart)[0]
	id := fmt.Sprintf("%s-%d", start.Session, start.ChannelID)

	if res := dave.Run(nil, "ssh", "bastion", "watch", id); res.Exit != 1 || !strings.Contains(string(res.Stderr), "no running session "+id+" with a terminal") {
		t.Fatalf("dave's watch: %v", res)
	}
	if res := carol.Run(nil, "ssh", "bastion", "watch", "0000-1"); res.Exit != 1 || !strings.Contains(string(res.Stderr), "no running session 0000-1 with a terminal") {
		t.Fatalf("watch of no session: %v", res)
	}

	pr, pw := io.Pipe()
	defer pw.Close()
	watch := carol.Command(ctx, "ssh", "bastion", "watch", id)
	watch.Stdin = pr
	var out testenv.LockedBuffer
	watch.Stdout = &out
	if err := watch.Start(); err != nil {
		t.Fatal(err)
	}
	shows(t, &out, "bastion: watching "+id+": alice on web1 as "+f.login)
	shows(t, &out, "ready") // the output before carol joined
	pw.Write([]byte("echo from-carol\n"))
	p.Master.Write([]byte("echo typed-$((6*7))\r"))
	alice.wait(t, "typed-42")
	shows(t, &out, "typed-42")
	shows(t, &out, "echo typed-$((6*7))") // the echo of what alice typed
	p.Master.Write([]byte("exit\r"))
	shell.Wait()
	pw.Close()
	if err := watch.Wait(); err != nil || !strings.Contains(out.String(), "bastion: the session ended") {
		t.Fatalf("carol's watch: %v\n%s", err, out.String())
	}
	if strings.Contains(alice.last, "from-carol") {
		t.Fatalf("what carol typed reached alice's shell:\n%s", alice.last)
	}
	var watched bool
	for _, e := range f.audit.of(audit.SessionEnd) {
		watched = watched || e.Channel == "watch" && e.Account == "carol" && e.VM == "web1" && e.BytesDown > 0
	}
	if !watched || len(f.audit.of(audit.Denied)) != 2 {
		t.Fatalf("audit: session_end of the watch %v, denied %+v", watched, f.audit.of(audit.Denied))
	}
}

// shows waits until out holds want.
func shows(t *testing.T, out *testenv.LockedBuffer, want string) {
	t.Helper()
	waitFor(t, func() bool { return strings.Contains(out.String(), want) }, func() string {
		return fmt.Sprintf("never saw %q in:\n%s", want, out.String())
	})
}

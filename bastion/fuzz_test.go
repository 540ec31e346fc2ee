package bastion_test

import (
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion"
)

// The front door decodes what clients send it: channel-open payloads and
// channel requests. These fuzz targets send it arbitrary ones through a
// live connection and require an answer every time; a panic anywhere in
// the server ends the fuzzing process, and so fails the target.

// answerWithin bounds how long the bastion may take to answer one input:
// past its own request timeout (30 s), an input it never answers is a bug.
const answerWithin = 45 * time.Second

// liveClient is a client connection the fuzz inputs share, opened again
// when an input ended it (a peer may close a connection over a malformed
// packet; that is an answer too).
type liveClient struct {
	f    *fixture
	user string
	mu   sync.Mutex
	c    *gossh.Client
}

func (l *liveClient) get(t *testing.T) *gossh.Client {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.c != nil {
		if _, _, err := l.c.SendRequest("keepalive@openssh.com", true, nil); err == nil {
			return l.c
		}
		l.c.Close()
	}
	data, err := os.ReadFile(l.f.client.Key)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := gossh.ParsePrivateKey(data)
	if err != nil {
		t.Fatal(err)
	}
	l.c, err = gossh.Dial("tcp", l.f.addr, &gossh.ClientConfig{
		User:            l.user,
		Auth:            []gossh.AuthMethod{gossh.PublicKeys(signer)},
		HostKeyCallback: l.f.hostCAChecker().CheckHostKey,
		Timeout:         10 * time.Second,
	})
	if err != nil {
		t.Fatalf("the bastion no longer lets alice in: %v", err)
	}
	return l.c
}

// quiet discards the server's logs: the fixture's go to the *testing.F,
// which may not be used inside the fuzz function.
func quiet(s *bastion.Server) { s.Logger = slog.New(slog.DiscardHandler) }

// answered fails t unless fn returns within answerWithin.
func answered(t *testing.T, what string, fn func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	select {
	case <-done:
	case <-time.After(answerWithin):
		t.Fatalf("%s: no answer within %v", what, answerWithin)
	}
}

// FuzzChannelOpen: channel opens on a ProxyJump-style connection (no VM in
// the user name), of the types the front door handles and others.
func FuzzChannelOpen(f *testing.F) {
	fx := newFixture(f, quiet)
	hop := func(host string, port uint32) []byte {
		return gossh.Marshal(struct {
			Host       string
			Port       uint32
			OriginHost string
			OriginPort uint32
		}{host, port, "127.0.0.1", 50000})
	}
	f.Add("direct-tcpip", hop("web1", 22))
	f.Add("direct-tcpip", hop("web1:22", 22))
	f.Add("direct-tcpip", hop("nosuchvm", 22))
	f.Add("direct-tcpip", hop("web1", 65536))
	f.Add("direct-tcpip", []byte{0, 0, 0, 4, 'w', 'e'})
	f.Add("direct-streamlocal@openssh.com", gossh.Marshal(struct {
		Path     string
		Reserved string
		R        uint32
	}{"/run/x.sock", "", 0}))
	f.Add("session", []byte(nil))
	f.Add("x11", []byte{0, 0, 0, 0})
	f.Add("auth-agent@openssh.com", []byte(nil))
	live := &liveClient{f: fx, user: "alice"}
	f.Fuzz(func(t *testing.T, kind string, extra []byte) {
		c := live.get(t)
		answered(t, "open "+kind, func() {
			ch, reqs, err := c.OpenChannel(kind, extra)
			if err == nil {
				go gossh.DiscardRequests(reqs)
				ch.Close()
			}
		})
	})
}

// FuzzSessionRequest: one request, of any type and payload, on a session
// channel of a login@vm connection: exec, env, pty-req, window-change,
// signal, subsystem and the rest, as the front door decodes them.
func FuzzSessionRequest(f *testing.F) {
	fx := newFixture(f, quiet)
	str := func(s string) []byte { return gossh.Marshal(struct{ S string }{s}) }
	f.Add("exec", str("true"))
	f.Add("exec", str("scp -t /tmp"))
	f.Add("exec", []byte{0xff, 0xff, 0xff, 0xff})
	f.Add("env", gossh.Marshal(struct{ Name, Value string }{"LANG", "C"}))
	f.Add("env", str("LANG"))
	f.Add("pty-req", gossh.Marshal(struct {
		Term             string
		Cols, Rows, W, H uint32
		Modes            string
	}{"xterm", 80, 24, 0, 0, "\x00"}))
	f.Add("window-change", gossh.Marshal(struct{ Cols, Rows, W, H uint32 }{1 << 31, 1 << 31, 0, 0}))
	f.Add("signal", str("TERM"))
	f.Add("subsystem", str("sftp"))
	f.Add("subsystem", str("nonsense"))
	f.Add("shell", []byte(nil))
	f.Add("auth-agent-req@openssh.com", []byte(nil))
	f.Add("x11-req", []byte{1})
	f.Add("exit-status", []byte{0, 0, 0, 1})
	live := &liveClient{f: fx, user: fx.login + "@web1"}
	f.Fuzz(func(t *testing.T, kind string, payload []byte) {
		c := live.get(t)
		answered(t, "request "+kind, func() {
			ch, reqs, err := c.OpenChannel("session", nil)
			if err != nil {
				return // the VM's sshd may refuse more sessions for a while
			}
			go gossh.DiscardRequests(reqs)
			ch.SendRequest(kind, true, payload)
			ch.Close()
		})
	})
}

// FuzzGlobalRequest: one global request, of any type and payload, on a
// ProxyJump connection (everything is answered here, false) or on a
// login@vm connection (tcpip-forward and cancel-tcpip-forward go to the
// VM by policy). A forward granted is cancelled again, so that the VM's
// sshd does not pile up listeners.
func FuzzGlobalRequest(f *testing.F) {
	fx := newFixture(f, quiet)
	fwd := func(host string, port uint32) []byte {
		return gossh.Marshal(struct {
			Host string
			Port uint32
		}{host, port})
	}
	f.Add(true, "tcpip-forward", fwd("127.0.0.1", 0))
	f.Add(true, "tcpip-forward", fwd("", 0))
	f.Add(true, "tcpip-forward", fwd("localhost", 1))
	f.Add(true, "tcpip-forward", fwd("127.0.0.1", 1<<31))
	f.Add(true, "tcpip-forward", []byte{0, 0, 0, 9, '1'})
	f.Add(true, "cancel-tcpip-forward", fwd("127.0.0.1", 40000))
	f.Add(true, "streamlocal-forward@openssh.com", gossh.Marshal(struct{ Path string }{"/tmp/x.sock"}))
	f.Add(true, "cancel-streamlocal-forward@openssh.com", gossh.Marshal(struct{ Path string }{"/tmp/x.sock"}))
	f.Add(false, "tcpip-forward", fwd("127.0.0.1", 0))
	f.Add(false, "no-more-sessions@openssh.com", []byte(nil))
	f.Add(false, "hostkeys-prove-00@openssh.com", []byte{0, 0, 0, 0})
	jump := &liveClient{f: fx, user: "alice"}
	direct := &liveClient{f: fx, user: fx.login + "@web1"}
	f.Fuzz(func(t *testing.T, toVM bool, kind string, payload []byte) {
		live := jump
		if toVM {
			live = direct
		}
		c := live.get(t)
		answered(t, "global request "+kind, func() {
			ok, reply, err := c.SendRequest(kind, true, payload)
			if err != nil || !ok {
				return
			}
			if !toVM || kind != "tcpip-forward" {
				t.Errorf("%s granted on a %s connection", kind, live.user)
				return
			}
			var asked struct {
				Host string
				Port uint32
			}
			if gossh.Unmarshal(payload, &asked) != nil {
				t.Errorf("tcpip-forward granted for the payload %q", payload)
				return
			}
			if asked.Port == 0 {
				var bound struct{ Port uint32 }
				if gossh.Unmarshal(reply, &bound) != nil || bound.Port == 0 {
					t.Errorf("tcpip-forward for port 0 granted with the reply %q", reply)
					return
				}
				asked.Port = bound.Port
			}
			if ok, _, err := c.SendRequest("cancel-tcpip-forward", true, gossh.Marshal(asked)); err == nil && !ok {
				t.Errorf("the forward %s:%d granted cannot be cancelled", asked.Host, asked.Port)
			}
		})
	})
}

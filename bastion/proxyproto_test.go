package bastion_test

import (
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/bastion/audit"
)

// behindBalancer logs in as alice over a connection that starts with
// header, as a load balancer's would, and runs command; it returns the
// output, or the error of the login or of the command.
func (f *fixture) behindBalancer(header, command string) (string, error) {
	f.t.Helper()
	data, err := os.ReadFile(f.client.Key)
	if err != nil {
		f.t.Fatal(err)
	}
	signer, _ := gossh.ParsePrivateKey(data)
	conn, err := net.DialTimeout("tcp", f.addr, 5*time.Second)
	if err != nil {
		f.t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := conn.Write([]byte(header)); err != nil {
		return "", err
	}
	c, chans, reqs, err := gossh.NewClientConn(conn, f.addr, &gossh.ClientConfig{
		User: f.login + "@web1", Auth: []gossh.AuthMethod{gossh.PublicKeys(signer)},
		HostKeyCallback: f.hostCAChecker().CheckHostKey,
	})
	if err != nil {
		return "", err
	}
	client := gossh.NewClient(c, chans, reqs)
	defer client.Close()
	s, err := client.NewSession()
	if err != nil {
		return "", err
	}
	out, err := s.Output(command)
	return string(out), err
}

// TestProxyProtocol: behind a load balancer named in ProxyProtocol, the
// PROXY header's client address is the source the policy decides on and
// the audit records, with the balancer beside it; a connection without a
// header, and one from a peer that is not a named balancer, are refused.
func TestProxyProtocol(t *testing.T) {
	f := newFixture(t, func(s *bastion.Server) {
		s.ProxyProtocol = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	})
	rule := f.devRule()
	rule.Sources = []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}
	f.rules(rule)

	out, err := f.behindBalancer("PROXY TCP4 198.51.100.7 127.0.0.1 40000 22\r\n", "echo through the balancer")
	if err != nil || out != "through the balancer\n" {
		t.Fatalf("v1 header from an allowed source: %v %q", err, out)
	}
	login, ok := f.audit.find(audit.Login, "")
	if !ok || login.Source != "198.51.100.7:40000" || !strings.HasPrefix(login.Balancer, "127.0.0.1:") {
		t.Fatalf("login event: %+v", login)
	}

	// v2, binary, as HAProxy's send-proxy-v2 sends it: 203.0.113.9:5000.
	v2 := "\r\n\r\n\x00\r\nQUIT\n" + "\x21\x11\x00\x0c" + "\xcb\x00\x71\x09" + "\x7f\x00\x00\x01" + "\x13\x88" + "\x00\x16"
	if out, err := f.behindBalancer(v2, "echo hi"); err == nil {
		t.Fatalf("a source outside the rule was let in: %q", out)
	}
	if d, ok := f.audit.find(audit.Denied, ""); !ok || d.Source != "203.0.113.9:5000" {
		t.Fatalf("the refusal names %+v, not the client behind the balancer", d)
	}

	if _, err := f.behindBalancer("", "echo hi"); err == nil {
		t.Fatal("a connection without a PROXY header was let in")
	}
	if _, ok := f.audit.find(audit.LoginFailed, "no valid PROXY protocol header from the load balancer"); !ok {
		t.Fatalf("no login_failed for the missing header: %v", f.audit.reasons())
	}
}

// TestProxyProtocolOtherPeer: a peer outside ProxyProtocol is refused
// before its key exchange, header or not.
func TestProxyProtocolOtherPeer(t *testing.T) {
	f := newFixture(t, func(s *bastion.Server) {
		s.ProxyProtocol = []netip.Prefix{netip.MustParsePrefix("10.9.0.0/16")}
	})
	if _, err := f.behindBalancer("PROXY TCP4 198.51.100.7 127.0.0.1 40000 22\r\n", "echo hi"); err == nil {
		t.Fatal("a peer that is no balancer was let in")
	}
	if res := f.jump(nil, "true"); res.Exit == 0 {
		t.Fatalf("ssh -J past the balancers: %v", res)
	}
	if _, ok := f.audit.find(audit.LoginFailed, "not a load balancer named in server.proxy_protocol"); !ok {
		t.Fatalf("no login_failed naming the cause: %v", f.audit.reasons())
	}
}

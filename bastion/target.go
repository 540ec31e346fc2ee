package bastion

import (
	"fmt"
	"net"
	"regexp"
	"strings"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/policy"
	"github.com/bastionvm/bastion/vm"
)

// Target names a login on a VM.
type Target struct {
	Login string
	VM    string
}

var loginPattern = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$`)

// ParseTarget parses "login@vm", the user name of `ssh login@vm@bastion`.
func ParseTarget(user string) (Target, error) {
	login, name, ok := strings.Cut(user, "@")
	if !ok {
		return Target{}, fmt.Errorf("%w: %s is not login@vm", ErrBadTarget, clip(user))
	}
	if err := checkLogin(login); err != nil {
		return Target{}, err
	}
	if err := vm.CheckName(name); err != nil {
		return Target{}, fmt.Errorf("%w: %s: %w", ErrBadTarget, clip(name), vm.ErrBadName)
	}
	return Target{Login: login, VM: name}, nil
}

func checkLogin(login string) error {
	if !loginPattern.MatchString(login) {
		return fmt.Errorf("%w: login %s is not a valid user name", ErrBadTarget, clip(login))
	}
	return nil
}

// directTCPIP is the payload of a direct-tcpip or forwarded-tcpip channel
// open (RFC 4254 §7.2): the address to connect to and the originator.
type directTCPIP struct {
	Host       string
	Port       uint32
	OriginHost string
	OriginPort uint32
}

// jumpPort is the only port of a VM that the front door answers itself.
const jumpPort = 22

// jump serves the ProxyJump inner hop: the client's direct-tcpip to
// "<vm>:22" on the front door is answered by an SSH server running on that
// very channel, presenting a host certificate for <vm>. The inner hop
// inherits the outer identity and asks for nothing more; its user name is
// the login on the VM. Anything other than a known VM's port 22 is refused:
// the bastion is not a proxy.
func (s *Server) jump(fc *frontConn, newCh gossh.NewChannel) {
	var dest directTCPIP
	if err := gossh.Unmarshal(newCh.ExtraData(), &dest); err != nil {
		newCh.Reject(gossh.ConnectionFailed, "bastion: malformed direct-tcpip request")
		return
	}
	log := s.logger().With("account", fc.who().Name, "source", fc.source.String(), "dest", net.JoinHostPort(dest.Host, fmt.Sprint(dest.Port)))
	refuse := func(msg string, err error) {
		log.Info("jump refused", "err", err)
		s.audit(audit.Event{Type: audit.Denied, Session: fc.id, Account: fc.who().Name, Source: fc.source.String(),
			VM: dest.Host, Channel: "jump", Reason: err.Error()})
		newCh.Reject(gossh.Prohibited, msg)
	}
	if dest.Port != jumpPort || vm.CheckName(dest.Host) != nil {
		refuse(fmt.Sprintf("bastion: %s:%d is not reachable: only <vm>:%d is, and the bastion is not a proxy", dest.Host, dest.Port, jumpPort),
			fmt.Errorf("direct-tcpip to %s:%d is not a VM's ssh port", dest.Host, dest.Port))
		return
	}
	d, err := s.lookup(fc.ctx, dest.Host)
	if err != nil {
		refuse(userMessage(dest.Host, err), err)
		return
	}
	if dec := s.decide(fc, d, "", ask{kind: policy.Connect}); !dec.Allow {
		refuse(userMessage(d.Name, ErrDenied), fmt.Errorf("%w: %s", ErrDenied, dec.Reason))
		return
	}
	// The certificate names what the client asked for, name or UUID: that
	// is what OpenSSH checks it against.
	hostKey, err := s.vmHostKey(dest.Host)
	if err != nil {
		log.Error("host certificate", "err", err)
		newCh.Reject(gossh.ConnectionFailed, "bastion: internal error")
		return
	}
	ch, reqs, err := newCh.Accept()
	if err != nil {
		return
	}
	go gossh.DiscardRequests(reqs)

	var lk *link
	var lkErr error
	var tried bool
	// accept establishes the link on the first authentication attempt,
	// whatever its method: the person is already authenticated by the
	// outer hop. A failure is shown once, as a banner.
	accept := func(meta gossh.ConnMetadata) (*gossh.Permissions, error) {
		if tried {
			if lkErr != nil {
				return nil, lkErr
			}
			return nil, nil
		}
		tried = true
		lk, lkErr = s.establish(fc, d, meta.User())
		if lkErr != nil {
			return nil, &gossh.BannerError{Err: lkErr, Message: userMessage(d.Name, lkErr) + "\r\n"}
		}
		return nil, nil
	}
	config := &gossh.ServerConfig{
		NoClientAuth:         true,
		NoClientAuthCallback: accept,
		PublicKeyCallback: func(meta gossh.ConnMetadata, _ gossh.PublicKey) (*gossh.Permissions, error) {
			return accept(meta)
		},
		ServerVersion: s.version(),
		Config:        gossh.Config{Ciphers: s.ciphers()},
	}
	config.AddHostKey(hostKey)
	// The handshake, a trust check included, has a deadline: a client that
	// opens the hop and says nothing does not hold it.
	deadline := time.AfterFunc(s.connectTimeout()+s.requestTimeout(), func() {
		log.Info("inner handshake took too long; closing the hop")
		ch.Close()
	})
	down, chans, greqs, err := gossh.NewServerConn(newChannelConn(ch, fc.local, fc.source), config)
	deadline.Stop()
	if err != nil {
		if lk != nil {
			lk.close() // established, never started: ended here, and audited
		}
		ch.Close()
		if lkErr == nil {
			log.Info("inner handshake failed", "err", err)
		}
		return
	}
	lk.serve(down, chans, greqs)
}

// vmHostKey returns the signer the inner hop presents for vm: the bastion's
// host key in a certificate for that one name, cached until shortly before
// it expires.
func (s *Server) vmHostKey(name string) (gossh.Signer, error) {
	if s.Certifier == nil {
		return s.HostKey, nil
	}
	s.certMu.Lock()
	defer s.certMu.Unlock()
	if c, ok := s.certs[name]; ok && time.Until(c.expires) > time.Hour {
		return c.signer, nil
	}
	const validity = 24 * time.Hour
	signer, err := s.Certifier.HostCertSigner([]string{name}, validity)
	if err != nil {
		return nil, err
	}
	if s.certs == nil {
		s.certs = make(map[string]cachedCert)
	}
	s.certs[name] = cachedCert{signer: signer, expires: time.Now().Add(validity)}
	return signer, nil
}

type cachedCert struct {
	signer  gossh.Signer
	expires time.Time
}

// channelConn presents an SSH channel as a net.Conn, so an SSH server can
// run on it. Deadlines are not supported; the outer connection has its own.
// Reads and writes are batched (pump.go): the inner hop's packets would
// otherwise each cost the outer hop two packets and two window adjustments.
type channelConn struct {
	gossh.Channel
	in            *readAhead
	out           *writeBehind
	local, remote net.Addr
}

func newChannelConn(ch gossh.Channel, local, remote net.Addr) *channelConn {
	return &channelConn{Channel: ch, in: &readAhead{src: ch}, out: newWriteBehind(ch, nil), local: local, remote: remote}
}

func (c *channelConn) Read(p []byte) (int, error)  { return c.in.Read(p) }
func (c *channelConn) Write(p []byte) (int, error) { return c.out.Write(p) }
func (c *channelConn) Close() error                { return c.out.Close() }

func (c *channelConn) LocalAddr() net.Addr                { return c.local }
func (c *channelConn) RemoteAddr() net.Addr               { return c.remote }
func (c *channelConn) SetDeadline(t time.Time) error      { return nil }
func (c *channelConn) SetReadDeadline(t time.Time) error  { return nil }
func (c *channelConn) SetWriteDeadline(t time.Time) error { return nil }

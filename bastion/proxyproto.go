package bastion

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/pires/go-proxyproto"
)

// proxyHeaderTimeout bounds the wait for a load balancer's PROXY header;
// a balancer sends it at once, before any byte of the client's.
const proxyHeaderTimeout = 5 * time.Second

// errNotBalancer refuses a peer that server.proxy_protocol does not name.
var errNotBalancer = errors.New("not a load balancer named in server.proxy_protocol")

// fromBalancer reads the PROXY protocol header (v1 or v2) a load balancer
// sends first, when ProxyProtocol is set. It returns the connection to
// read on, the client's address, and the balancer's; a peer outside
// ProxyProtocol, or one that sends no valid header in time, is refused.
// A header with the LOCAL command (the balancer's own connection, a
// health check) leaves the balancer as the source.
func (s *Server) fromBalancer(conn net.Conn) (net.Conn, net.Addr, net.Addr, error) {
	peer := conn.RemoteAddr()
	if len(s.ProxyProtocol) == 0 {
		return conn, peer, nil, nil
	}
	ip := sourceAddr(peer).Unmap()
	named := false
	for _, p := range s.ProxyProtocol {
		if ip.IsValid() && p.Contains(ip) {
			named = true
			break
		}
	}
	if !named {
		return nil, peer, nil, errNotBalancer
	}
	pc := proxyproto.NewConn(conn, proxyproto.WithPolicy(proxyproto.REQUIRE), proxyproto.SetReadHeaderTimeout(proxyHeaderTimeout))
	// A read of nothing reads the header, and fails as the header does.
	if _, err := pc.Read(nil); err != nil {
		return nil, peer, nil, fmt.Errorf("no valid PROXY protocol header from the load balancer: %w", err)
	}
	client := pc.RemoteAddr()
	if h := pc.ProxyHeader(); h != nil && !h.Command.IsLocal() {
		if _, ok := client.(*net.TCPAddr); !ok {
			return nil, peer, nil, errors.New("the load balancer's PROXY header names a client that is not a TCP one")
		}
	}
	return pc, client, peer, nil
}

// ParseBalancers reads server.proxy_protocol: CIDR ranges or single
// addresses.
func ParseBalancers(list []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range list {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			a, aerr := netip.ParseAddr(s)
			if aerr != nil {
				return nil, fmt.Errorf("%q is neither a CIDR range nor an address", s)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

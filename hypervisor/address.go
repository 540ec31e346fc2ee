package hypervisor

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	"libvirt.org/go/libvirt"

	"github.com/bastionvm/bastion/vm"
)

// Address learns d's IPv4 address from the guest agent and checks it
// against the hypervisor's own view (DHCP lease, then ARP table) where it
// has one. An interface the domain's XML does not declare is ignored.
// When the hypervisor knows addresses for the VM's interfaces and none is
// one the agent reports, the result is ErrAddressesDisagree; when it knows
// none, ErrAddressUnconfirmed: the agent speaks for the guest, and an
// address only the guest vouches for could be anyone's. Addresses of the
// bastion's own machine are never a VM's.
func (p *Pool) Address(ctx context.Context, d vm.Domain) (vm.Address, error) {
	agent, err := p.interfaces(ctx, d, libvirt.DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT)
	if err != nil {
		return vm.Address{}, err
	}
	// The hypervisor's views, asked only as far as needed.
	views := func(yield func(string, []libvirt.DomainInterface) bool) {
		for _, source := range []struct {
			name string
			src  libvirt.DomainInterfaceAddressesSource
		}{{"lease", libvirt.DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE}, {"arp", libvirt.DOMAIN_INTERFACE_ADDRESSES_SRC_ARP}} {
			seen, err := p.interfaces(ctx, d, source.src)
			if err != nil {
				p.log.Debug("address source unavailable", "vm", d.Name, "source", source.name, "err", err)
				continue
			}
			if !yield(source.name, seen) {
				return
			}
		}
	}
	return chooseAddress(d, agent, views, isLocal)
}

// chooseAddress is Address's decision: the agent's addresses on d's
// interfaces, less local ones, confirmed by the first hypervisor view that
// knows any address for those interfaces.
func chooseAddress(d vm.Domain, agent []libvirt.DomainInterface, views func(yield func(string, []libvirt.DomainInterface) bool), local func(netip.Addr) bool) (vm.Address, error) {
	candidates := slices.DeleteFunc(addressesOn(agent, d.MACs), local)
	if len(candidates) == 0 {
		return vm.Address{}, fmt.Errorf("%s: %w on its declared interfaces %v", d.Name, ErrNoAddress, d.MACs)
	}
	for name, seen := range views {
		known := addressesOn(seen, d.MACs)
		if len(known) == 0 {
			continue
		}
		for _, ip := range candidates {
			if slices.Contains(known, ip) {
				return vm.Address{IP: ip, ConfirmedBy: name}, nil
			}
		}
		return vm.Address{}, fmt.Errorf("%s: %w: the guest agent reports %v, the %s table %v", d.Name, ErrAddressesDisagree, candidates, name, known)
	}
	return vm.Address{}, fmt.Errorf("%s: %w: the guest agent reports %v", d.Name, ErrAddressUnconfirmed, candidates)
}

// isLocal reports whether ip is an address of this machine.
func isLocal(ip netip.Addr) bool {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return false
	}
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok {
			if local, ok := netip.AddrFromSlice(ipn.IP); ok && local.Unmap() == ip {
				return true
			}
		}
	}
	return false
}

func (p *Pool) interfaces(ctx context.Context, d vm.Domain, src libvirt.DomainInterfaceAddressesSource) ([]libvirt.DomainInterface, error) {
	ifaces, err := call(ctx, func() ([]libvirt.DomainInterface, error) {
		dom, err := p.domain(d)
		if err != nil {
			return nil, err
		}
		defer dom.Free()
		ifaces, err := dom.ListAllInterfaceAddresses(src)
		return ifaces, classify(err)
	})
	if err != nil {
		return nil, fmt.Errorf("%s: interface addresses: %w", d.Name, err)
	}
	return ifaces, nil
}

// addressesOn returns the IPv4 unicast addresses of the interfaces whose
// hardware address is one of macs.
func addressesOn(ifaces []libvirt.DomainInterface, macs []string) []netip.Addr {
	var out []netip.Addr
	for _, iface := range ifaces {
		if !slices.Contains(macs, strings.ToLower(iface.Hwaddr)) {
			continue
		}
		for _, a := range iface.Addrs {
			ip, err := netip.ParseAddr(a.Addr)
			if err != nil || !ip.Is4() || ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsMulticast() || ip.IsUnspecified() ||
				ip == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
				continue
			}
			if !slices.Contains(out, ip) {
				out = append(out, ip)
			}
		}
	}
	return out
}

package hypervisor

import (
	"encoding/xml"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"libvirt.org/go/libvirt"

	"github.com/bastionvm/bastion/vm"
)

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		err  libvirt.Error
		want error
	}{
		{libvirt.Error{Code: libvirt.ERR_NO_DOMAIN, Message: "Domain not found: no domain with matching name 'x'"}, vm.ErrNoSuchVM},
		{libvirt.Error{Code: libvirt.ERR_OPERATION_INVALID, Message: "Requested operation is not valid: domain is not running"}, vm.ErrNotRunning},
		{libvirt.Error{Code: libvirt.ERR_AGENT_UNRESPONSIVE, Message: "Guest agent is not responding: QEMU guest agent is not connected"}, ErrAgentNotConnected},
		{libvirt.Error{Code: libvirt.ERR_AGENT_UNRESPONSIVE, Message: "Guest agent is not responding: Guest agent not available for now"}, ErrAgentSilent},
		{libvirt.Error{Code: libvirt.ERR_AGENT_COMMAND_TIMEOUT, Message: "Guest agent command timed out"}, ErrAgentSilent},
		{libvirt.Error{Code: libvirt.ERR_INTERNAL_ERROR, Message: "unable to execute QEMU agent command 'guest-file-open': Command guest-file-open has been disabled"}, ErrCommandDisabled},
		{libvirt.Error{Code: libvirt.ERR_INTERNAL_ERROR, Message: "unable to execute QEMU agent command 'guest-ssh-add-authorized-keys': failed to lookup user 'nobody2': Success"}, ErrNoSuchUser},
		{libvirt.Error{Code: libvirt.ERR_SYSTEM_ERROR, Message: "Failed to connect socket"}, ErrUnavailable},
	} {
		if got := classify(tc.err); !errors.Is(got, tc.want) {
			t.Errorf("classify(%q) = %v, want %v", tc.err.Message, got, tc.want)
		}
	}
}

func TestAddressesOn(t *testing.T) {
	ifaces := []libvirt.DomainInterface{
		{Name: "lo", Hwaddr: "00:00:00:00:00:00", Addrs: []libvirt.DomainIPAddress{{Addr: "127.0.0.1"}}},
		{Name: "eth0", Hwaddr: "52:54:00:B7:00:00", Addrs: []libvirt.DomainIPAddress{{Addr: "192.168.214.10"}, {Addr: "fe80::1"},
			{Addr: "0.0.0.0"}, {Addr: "255.255.255.255"}, {Addr: "127.0.0.2"}, {Addr: "224.0.0.1"}}},
		{Name: "docker0", Hwaddr: "02:42:ac:11:00:01", Addrs: []libvirt.DomainIPAddress{{Addr: "172.17.0.1"}}},
	}
	got := addressesOn(ifaces, []string{"52:54:00:b7:00:00"})
	if len(got) != 1 || got[0] != netip.MustParseAddr("192.168.214.10") {
		t.Fatalf("addressesOn = %v; want only the declared interface's unicast IPv4", got)
	}
}

func TestIsLocal(t *testing.T) {
	addrs, err := net.InterfaceAddrs()
	if err != nil || len(addrs) == 0 {
		t.Fatalf("this machine's addresses: %v %v", addrs, err)
	}
	own, _ := netip.AddrFromSlice(addrs[0].(*net.IPNet).IP)
	if !isLocal(own.Unmap()) {
		t.Errorf("%v, this machine's own, is not local", own)
	}
	if isLocal(netip.MustParseAddr("192.0.2.77")) {
		t.Error("a documentation address is local")
	}
}

// TestLabelsNamespace: the labels are read in vm.LabelsNamespace, which a
// struct tag can only spell out.
func TestLabelsNamespace(t *testing.T) {
	desc := `<domain><metadata><bastion:labels xmlns:bastion="` + vm.LabelsNamespace + `">` +
		`<label key="team">web</label></bastion:labels>` +
		`<other:labels xmlns:other="https://example.invalid/other"><label key="team">db</label></other:labels>` +
		`</metadata></domain>`
	var x domainXML
	if err := xml.Unmarshal([]byte(desc), &x); err != nil {
		t.Fatal(err)
	}
	if l := x.Metadata.Labels.Label; len(l) != 1 || l[0].Key != "team" || l[0].Value != "web" {
		t.Fatalf("labels %+v, want team=web from the bastion's namespace only", l)
	}
}

func TestChooseAddress(t *testing.T) {
	d := vm.Domain{Name: "web1", MACs: []string{"52:54:00:b7:00:00"}}
	iface := func(addrs ...string) []libvirt.DomainInterface {
		var a []libvirt.DomainIPAddress
		for _, s := range addrs {
			a = append(a, libvirt.DomainIPAddress{Addr: s})
		}
		return []libvirt.DomainInterface{{Name: "eth0", Hwaddr: "52:54:00:b7:00:00", Addrs: a}}
	}
	views := func(v map[string][]libvirt.DomainInterface, order ...string) func(func(string, []libvirt.DomainInterface) bool) {
		return func(yield func(string, []libvirt.DomainInterface) bool) {
			for _, name := range order {
				if !yield(name, v[name]) {
					return
				}
			}
		}
	}
	notLocal := func(netip.Addr) bool { return false }
	for _, tc := range []struct {
		name   string
		agent  []libvirt.DomainInterface
		views  func(func(string, []libvirt.DomainInterface) bool)
		local  func(netip.Addr) bool
		want   string
		by     string
		reason error
	}{
		{"confirmed by the lease", iface("192.168.214.10"), views(map[string][]libvirt.DomainInterface{"lease": iface("192.168.214.10")}, "lease", "arp"), notLocal, "192.168.214.10", "lease", nil},
		{"confirmed by arp", iface("192.168.214.10"), views(map[string][]libvirt.DomainInterface{"arp": iface("192.168.214.10")}, "lease", "arp"), notLocal, "192.168.214.10", "arp", nil},
		{"disagree", iface("192.168.214.99"), views(map[string][]libvirt.DomainInterface{"lease": iface("192.168.214.10")}, "lease", "arp"), notLocal, "", "", ErrAddressesDisagree},
		{"nobody confirms", iface("192.168.214.10"), views(nil, "lease", "arp"), notLocal, "", "", ErrAddressUnconfirmed},
		{"the bastion's own", iface("192.168.214.1"), views(map[string][]libvirt.DomainInterface{"lease": iface("192.168.214.1")}, "lease"),
			func(ip netip.Addr) bool { return ip.String() == "192.168.214.1" }, "", "", ErrNoAddress},
		{"unspecified only", iface("0.0.0.0"), views(map[string][]libvirt.DomainInterface{"lease": iface("0.0.0.0")}, "lease"), notLocal, "", "", ErrNoAddress},
	} {
		got, err := chooseAddress(d, tc.agent, tc.views, tc.local)
		if tc.reason != nil {
			if !errors.Is(err, tc.reason) {
				t.Errorf("%s: %v, %v; want %v", tc.name, got, err, tc.reason)
			}
			continue
		}
		if err != nil || got.IP.String() != tc.want || got.ConfirmedBy != tc.by {
			t.Errorf("%s: %+v, %v; want %s by %s", tc.name, got, err, tc.want, tc.by)
		}
	}
}

// ifacesFrom reads interfaces from text a hostile guest could choose:
// "name mac addr addr…" per line.
func ifacesFrom(text string) []libvirt.DomainInterface {
	var out []libvirt.DomainInterface
	for _, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		iface := libvirt.DomainInterface{Name: f[0], Hwaddr: f[1]}
		for _, a := range f[2:] {
			iface.Addrs = append(iface.Addrs, libvirt.DomainIPAddress{Addr: a})
		}
		out = append(out, iface)
	}
	return out
}

// FuzzChooseAddress: whatever interfaces and addresses the guest agent
// reports, the address chosen is one the agent reported on the VM's own
// interface, confirmed by the hypervisor's view, and never local.
func FuzzChooseAddress(f *testing.F) {
	f.Add("eth0 52:54:00:b7:00:00 192.168.214.10\nlo 00:00:00:00:00:00 127.0.0.1", "vnet0 52:54:00:b7:00:00 192.168.214.10")
	f.Add("eth0 52:54:00:B7:00:00 192.168.214.10 fe80::1 0.0.0.0", "vnet0 52:54:00:b7:00:00 192.168.214.11")
	f.Add("eth0 52:54:00:b7:00:00 127.0.0.1 ::1 10.0.0.1/24 999.1.1.1", "")
	f.Add("eth0 52:54:00:b7:00:00 192.168.214.1", "x 52:54:00:b7:00:00 192.168.214.1")
	d := vm.Domain{Name: "web1", MACs: []string{"52:54:00:b7:00:00"}}
	local := func(ip netip.Addr) bool { return ip == netip.MustParseAddr("192.168.214.1") || ip.IsLoopback() }
	f.Fuzz(func(t *testing.T, agentText, leaseText string) {
		agent, leases := ifacesFrom(agentText), ifacesFrom(leaseText)
		views := func(yield func(string, []libvirt.DomainInterface) bool) { yield("lease", leases) }
		got, err := chooseAddress(d, agent, views, local)
		if err != nil {
			return
		}
		if local(got.IP) || got.ConfirmedBy != "lease" {
			t.Fatalf("chose %v (confirmed by %q)", got.IP, got.ConfirmedBy)
		}
		if !slices.Contains(addressesOn(agent, d.MACs), got.IP) || !slices.Contains(addressesOn(leases, d.MACs), got.IP) {
			t.Fatalf("chose %v, which the agent and the leases do not both report on the VM's interface", got.IP)
		}
	})
}

func TestHostsWith(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"127.0.0.1\tlocalhost\n127.0.1.1\tbt-guest\n::1\tlocalhost\n", "127.0.0.1\tlocalhost\n127.0.1.1\tweb3\n::1\tlocalhost\n"},
		{"127.0.0.1 localhost\n::1 localhost\n", "127.0.0.1 localhost\n127.0.1.1\tweb3\n::1 localhost\n"},
		{"127.0.1.1 old old.example\n127.0.0.1 localhost\n127.0.1.1 again", "127.0.1.1\tweb3\n127.0.0.1 localhost\n"},
		{"# nothing\n10.0.0.1 db", "# nothing\n10.0.0.1 db\n127.0.1.1\tweb3\n"},
		{"", "127.0.1.1\tweb3\n"},
	} {
		if got := string(HostsWith([]byte(tc.in), "web3")); got != tc.want {
			t.Errorf("HostsWith(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

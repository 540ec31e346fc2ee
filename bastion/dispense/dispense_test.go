package dispense

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/vm"
)

var update = flag.Bool("update", false, "rewrite golden files")

// fakeHypervisor records what was made and unmade; each step can fail.
// It stands in for libvirt only in these failure-path tests; the real
// suite dispenses on libvirt.
type fakeHypervisor struct {
	mu        sync.Mutex
	volumes   map[string]bool
	domains   map[string]vm.Domain
	fail      map[string]error // by step: overlay, define, ping, hostname, address
	existing  map[string]vm.Domain
	hostnames []string // "domain=name", as set
}

func newFake() *fakeHypervisor {
	return &fakeHypervisor{volumes: map[string]bool{}, domains: map[string]vm.Domain{}, fail: map[string]error{}, existing: map[string]vm.Domain{}}
}

func (f *fakeHypervisor) Find(_ context.Context, name string) (vm.Domain, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if d, ok := f.domains[name]; ok {
		return d, nil
	}
	if d, ok := f.existing[name]; ok {
		return d, nil
	}
	return vm.Domain{}, fmt.Errorf("%w: %s", vm.ErrNoSuchVM, name)
}

func (f *fakeHypervisor) CreateOverlay(_ context.Context, _, _, name, _ string, _, _ uint64) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail["overlay"]; err != nil {
		return "", err
	}
	f.volumes["/pool/"+name] = true
	return "/pool/" + name, nil
}

func (f *fakeHypervisor) DeleteVolume(_ context.Context, _, path string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.volumes, path)
	return nil
}

func (f *fakeHypervisor) DefineAndStart(_ context.Context, uri, domainXML string) (vm.Domain, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail["define"]; err != nil {
		return vm.Domain{}, err
	}
	name := domainXML[strings.Index(domainXML, "<name>")+6 : strings.Index(domainXML, "</name>")]
	d := vm.Domain{URI: uri, Name: name, UUID: "uuid-" + name, Running: true}
	f.domains[name] = d
	return d, nil
}

func (f *fakeHypervisor) Remove(_ context.Context, d vm.Domain) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.domains, d.Name)
	delete(f.existing, d.Name)
	return nil
}

func (f *fakeHypervisor) Disks(_ context.Context, d vm.Domain) ([]string, error) {
	return []string{"/pool/" + d.Name + ".qcow2"}, nil
}

func (f *fakeHypervisor) Ping(context.Context, vm.Domain) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fail["ping"]
}

func (f *fakeHypervisor) SetHostname(_ context.Context, d vm.Domain, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail["hostname"]; err != nil {
		return err
	}
	f.hostnames = append(f.hostnames, d.Name+"="+name)
	return nil
}

func (f *fakeHypervisor) Address(context.Context, vm.Domain) (vm.Address, error) {
	return vm.Address{IP: netip.MustParseAddr("192.0.2.10")}, nil
}

type fakeTrust struct{ err error }

func (f fakeTrust) Establish(context.Context, vm.Domain, string) error { return f.err }

var tmpl = Template{Name: "debian", Hypervisor: "qemu:///system", Image: "/images/base.qcow2", Pool: "bastion", DiskSize: 2 << 30,
	Kernel: "/images/vmlinuz", Initrd: "/images/initrd.img", Cmdline: "root=/dev/vda rw", MemoryMiB: 256, VCPUs: 1,
	Network: "bastion-test", Logins: []string{"root"}, Labels: map[string]string{"team": "web"}, Wait: 2 * time.Second}

func TestDispenseAndDestroy(t *testing.T) {
	hv := newFake()
	d := &Dispenser{Hypervisor: hv, Trust: fakeTrust{}, Templates: map[string]Template{"debian": tmpl}}
	var out strings.Builder
	dom, err := d.Dispense(context.Background(), "debian", "web3", "alice", &out)
	if err != nil {
		t.Fatal(err)
	}
	if dom.Labels[LabelBy] != "alice" || dom.Labels["team"] != "web" || !strings.Contains(out.String(), "ready in") {
		t.Fatalf("dispensed %+v\n%s", dom, out.String())
	}
	if strings.Join(hv.hostnames, " ") != "web3=web3" || !strings.Contains(out.String(), "host name web3\r\n") {
		t.Fatalf("host names set: %v\n%s", hv.hostnames, out.String())
	}
	if _, err := d.Dispense(context.Background(), "debian", "web3", "alice", io.Discard); !errors.Is(err, ErrNameTaken) {
		t.Fatalf("second dispense of web3: %v", err)
	}
	hv.domains["web3"] = dom // with its labels, as the hypervisor would report them
	if err := d.Destroy(context.Background(), "web3", "alice", false, io.Discard); err != nil {
		t.Fatal(err)
	}
	if len(hv.domains) != 0 || len(hv.volumes) != 0 {
		t.Fatalf("left behind: %v %v", hv.domains, hv.volumes)
	}
}

func TestDestroyNeedsForceForOthers(t *testing.T) {
	hv := newFake()
	hv.existing["legacy"] = vm.Domain{Name: "legacy"}
	d := &Dispenser{Hypervisor: hv, Trust: fakeTrust{}}
	if err := d.Destroy(context.Background(), "legacy", "alice", false, io.Discard); !errors.Is(err, ErrNotOurs) {
		t.Fatalf("without --force: %v", err)
	}
	var out strings.Builder
	if err := d.Destroy(context.Background(), "legacy", "alice", true, &out); err != nil || !strings.Contains(out.String(), "disks were kept") {
		t.Fatalf("with --force: %v\n%s", err, out.String())
	}
}

func TestDispenseFailuresLeaveNothing(t *testing.T) {
	for _, tc := range []struct {
		name     string
		template string
		vm       string
		fail     string
		trustErr error
		want     error
	}{
		{"unknown template", "nosuch", "web3", "", nil, ErrNoTemplate},
		{"bad name", "debian", "Web_3", "", nil, vm.ErrBadName},
		{"overlay fails (image missing, disk full)", "debian", "web3", "overlay", nil, errDisk},
		{"define fails", "debian", "web3", "define", nil, errDefine},
		{"agent never appears", "debian", "web3", "ping", nil, ErrGaveUp},
		{"host name cannot be set", "debian", "web3", "hostname", nil, errHostname},
		{"trust fails", "debian", "web3", "", errors.New("nonce mismatch"), ErrGaveUp},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hv := newFake()
			switch tc.fail {
			case "overlay":
				hv.fail["overlay"] = errDisk
			case "define":
				hv.fail["define"] = errDefine
			case "hostname":
				hv.fail["hostname"] = errHostname
			case "ping":
				hv.fail["ping"] = errors.New("guest agent is not connected")
			}
			d := &Dispenser{Hypervisor: hv, Trust: fakeTrust{tc.trustErr}, Templates: map[string]Template{"debian": tmpl}}
			_, err := d.Dispense(context.Background(), tc.template, tc.vm, "alice", io.Discard)
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			if len(hv.domains) != 0 || len(hv.volumes) != 0 {
				t.Fatalf("left behind: domains %v, volumes %v", hv.domains, hv.volumes)
			}
		})
	}
}

var (
	errDisk     = errors.New("not enough free space in the storage pool")
	errDefine   = errors.New("define: XML error")
	errHostname = errors.New("guest-file-open: Permission denied")
)

func TestDomainXMLGolden(t *testing.T) {
	got := DomainXML(tmpl, "web3", "/pool/web3.qcow2", map[string]string{"team": "web", LabelBy: "alice", "q": `"<&>"`})
	path := "testdata/domain.xml.golden"
	if *update {
		os.WriteFile(path, []byte(got), 0o644)
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (go test -update writes it)", err)
	}
	if got != string(want) {
		t.Fatalf("domain XML differs from %s:\n%s", path, got)
	}
}

func TestPlanAndAudit(t *testing.T) {
	hv := newFake()
	var events []audit.Event
	d := &Dispenser{Hypervisor: hv, Trust: fakeTrust{}, Templates: map[string]Template{"debian": tmpl},
		Audit: func(e audit.Event) { events = append(events, e) }}
	planned, logins, err := d.Plan("debian", "web3")
	if err != nil || planned.Name != "web3" || planned.URI != tmpl.Hypervisor || planned.Labels["team"] != "web" || len(logins) != 1 || logins[0] != "root" {
		t.Fatalf("Plan: %+v %v %v", planned, logins, err)
	}
	if _, _, err := d.Plan("nosuch", "web3"); !errors.Is(err, ErrNoTemplate) {
		t.Fatalf("Plan of an unknown template: %v", err)
	}
	if len(hv.domains) != 0 || len(hv.volumes) != 0 || len(events) != 0 {
		t.Fatal("Plan made something or audited")
	}
	if _, err := d.Dispense(context.Background(), "debian", "web3", "alice", io.Discard); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Dispense(context.Background(), "debian", "web3", "alice", io.Discard); !errors.Is(err, ErrNameTaken) {
		t.Fatal(err)
	}
	hv.domains["web3"] = vm.Domain{Name: "web3", Labels: map[string]string{LabelBy: "alice"}}
	if err := d.Destroy(context.Background(), "web3", "bob", false, io.Discard); err != nil {
		t.Fatal(err)
	}
	want := []audit.Event{
		{Type: audit.Dispensed, Account: "alice", VM: "web3", Detail: "debian"},
		{Type: audit.DispenseFailed, Account: "alice", VM: "web3", Detail: "debian", Reason: "a VM of that name exists: web3"},
		{Type: audit.Destroyed, Account: "bob", VM: "web3"},
	}
	if len(events) != len(want) {
		t.Fatalf("audited %+v, want %+v", events, want)
	}
	for i := range want {
		events[i].Time = time.Time{}
		if i < 2 {
			// The dispense's duration: what it took the fake.
			if events[i].Activity == nil || events[i].Seconds < 0 || events[i].Seconds > 60 {
				t.Errorf("event %d has no duration: %+v", i, events[i].Activity)
			}
			// Each stage, in order, the successful dispense's only.
			var names []string
			for _, st := range events[i].Stages {
				names = append(names, st.Name)
			}
			if want := map[int]string{0: "overlay start agent hostname address trust root", 1: ""}[i]; strings.Join(names, " ") != want {
				t.Errorf("event %d stages %v, want %s", i, names, want)
			}
			events[i].Activity = nil
		}
		if events[i] != want[i] {
			t.Errorf("event %d: %+v, want %+v", i, events[i], want[i])
		}
	}
}

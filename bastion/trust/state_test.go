package trust

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/vm"
)

// events collects what a Manager audits.
type events struct {
	mu  sync.Mutex
	got []audit.Event
}

func (e *events) add(ev audit.Event) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.got = append(e.got, ev)
}

func (e *events) types() []audit.Type {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []audit.Type
	for _, ev := range e.got {
		out = append(out, ev.Type)
	}
	return out
}

func TestStateFileFollowsTheTrusts(t *testing.T) {
	g := newLocalGuest(t)
	m := g.manager()
	m.StateDir = t.TempDir()
	stop, err := m.Start()
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	if records, err := ReadState(m.StateDir); err != nil || len(records) != 0 {
		t.Fatalf("after Start: %v, %v; want an empty state file", records, err)
	}
	tr, err := m.Get(context.Background(), vm1, g.sshd.Login)
	if err != nil {
		t.Fatal(err)
	}
	records, err := ReadState(m.StateDir)
	if err != nil || len(records) != 1 {
		t.Fatalf("after a check: %v, %v", records, err)
	}
	r := records[0]
	if r.VM != "vm1" || r.UUID != "uuid-1" || r.Login != g.sshd.Login || r.HostKey != tr.Fingerprint() || r.Addr != tr.Addr {
		t.Errorf("record %+v does not describe trust %+v", r, tr)
	}
	data, _ := os.ReadFile(filepath.Join(m.StateDir, StateFile))
	if info, _ := os.Stat(filepath.Join(m.StateDir, StateFile)); info.Mode().Perm() != 0o600 {
		t.Errorf("state file mode %v, want 0600", info.Mode().Perm())
	}
	epoch := ssh.MarshalAuthorizedKey(tr.Signer.PublicKey())
	if bytes.Contains(data, bytes.Fields(epoch)[1]) || strings.Contains(string(data), "PRIVATE") {
		t.Error("the state file holds the epoch key")
	}
	var out strings.Builder
	List(&out, records, time.Now())
	if !strings.Contains(out.String(), "vm1") || !strings.Contains(out.String(), "trusted") {
		t.Errorf("trust ls:\n%s", out.String())
	}
	if s := Summary(m.StateDir, "uuid-1", time.Now()); !strings.HasPrefix(s, g.sshd.Login+" trusted until ") {
		t.Errorf("vm ls summary %q", s)
	}
	m.Drop("uuid-1", "rebooted")
	if records, _ := ReadState(m.StateDir); len(records) != 0 {
		t.Fatalf("after Drop: %v", records)
	}
	if s := Summary(m.StateDir, "uuid-1", time.Now()); s != "-" {
		t.Errorf("vm ls summary after Drop %q", s)
	}
}

func TestStartRefusesAStateDirItCannotWrite(t *testing.T) {
	m := &Manager{Instance: "test", StateDir: filepath.Join(t.TempDir(), "missing")}
	if _, err := m.Start(); err == nil {
		t.Fatal("Start with a missing state directory succeeded")
	}
}

func TestChecksAndDropsAreAudited(t *testing.T) {
	g := newLocalGuest(t)
	m := g.manager()
	var ev events
	m.Audit = ev.add
	if _, err := m.Get(context.Background(), vm1, g.sshd.Login); err != nil {
		t.Fatal(err)
	}
	m.HandleEvent(vm.Event{URI: vm1.URI, UUID: vm1.UUID, Name: vm1.Name, Kind: vm.EventStarted}) // not a break
	m.HandleEvent(vm.Event{URI: vm1.URI, UUID: vm1.UUID, Name: vm1.Name, Kind: vm.EventRebooted})
	deadline := time.Now().Add(5 * time.Second)
	for len(m.Trusts()) != 0 || len(ev.types()) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("a reboot event did not drop the trust: %v, events %v", m.Trusts(), ev.types())
		}
		time.Sleep(10 * time.Millisecond)
	}
	g.mu.Lock()
	g.pingErr = errAgentSilent
	g.mu.Unlock()
	if _, err := m.Get(context.Background(), vm1, g.sshd.Login); err == nil {
		t.Fatal("a check with a silent agent succeeded")
	}
	got := ev.types()
	want := []audit.Type{audit.TrustVerified, audit.TrustDropped, audit.TrustFailed}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Fatalf("audited %v, want %v", got, want)
	}
	ev.mu.Lock()
	defer ev.mu.Unlock()
	if d := ev.got[0].Detail; !strings.Contains(d, "host key SHA256:") || !strings.Contains(d, " took ") {
		t.Errorf("trust_verified detail %q", d)
	}
	if r := ev.got[1].Reason; r != "rebooted" {
		t.Errorf("trust_dropped reason %q", r)
	}
	if r := ev.got[2].Reason; !strings.Contains(r, "guest agent is not responding") {
		t.Errorf("trust_failed reason %q", r)
	}
}

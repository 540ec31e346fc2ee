package bastion_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/vm"
)

// TestVMEventsEndSessions: a VM that reboots or stops takes its sessions
// with it, each told why; an agent leaving the VM, or an event about
// another VM, leaves them running.
func TestVMEventsEndSessions(t *testing.T) {
	f := newFixture(t)
	web1, err := f.fleet.Find(context.Background(), "web1")
	if err != nil {
		t.Fatal(err)
	}
	jump := f.startSession(t, "-J", "bastion", f.login+"@web1", "echo started; sleep 60")
	named := f.startSession(t, f.login+"@web1@bastion", "echo started; sleep 60")

	f.srv.VMEvent(vm.Event{URI: web1.URI, UUID: web1.UUID, Name: web1.Name, Kind: vm.EventAgentGone})
	f.srv.VMEvent(vm.Event{URI: web1.URI, UUID: "another-uuid", Name: "web2", Kind: vm.EventRebooted})
	time.Sleep(500 * time.Millisecond)
	for name, s := range map[string]*session{"ssh -J": jump, "ssh login@vm@bastion": named} {
		select {
		case <-s.done:
			t.Fatalf("%s ended on an event that does not touch its sshd: %s", name, s.stderr.String())
		default:
		}
	}

	f.srv.VMEvent(vm.Event{URI: web1.URI, UUID: web1.UUID, Name: web1.Name, Kind: vm.EventRebooted})
	for name, s := range map[string]*session{"ssh -J": jump, "ssh login@vm@bastion": named} {
		if code := s.ended(t); code != 255 || !strings.Contains(s.stderr.String(), "bastion: web1 rebooted; the session ended") {
			t.Errorf("%s: exit %d, stderr %q; want 255 and the reason", name, code, s.stderr.String())
		}
	}
	if _, ok := f.audit.find(audit.Ended, "vm rebooted"); !ok {
		t.Error("no audit event for the sessions the reboot ended")
	}
	// The VM is back: a new login works.
	if res := f.jump(nil, "echo back"); res.Exit != 0 || string(res.Stdout) != "back\n" {
		t.Fatalf("a login after the reboot: %v %q", res, res.Stdout)
	}
}

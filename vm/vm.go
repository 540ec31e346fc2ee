// Package vm is the one description of a virtual machine that every other
// package of the bastion speaks: who it is (hypervisor URI, UUID, name),
// whether it runs, its labels and its network interfaces, where it is
// reached, and the errors and name rule that go with them. It imports
// nothing, so that the hypervisor, the policy, the trust and the front door
// can share it without knowing each other.
package vm

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
)

// Domain is a VM as a hypervisor reports it. Its identity is URI and UUID:
// names may repeat across hypervisors, and a VM that migrates keeps its
// UUID.
type Domain struct {
	URI     string            // the libvirt URI of the hypervisor that runs it
	UUID    string            // libvirt's domain UUID
	Name    string            // libvirt's domain name
	Running bool              // the domain is running (not shut off, paused or crashed)
	Labels  map[string]string // from the domain's <metadata>, in LabelsNamespace
	MACs    []string          // of its network interfaces, lower case
}

// Address is where the bastion reaches a VM over the network.
type Address struct {
	IP netip.Addr
	// ConfirmedBy names the hypervisor-side source that agrees with the
	// guest agent ("lease" or "arp"); empty when neither knows the VM.
	ConfirmedBy string
}

// ErrNoSuchVM is the error, wrapped with the name asked for, of every
// lookup that finds no VM.
var ErrNoSuchVM = errors.New("no such VM")

// ErrNotRunning is the error of a request that needs a running VM, made of
// one that is not.
var ErrNotRunning = errors.New("VM is not running")

// ErrBadName is returned by CheckName.
var ErrBadName = errors.New("not a valid VM name")

// LabelsNamespace is the XML namespace of the bastion's labels in a
// domain's <metadata>:
//
//	<bastion:labels xmlns:bastion="https://bastion.invalid/labels">
//	  <label key="team">web</label>
//	</bastion:labels>
const LabelsNamespace = "https://bastion.invalid/labels"

var namePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// CheckName reports whether name may name a VM (or be a UUID) in a request:
// 1 to 64 letters, digits, '.', '_' and '-', starting with a letter or a
// digit. It is the rule for every name the bastion is asked about; a new
// VM's name must also be a host name (see CheckHostName).
func CheckName(name string) error {
	if !namePattern.MatchString(name) {
		return fmt.Errorf("%w: %q (1 to 64 letters, digits, '.', '_' or '-', starting with a letter or a digit)", ErrBadName, name)
	}
	return nil
}

var hostNamePattern = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// CheckHostName reports whether name, valid by CheckName, may also be the
// host name of a VM the bastion makes: one DNS label of lower-case letters,
// digits and '-', at most 63 long, not starting or ending with '-'.
func CheckHostName(name string) error {
	if err := CheckName(name); err != nil {
		return err
	}
	if !hostNamePattern.MatchString(name) {
		return fmt.Errorf("%w: %q (a new VM's name is its host name: lower-case letters, digits and '-', at most 63)", ErrBadName, name)
	}
	return nil
}

// EventKind is what happened to a VM, in the terms that matter to trust:
// every kind but Started and AgentArrived breaks the binding between a VM
// and what was verified about it.
type EventKind string

// Event kinds.
const (
	EventStopped      EventKind = "stopped"       // shut down, destroyed or crashed
	EventRebooted     EventKind = "rebooted"      // guest reboot
	EventMigrated     EventKind = "migrated"      // migrated away or in
	EventUndefined    EventKind = "undefined"     // removed from the hypervisor
	EventAgentGone    EventKind = "agent_gone"    // the guest agent disconnected
	EventStarted      EventKind = "started"       // booted
	EventAgentArrived EventKind = "agent_arrived" // the guest agent connected
	// EventReconnected is about every VM of a hypervisor (URI set, no
	// UUID): its connection was lost and is back, and what happened
	// meanwhile went unheard.
	EventReconnected EventKind = "hypervisor_reconnected"
)

// Event is a lifecycle or guest agent event of one VM.
type Event struct {
	URI  string
	UUID string
	Name string
	Kind EventKind
}

// Cause is the part of err a person may be told: the error that a chain of
// wraps leads to, taking the first where several are wrapped at once. Every
// package that speaks of VMs wraps the sentinel naming a failure first and
// the detail after (fmt.Errorf("%w: %w", ErrX, detail)), so Cause is that
// sentinel, whose text is written for users.
func Cause(err error) error {
	for err != nil {
		switch e := err.(type) {
		case interface{ Unwrap() error }:
			next := e.Unwrap()
			if next == nil {
				return err
			}
			err = next
		case interface{ Unwrap() []error }:
			errs := e.Unwrap()
			if len(errs) == 0 {
				return err
			}
			err = errs[0]
		default:
			return err
		}
	}
	return err
}

// Printable is text from a guest (an agent's error description, a file)
// made fit to show a person: control and non-ASCII bytes become '?', and
// it is cut to 200 bytes.
func Printable(s string) string {
	const max = 200
	b := []byte(s)
	if len(b) > max {
		b = append(b[:max:max], "..."...)
	}
	for i, c := range b {
		if c < ' ' || c > '~' {
			b[i] = '?'
		}
	}
	return string(b)
}

package hypervisor

import (
	"libvirt.org/go/libvirt"
)

// EventKind is what happened to a domain, in the terms that matter to
// trust: each of these breaks the binding between a VM and what was
// verified about it.
type EventKind string

const (
	EventStopped      EventKind = "stopped"       // shut down, destroyed or crashed
	EventRebooted     EventKind = "rebooted"      // guest reboot
	EventMigrated     EventKind = "migrated"      // migrated away or in
	EventUndefined    EventKind = "undefined"     // removed from the hypervisor
	EventAgentGone    EventKind = "agent_gone"    // the guest agent disconnected
	EventStarted      EventKind = "started"       // booted
	EventAgentArrived EventKind = "agent_arrived" // the guest agent connected
)

// Event is a lifecycle or agent event of one domain.
type Event struct {
	URI  string
	UUID string
	Name string
	Kind EventKind
}

// subscribe registers p's event callbacks on a new connection.
func (p *Pool) subscribe(uri string, c *libvirt.Connect) error {
	emit := func(d *libvirt.Domain, kind EventKind) {
		e := Event{URI: uri, Kind: kind}
		e.UUID, _ = d.GetUUIDString()
		e.Name, _ = d.GetName()
		p.events(e)
	}
	_, err := c.DomainEventLifecycleRegister(nil, func(_ *libvirt.Connect, d *libvirt.Domain, ev *libvirt.DomainEventLifecycle) {
		switch ev.Event {
		case libvirt.DOMAIN_EVENT_STOPPED:
			if libvirt.DomainEventStoppedDetailType(ev.Detail) == libvirt.DOMAIN_EVENT_STOPPED_MIGRATED {
				emit(d, EventMigrated)
			} else {
				emit(d, EventStopped)
			}
		case libvirt.DOMAIN_EVENT_SHUTDOWN, libvirt.DOMAIN_EVENT_CRASHED:
			emit(d, EventStopped)
		case libvirt.DOMAIN_EVENT_UNDEFINED:
			emit(d, EventUndefined)
		case libvirt.DOMAIN_EVENT_SUSPENDED:
			if libvirt.DomainEventSuspendedDetailType(ev.Detail) == libvirt.DOMAIN_EVENT_SUSPENDED_MIGRATED {
				emit(d, EventMigrated)
			}
		case libvirt.DOMAIN_EVENT_STARTED:
			if libvirt.DomainEventStartedDetailType(ev.Detail) == libvirt.DOMAIN_EVENT_STARTED_MIGRATED {
				emit(d, EventMigrated)
			} else {
				emit(d, EventStarted)
			}
		}
	})
	if err != nil {
		return err
	}
	if _, err := c.DomainEventRebootRegister(nil, func(_ *libvirt.Connect, d *libvirt.Domain) {
		emit(d, EventRebooted)
	}); err != nil {
		return err
	}
	_, err = c.DomainEventAgentLifecycleRegister(nil, func(_ *libvirt.Connect, d *libvirt.Domain, ev *libvirt.DomainEventAgentLifecycle) {
		if ev.State == libvirt.CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_DISCONNECTED {
			emit(d, EventAgentGone)
		} else {
			emit(d, EventAgentArrived)
		}
	})
	return err
}

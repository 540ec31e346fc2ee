package hypervisor

import (
	"libvirt.org/go/libvirt"

	"github.com/bastionvm/bastion/vm"
)

// subscribe registers p's event callbacks on a new connection.
func (p *Pool) subscribe(uri string, c *libvirt.Connect) error {
	emit := func(d *libvirt.Domain, kind vm.EventKind) {
		e := vm.Event{URI: uri, Kind: kind}
		e.UUID, _ = d.GetUUIDString()
		e.Name, _ = d.GetName()
		p.noteAgentEvent(e)
		p.events(e)
	}
	_, err := c.DomainEventLifecycleRegister(nil, func(_ *libvirt.Connect, d *libvirt.Domain, ev *libvirt.DomainEventLifecycle) {
		switch ev.Event {
		case libvirt.DOMAIN_EVENT_STOPPED:
			if libvirt.DomainEventStoppedDetailType(ev.Detail) == libvirt.DOMAIN_EVENT_STOPPED_MIGRATED {
				emit(d, vm.EventMigrated)
			} else {
				emit(d, vm.EventStopped)
			}
		case libvirt.DOMAIN_EVENT_SHUTDOWN, libvirt.DOMAIN_EVENT_CRASHED:
			emit(d, vm.EventStopped)
		case libvirt.DOMAIN_EVENT_UNDEFINED:
			emit(d, vm.EventUndefined)
		case libvirt.DOMAIN_EVENT_SUSPENDED:
			if libvirt.DomainEventSuspendedDetailType(ev.Detail) == libvirt.DOMAIN_EVENT_SUSPENDED_MIGRATED {
				emit(d, vm.EventMigrated)
			}
		case libvirt.DOMAIN_EVENT_STARTED:
			if libvirt.DomainEventStartedDetailType(ev.Detail) == libvirt.DOMAIN_EVENT_STARTED_MIGRATED {
				emit(d, vm.EventMigrated)
			} else {
				emit(d, vm.EventStarted)
			}
		}
	})
	if err != nil {
		return err
	}
	if _, err := c.DomainEventRebootRegister(nil, func(_ *libvirt.Connect, d *libvirt.Domain) {
		emit(d, vm.EventRebooted)
	}); err != nil {
		return err
	}
	_, err = c.DomainEventAgentLifecycleRegister(nil, func(_ *libvirt.Connect, d *libvirt.Domain, ev *libvirt.DomainEventAgentLifecycle) {
		if ev.State == libvirt.CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_DISCONNECTED {
			emit(d, vm.EventAgentGone)
		} else {
			emit(d, vm.EventAgentArrived)
		}
	})
	return err
}

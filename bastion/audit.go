package bastion

import (
	"encoding/json"
	"io"
	"sync"
	"time"
)

// EventType names what an audit event records.
type EventType string

// Audit event types.
const (
	EventLogin          EventType = "login"           // a person authenticated to the front door
	EventLoginFailed    EventType = "login_failed"    // an unknown key or a rate-limited source
	EventDenied         EventType = "denied"          // the policy or the front door refused a request
	EventConnected      EventType = "connected"       // an upstream connection to a VM was established
	EventUpstreamFailed EventType = "upstream_failed" // verification or the upstream connection failed
	EventDisconnected   EventType = "disconnected"    // a link to a VM ended
	EventTrustVerified  EventType = "trust_verified"  // a dual-band check succeeded
	EventTrustFailed    EventType = "trust_failed"    // a dual-band check failed
	EventTrustDropped   EventType = "trust_dropped"   // a lifecycle event ended a trust
	EventReloaded       EventType = "reloaded"        // accounts and policy were reloaded
	EventReloadFailed   EventType = "reload_failed"   // a reload was refused; the running configuration stays
	EventEnded          EventType = "ended"           // the bastion ended a session: policy change, time limit
	EventDispensed      EventType = "dispensed"       // a VM was made from a template
	EventDispenseFailed EventType = "dispense_failed" // making a VM failed; what was made is removed
	EventDestroyed      EventType = "destroyed"       // a VM was removed
)

// Event is one entry of the audit stream. Its JSON form, one object per
// line, is the documented format: every field but time and type is omitted
// when empty.
type Event struct {
	Time    time.Time `json:"time"`
	Type    EventType `json:"type"`
	Account string    `json:"account,omitempty"`
	Source  string    `json:"source,omitempty"`
	VM      string    `json:"vm,omitempty"`
	Login   string    `json:"login,omitempty"`
	Channel string    `json:"channel,omitempty"`
	Detail  string    `json:"detail,omitempty"` // the command, forward target or subsystem
	Rule    string    `json:"rule,omitempty"`
	Reason  string    `json:"reason,omitempty"`
}

// with returns a copy of e with the given type and decision fields.
func (e Event) with(t EventType, channel, rule, reason string) Event {
	e.Type, e.Channel, e.Rule, e.Reason = t, channel, rule, reason
	return e
}

// JSONAudit writes events as JSON lines to w. It is safe for concurrent use.
func JSONAudit(w io.Writer) func(Event) {
	var mu sync.Mutex
	enc := json.NewEncoder(w)
	return func(e Event) {
		if e.Time.IsZero() {
			e.Time = time.Now().UTC()
		}
		mu.Lock()
		defer mu.Unlock()
		enc.Encode(e)
	}
}

func (s *Server) audit(e Event) {
	if s.Audit == nil {
		return
	}
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	s.Audit(e)
}

// Package hypervisor is the bastion's out-of-band channel into VMs: libvirt
// connections and the QEMU guest agent behind them. It is the only package
// that imports libvirt (cgo).
//
// Every call takes a context and gives up at its deadline; the agent itself
// is also told a timeout, so a hung guest costs a deadline, never more.
package hypervisor

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"libvirt.org/go/libvirt"

	"github.com/bastionvm/bastion/vm"
)

// Errors. Their text is fit to show a user; detail is wrapped around them.
var (
	ErrAmbiguous          = errors.New("VM name exists on more than one hypervisor")
	ErrAgentNotConnected  = errors.New("guest agent is not connected")
	ErrAgentSilent        = errors.New("guest agent is not responding")
	ErrCommandDisabled    = errors.New("guest agent command is disabled in the guest")
	ErrAgentFailed        = errors.New("guest agent command failed")
	ErrTimeout            = errors.New("hypervisor did not answer in time")
	ErrNoAddress          = errors.New("VM reports no address")
	ErrAddressesDisagree  = errors.New("VM addresses disagree")
	ErrAddressUnconfirmed = errors.New("the hypervisor does not confirm the address the guest agent reports")
	ErrUnavailable        = errors.New("hypervisor is unreachable")
	ErrNoSuchUser         = errors.New("no such user in the guest")
)

// Pool is a set of libvirt connections, one per configured URI.
type Pool struct {
	uris       []string
	log        *slog.Logger
	events     func(vm.Event)
	agentLimit time.Duration
	maxRead    int
	// send carries one agent command to a guest and returns its reply:
	// libvirtSend, or a hostile agent in the fuzz tests.
	send func(d vm.Domain, body string, timeout libvirt.DomainQemuAgentCommandTimeout) (string, error)

	closing atomic.Bool // set by Close: connections closing are not lost

	mu     sync.Mutex // protects conns and opened
	conns  map[string]*libvirt.Connect
	opened map[string]time.Time // when each URI's connection was last (re)opened

	agentsMu sync.Mutex
	agents   map[[2]string]bool // URI and UUID → whether each guest's agent answered last, of the guests heard from
}

// agentSettle is how long after libvirt was (re)connected the pool waits
// for a guest agent libvirt reports as not connected: a libvirtd that has
// just started takes some seconds to reach the agents of running guests.
// Past it, an agent that is not connected is reported at once.
const agentSettle = time.Minute

// reconnectBackoff bounds the wait between attempts to reopen a lost
// connection.
const reconnectBackoff = 30 * time.Second

// Options configure Open.
type Options struct {
	Logger *slog.Logger
	// OnEvent receives lifecycle and agent events of every domain on every
	// connection. It is called from libvirt's event loop and must not block.
	// If nil, events are not subscribed to.
	OnEvent func(vm.Event)
	// AgentTimeout bounds each guest agent command; 0 means 10 seconds.
	AgentTimeout time.Duration
	// MaxRead bounds what ReadFile reads from a guest; 0 means 64 KiB.
	MaxRead int
}

var eventLoop sync.Once

// Open connects to every URI. A hypervisor that cannot be reached now is
// logged and tried again on next use, as is one whose connection drops:
// one host down does not stop the bastion reaching the others.
func Open(uris []string, opts Options) (*Pool, error) {
	if len(uris) == 0 {
		return nil, errors.New("no hypervisor URIs configured")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.OnEvent != nil {
		eventLoop.Do(startEventLoop)
	}
	p := &Pool{uris: uris, log: log, events: opts.OnEvent, agentLimit: opts.AgentTimeout, conns: make(map[string]*libvirt.Connect),
		opened: make(map[string]time.Time)}
	p.send = p.libvirtSend
	if p.agentLimit <= 0 {
		p.agentLimit = 10 * time.Second
	}
	if p.maxRead = opts.MaxRead; p.maxRead <= 0 {
		p.maxRead = defaultMaxRead
	}
	for _, uri := range uris {
		if _, err := p.conn(uri); err != nil {
			log.Error("hypervisor unreachable; will retry on use", "uri", uri, "err", err)
		}
	}
	return p, nil
}

// startEventLoop runs libvirt's default event loop for the life of the
// process; it must be registered before the first connection is opened.
func startEventLoop() {
	if err := libvirt.EventRegisterDefaultImpl(); err != nil {
		panic(fmt.Sprintf("libvirt event loop: %v", err))
	}
	go func() {
		for {
			if err := libvirt.EventRunDefaultImpl(); err != nil {
				time.Sleep(100 * time.Millisecond)
			}
		}
	}()
}

// Close closes every connection.
func (p *Pool) Close() {
	p.closing.Store(true)
	p.mu.Lock()
	defer p.mu.Unlock()
	for uri, c := range p.conns {
		if p.events != nil {
			c.UnregisterCloseCallback()
		}
		c.Close()
		delete(p.conns, uri)
	}
}

// conn returns the open connection to uri, reopening it if it died.
func (p *Pool) conn(uri string) (*libvirt.Connect, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.conns[uri]; ok {
		if alive, err := c.IsAlive(); err == nil && alive {
			return c, nil
		}
		p.dropLocked(uri, c)
	}
	if p.closing.Load() {
		return nil, fmt.Errorf("%w: %s: the pool is closed", ErrUnavailable, uri)
	}
	c, err := libvirt.NewConnect(uri)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %s", ErrUnavailable, uri, libvirtMessage(err))
	}
	if p.events != nil {
		c.SetKeepAlive(5, 3)
		if err := p.subscribe(uri, c); err != nil {
			c.Close()
			return nil, fmt.Errorf("%w: %s: events: %s", ErrUnavailable, uri, libvirtMessage(err))
		}
		// With the event loop running, libvirt tells of a connection that
		// dies (libvirtd restarted, keepalive missed) as it happens.
		c.RegisterCloseCallback(func(_ *libvirt.Connect, reason libvirt.ConnectCloseReason) {
			if reason != libvirt.CONNECT_CLOSE_REASON_CLIENT && !p.closing.Load() {
				go p.lost(uri, c, reason)
			}
		})
	}
	_, reopened := p.opened[uri]
	p.conns[uri] = c
	p.opened[uri] = time.Now()
	if reopened && p.events != nil {
		// Whatever happened while the connection was down went unheard, so
		// what was verified before it is verified again.
		p.log.Info("hypervisor reconnected", "uri", uri)
		go p.events(vm.Event{URI: uri, Kind: vm.EventReconnected})
	}
	return c, nil
}

// dropLocked forgets c, the connection to uri, if it is still the pool's.
// p.mu must be held.
func (p *Pool) dropLocked(uri string, c *libvirt.Connect) bool {
	if p.conns[uri] != c {
		return false
	}
	delete(p.conns, uri)
	if p.events != nil {
		c.UnregisterCloseCallback()
	}
	c.Close()
	return true
}

// drop forgets c, the connection to uri, after a call on it failed as if
// the connection were dead, so that the next use opens a new one.
func (p *Pool) drop(uri string, c *libvirt.Connect) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.dropLocked(uri, c)
}

// lost handles libvirt's report that the connection c to uri died: it is
// dropped and reopened in the background, with backoff, so that events
// flow again without waiting for the next login to need the hypervisor.
func (p *Pool) lost(uri string, c *libvirt.Connect, reason libvirt.ConnectCloseReason) {
	p.mu.Lock()
	ours := p.dropLocked(uri, c)
	p.mu.Unlock()
	if !ours {
		return
	}
	p.log.Warn("hypervisor connection lost; reconnecting", "uri", uri, "reason", closeReason(reason))
	for delay := time.Second; !p.closing.Load(); delay = min(2*delay, reconnectBackoff) {
		time.Sleep(delay)
		p.mu.Lock()
		_, reopened := p.conns[uri] // a caller may have reopened it first
		p.mu.Unlock()
		if reopened {
			return
		}
		if _, err := p.conn(uri); err == nil {
			return
		} else {
			p.log.Debug("hypervisor still unreachable", "uri", uri, "err", err, "retry_in", min(2*delay, reconnectBackoff))
		}
	}
}

func closeReason(r libvirt.ConnectCloseReason) string {
	switch r {
	case libvirt.CONNECT_CLOSE_REASON_ERROR:
		return "error"
	case libvirt.CONNECT_CLOSE_REASON_EOF:
		return "closed by the hypervisor"
	case libvirt.CONNECT_CLOSE_REASON_KEEPALIVE:
		return "keepalive timed out"
	}
	return "client"
}

// settling reports whether uri's connection was opened so recently that
// libvirt may still be reaching the guest agents.
func (p *Pool) settling(uri string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	opened, ok := p.opened[uri]
	return ok && time.Since(opened) < agentSettle
}

// call runs fn, which may block in libvirt, until ctx is done. fn keeps
// running after a timeout; libvirt's own timeouts end it.
func call[T any](ctx context.Context, fn func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	c := make(chan result, 1)
	go func() {
		v, err := fn()
		c <- result{v, err}
	}()
	select {
	case r := <-c:
		return r.v, r.err
	case <-ctx.Done():
		var zero T
		return zero, fmt.Errorf("%w: %w", ErrTimeout, ctx.Err())
	}
}

// Reachable reports nil if every configured hypervisor answers, or which
// do not and why.
func (p *Pool) Reachable(ctx context.Context) error {
	var down []error
	for _, uri := range p.uris {
		if err := p.Dial(ctx, uri); err != nil {
			down = append(down, err)
		}
	}
	return errors.Join(down...)
}

// Dial reports nil if the hypervisor at uri, one of the pool's, answers;
// otherwise an error wrapping ErrUnavailable or ErrTimeout with libvirt's
// own words.
func (p *Pool) Dial(ctx context.Context, uri string) error {
	_, err := call(ctx, func() (*libvirt.Connect, error) { return p.conn(uri) })
	if errors.Is(err, ErrTimeout) {
		return fmt.Errorf("%w: %s: %w", ErrUnavailable, uri, err)
	}
	return err
}

var uuidPattern = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)

// Find looks name up, as a UUID or a domain name, on every hypervisor. A
// name found on two hypervisors is ambiguous: use the UUID.
func (p *Pool) Find(ctx context.Context, name string) (vm.Domain, error) {
	var found []vm.Domain
	var unreachable []string
	for _, uri := range p.uris {
		d, err := call(ctx, func() (vm.Domain, error) { return p.find(uri, name) })
		switch {
		case errors.Is(err, vm.ErrNoSuchVM):
			continue
		case errors.Is(err, ErrUnavailable):
			p.log.Warn("hypervisor unreachable", "uri", uri, "err", err)
			unreachable = append(unreachable, uri)
			continue
		case err != nil:
			return vm.Domain{}, err
		}
		found = append(found, d)
	}
	switch len(found) {
	case 0:
		if len(unreachable) > 0 {
			return vm.Domain{}, fmt.Errorf("%w: %s not found; unreachable: %s", ErrUnavailable, name, strings.Join(unreachable, ", "))
		}
		return vm.Domain{}, fmt.Errorf("%w: %s", vm.ErrNoSuchVM, name)
	case 1:
		return found[0], nil
	default:
		return vm.Domain{}, fmt.Errorf("%w: %s is on %s and %s", ErrAmbiguous, name, found[0].URI, found[1].URI)
	}
}

// List returns the domains of every reachable hypervisor, running or not.
func (p *Pool) List(ctx context.Context) ([]vm.Domain, error) {
	var out []vm.Domain
	for _, uri := range p.uris {
		found, err := call(ctx, func() ([]vm.Domain, error) {
			c, err := p.conn(uri)
			if err != nil {
				return nil, err
			}
			doms, err := c.ListAllDomains(0)
			if err != nil {
				return nil, classify(err)
			}
			var out []vm.Domain
			for i := range doms {
				if d, err := describe(uri, &doms[i]); err == nil {
					out = append(out, d)
				}
				doms[i].Free()
			}
			return out, nil
		})
		if err != nil {
			p.log.Warn("listing domains", "uri", uri, "err", err)
			continue
		}
		out = append(out, found...)
	}
	return out, nil
}

func (p *Pool) find(uri, name string) (vm.Domain, error) {
	dom, err := p.lookup(uri, func(c *libvirt.Connect) (*libvirt.Domain, error) {
		if uuidPattern.MatchString(name) {
			return c.LookupDomainByUUIDString(name)
		}
		return c.LookupDomainByName(name)
	})
	if err != nil {
		return vm.Domain{}, err
	}
	defer dom.Free()
	return describe(uri, dom)
}

// lookup looks a domain up on uri's connection. A lookup changes nothing,
// so one that fails because the connection has died (libvirtd restarted
// before libvirt noticed) is tried once more on a new connection: every
// call on a domain begins with a lookup, which keeps the call itself from
// running on a dead connection.
func (p *Pool) lookup(uri string, fn func(*libvirt.Connect) (*libvirt.Domain, error)) (*libvirt.Domain, error) {
	for attempt := 0; ; attempt++ {
		c, err := p.conn(uri)
		if err != nil {
			return nil, err
		}
		dom, err := fn(c)
		if err == nil {
			return dom, nil
		}
		err = classify(err)
		if !errors.Is(err, ErrUnavailable) || attempt > 0 {
			return nil, err
		}
		p.log.Info("hypervisor connection failed; reopening it", "uri", uri, "err", err)
		p.drop(uri, c)
	}
}

func describe(uri string, dom *libvirt.Domain) (vm.Domain, error) {
	d := vm.Domain{URI: uri}
	var err error
	if d.Name, err = dom.GetName(); err != nil {
		return vm.Domain{}, classify(err)
	}
	if d.UUID, err = dom.GetUUIDString(); err != nil {
		return vm.Domain{}, classify(err)
	}
	state, _, err := dom.GetState()
	if err != nil {
		return vm.Domain{}, classify(err)
	}
	d.Running = state == libvirt.DOMAIN_RUNNING
	desc, err := dom.GetXMLDesc(0)
	if err != nil {
		return vm.Domain{}, classify(err)
	}
	var x domainXML
	if err := xml.Unmarshal([]byte(desc), &x); err != nil {
		return vm.Domain{}, fmt.Errorf("domain %s: XML: %w", d.Name, err)
	}
	for _, iface := range x.Interfaces {
		if iface.MAC.Address != "" {
			d.MACs = append(d.MACs, strings.ToLower(iface.MAC.Address))
		}
	}
	for _, l := range x.Metadata.Labels.Label {
		if d.Labels == nil {
			d.Labels = make(map[string]string)
		}
		d.Labels[l.Key] = l.Value
	}
	return d, nil
}

type domainXML struct {
	Interfaces []struct {
		MAC struct {
			Address string `xml:"address,attr"`
		} `xml:"mac"`
	} `xml:"devices>interface"`
	Metadata struct {
		Labels struct {
			Label []struct {
				Key   string `xml:"key,attr"`
				Value string `xml:",chardata"`
			} `xml:"label"`
		} `xml:"https://bastion.invalid/labels labels"` // vm.LabelsNamespace; a tag must be a literal
	} `xml:"metadata"`
}

// domain looks d up again by UUID on its own hypervisor, so that calls
// survive reconnections and find the VM after it migrates between URIs of
// the pool. The caller frees the result.
func (p *Pool) domain(d vm.Domain) (*libvirt.Domain, error) {
	dom, err := p.lookup(d.URI, func(c *libvirt.Connect) (*libvirt.Domain, error) { return c.LookupDomainByUUIDString(d.UUID) })
	switch {
	case err == nil:
		return dom, nil
	case !errors.Is(err, vm.ErrNoSuchVM) && !errors.Is(err, ErrUnavailable):
		return nil, err
	}
	for _, uri := range p.uris {
		if uri == d.URI {
			continue
		}
		if c, err := p.conn(uri); err == nil {
			if dom, err := c.LookupDomainByUUIDString(d.UUID); err == nil {
				return dom, nil
			}
		}
	}
	if errors.Is(err, ErrUnavailable) {
		return nil, err
	}
	return nil, fmt.Errorf("%w: %s (%s)", vm.ErrNoSuchVM, d.Name, d.UUID)
}

// classify maps a libvirt error onto this package's errors, keeping
// libvirt's message as detail.
func classify(err error) error {
	var lerr libvirt.Error
	if !errors.As(err, &lerr) {
		return err
	}
	msg := lerr.Message
	switch {
	case lerr.Code == libvirt.ERR_NO_DOMAIN:
		return fmt.Errorf("%w: %s", vm.ErrNoSuchVM, msg)
	case strings.Contains(msg, "failed to lookup user"):
		return fmt.Errorf("%w: %s", ErrNoSuchUser, msg)
	case strings.Contains(msg, "has been disabled"):
		return fmt.Errorf("%w: %s", ErrCommandDisabled, msg)
	case strings.Contains(msg, "is not running"):
		return fmt.Errorf("%w: %s", vm.ErrNotRunning, msg)
	case strings.Contains(msg, "agent is not connected"):
		return fmt.Errorf("%w: %s", ErrAgentNotConnected, msg)
	case lerr.Code == libvirt.ERR_AGENT_UNRESPONSIVE, lerr.Code == libvirt.ERR_AGENT_COMMAND_TIMEOUT:
		return fmt.Errorf("%w: %s", ErrAgentSilent, msg)
	case lerr.Code == libvirt.ERR_OPERATION_TIMEOUT:
		return fmt.Errorf("%w: %s", ErrTimeout, msg)
	case lerr.Code == libvirt.ERR_OPERATION_INVALID && strings.Contains(msg, "not running"):
		return fmt.Errorf("%w: %s", vm.ErrNotRunning, msg)
	case lerr.Code == libvirt.ERR_AGENT_COMMAND_FAILED, lerr.Code == libvirt.ERR_INTERNAL_ERROR && strings.Contains(msg, "agent"):
		return fmt.Errorf("%w: %s", ErrAgentFailed, msg)
	case lerr.Code == libvirt.ERR_SYSTEM_ERROR, lerr.Code == libvirt.ERR_RPC, lerr.Code == libvirt.ERR_INVALID_CONN:
		return fmt.Errorf("%w: %s", ErrUnavailable, msg)
	}
	return errors.New(msg)
}

func libvirtMessage(err error) string {
	var lerr libvirt.Error
	if errors.As(err, &lerr) {
		return lerr.Message
	}
	return err.Error()
}

// Package metrics serves the bastion's operations endpoints: Prometheus
// metrics on /metrics, liveness on /healthz and readiness on /readyz.
//
// Labels are bounded: an event type, a result, never a person, a source
// address or a VM name. The counters are fed from the audit stream, so
// that what the metrics count and what the trail records cannot drift
// apart.
package metrics

import (
	"fmt"
	"net/http"
	"runtime"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/bastionvm/bastion/bastion/audit"
)

// Metrics holds the bastion's collectors in a registry of its own.
type Metrics struct {
	reg *prometheus.Registry

	auditEvents     *prometheus.CounterVec
	authentications *prometheus.CounterVec
	denials         *prometheus.CounterVec
	upstreams       *prometheus.CounterVec
	trustChecks     *prometheus.CounterVec
	trustSeconds    *prometheus.HistogramVec
	trustDrops      prometheus.Counter
	reloads         *prometheus.CounterVec
	dispenses       *prometheus.CounterVec
}

// New makes the collectors, with the build's version in bastion_build_info.
func New(version string) *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	counter := func(name, help string, labels ...string) *prometheus.CounterVec {
		c := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "bastion_" + name, Help: help}, labels)
		m.reg.MustRegister(c)
		return c
	}
	m.auditEvents = counter("audit_events_total", "Audit events emitted, by type.", "type")
	m.authentications = counter("authentications_total", "Front-door authentications, by result (success, failure).", "result")
	m.denials = counter("policy_denials_total", "Requests the policy or the front door refused, by channel kind.", "channel")
	m.upstreams = counter("upstream_connections_total", "Upstream connections to VMs, by result (connected, failed).", "result")
	m.trustChecks = counter("trust_checks_total", "Dual-band trust checks, by result (verified, failed).", "result")
	m.reloads = counter("reloads_total", "Configuration reloads, by result (ok, failed).", "result")
	m.dispenses = counter("dispenses_total", "VMs made from templates, by result (ok, failed).", "result")
	m.trustSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "bastion_trust_check_duration_seconds",
		Help:    "How long dual-band checks took, by result (verified, failed).",
		Buckets: []float64{0.25, 0.5, 1, 2, 4, 8, 16, 32},
	}, []string{"result"})
	m.trustDrops = prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_trust_dropped_total", Help: "Trusts dropped before their expiry."})
	info := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "bastion_build_info",
		Help:        "The running build: always 1, with its version and Go version as labels.",
		ConstLabels: prometheus.Labels{"version": version, "goversion": runtime.Version()},
	})
	info.Set(1)
	m.reg.MustRegister(m.trustSeconds, m.trustDrops, info,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	// Series that exist from the start, so that rate() and alerts see a 0
	// before the first event rather than no series at all.
	for _, r := range []string{"success", "failure"} {
		m.authentications.WithLabelValues(r)
	}
	for _, r := range []string{"verified", "failed"} {
		m.trustChecks.WithLabelValues(r)
	}
	for _, r := range []string{"connected", "failed"} {
		m.upstreams.WithLabelValues(r)
	}
	for _, r := range []string{"ok", "failed"} {
		m.reloads.WithLabelValues(r)
		m.dispenses.WithLabelValues(r)
	}
	return m
}

// Register adds a collector of the caller's (a gauge read at scrape time,
// say) to the registry.
func (m *Metrics) Register(c prometheus.Collector) { m.reg.MustRegister(c) }

// knownTypes bounds the type label to the documented event types.
var knownTypes = map[audit.Type]bool{
	audit.Login: true, audit.LoginFailed: true, audit.Denied: true, audit.Connected: true,
	audit.UpstreamFailed: true, audit.Disconnected: true, audit.TrustVerified: true, audit.TrustFailed: true,
	audit.TrustDropped: true, audit.HostKeyChanged: true, audit.Reloaded: true, audit.ReloadFailed: true,
	audit.Ended: true, audit.Dispensed: true, audit.DispenseFailed: true, audit.Destroyed: true,
	audit.SessionStart: true, audit.SessionEnd: true, audit.ForwardStart: true, audit.ForwardEnd: true,
}

// knownChannels bounds the channel label of denials.
var knownChannels = map[string]bool{
	"shell": true, "exec": true, "scp": true, "scp-read": true, "sftp": true, "sftp-read": true,
	"local-forward": true, "remote-forward": true, "agent": true, "x11": true, "dispense": true,
	"destroy": true, "jump": true,
}

// Observe counts e. It is an audit.Sink: tee the bastion's sink into it.
func (m *Metrics) Observe(e audit.Event) {
	t := string(e.Type)
	if !knownTypes[e.Type] {
		t = "other"
	}
	m.auditEvents.WithLabelValues(t).Inc()
	switch e.Type {
	case audit.Login:
		m.authentications.WithLabelValues("success").Inc()
	case audit.LoginFailed:
		m.authentications.WithLabelValues("failure").Inc()
	case audit.Denied:
		ch := e.Channel
		if !knownChannels[ch] {
			ch = "other"
		}
		m.denials.WithLabelValues(ch).Inc()
	case audit.Connected:
		m.upstreams.WithLabelValues("connected").Inc()
	case audit.UpstreamFailed:
		m.upstreams.WithLabelValues("failed").Inc()
	case audit.TrustVerified, audit.TrustFailed:
		result := "verified"
		if e.Type == audit.TrustFailed {
			result = "failed"
		}
		m.trustChecks.WithLabelValues(result).Inc()
		if took, ok := tookOf(e.Detail); ok {
			m.trustSeconds.WithLabelValues(result).Observe(took.Seconds())
		}
	case audit.TrustDropped:
		m.trustDrops.Inc()
	case audit.Reloaded:
		m.reloads.WithLabelValues("ok").Inc()
	case audit.ReloadFailed:
		m.reloads.WithLabelValues("failed").Inc()
	case audit.Dispensed:
		m.dispenses.WithLabelValues("ok").Inc()
	case audit.DispenseFailed:
		m.dispenses.WithLabelValues("failed").Inc()
	}
}

// tookOf reads the "took 1.63s" fact of a trust event's detail.
func tookOf(detail string) (time.Duration, bool) {
	f := strings.Fields(detail)
	for i := 0; i+1 < len(f); i++ {
		if f[i] == "took" {
			d, err := time.ParseDuration(f[i+1])
			return d, err == nil
		}
	}
	return 0, false
}

// Handler serves /metrics, /healthz (the process answers) and /readyz
// (ready says why it is not, or nil; a load balancer sends no new
// connections while it is not).
func (m *Metrics) Handler(ready func() error) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if err := ready(); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	return mux
}

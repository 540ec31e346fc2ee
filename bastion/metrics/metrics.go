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
	upstreamReuses  prometheus.Counter
	trustChecks     *prometheus.CounterVec
	trustSeconds    *prometheus.HistogramVec
	trustDrops      prometheus.Counter
	reloads         *prometheus.CounterVec
	dispenses       *prometheus.CounterVec

	bytes           *prometheus.CounterVec
	channels        *prometheus.CounterVec
	channelsActive  *prometheus.GaugeVec
	sessionSeconds  prometheus.Histogram
	files           *prometheus.CounterVec
	fileOps         *prometheus.CounterVec
	recordings      *prometheus.CounterVec
	recordingFailed prometheus.Counter
	recordingBytes  prometheus.Counter
	auditFailures   prometheus.Counter
	dialSeconds     prometheus.Histogram
	upstreamFailed  *prometheus.CounterVec
	dispenseSeconds *prometheus.HistogramVec
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
	m.upstreams = counter("upstream_connections_total", "Upstream connections to VMs dialled, by result (connected, failed).", "result")
	m.upstreamReuses = prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_upstream_reuses_total",
		Help: "Links to VMs that joined an upstream connection another link had made (server.upstream_max_sessions), with no dial."})
	m.trustChecks = counter("trust_checks_total", "Dual-band trust checks, by result (verified, failed).", "result")
	m.reloads = counter("reloads_total", "Configuration reloads, by result (ok, failed).", "result")
	m.dispenses = counter("dispenses_total", "VMs made from templates, by result (ok, failed).", "result")
	m.trustSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "bastion_trust_check_duration_seconds",
		Help:    "How long dual-band checks took, by result (verified, failed).",
		Buckets: []float64{0.25, 0.5, 1, 2, 4, 8, 16, 32},
	}, []string{"result"})
	m.trustDrops = prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_trust_dropped_total", Help: "Trusts dropped before their expiry."})
	m.bytes = counter("bytes_total", "Bytes carried by sessions and forwards that ended, by direction (up: to the VM, down: from it).", "direction")
	m.channels = counter("channels_opened_total", "Session and forward channels that started, by type (shell, exec, subsystem, or the forward's SSH channel type).", "type")
	m.channelsActive = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "bastion_channels_active", Help: "Session and forward channels open now, by kind (session, forward)."}, []string{"kind"})
	m.sessionSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "bastion_session_duration_seconds",
		Help:    "How long sessions (shell, exec, subsystem) ran.",
		Buckets: []float64{1, 10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600},
	})
	m.files = counter("sftp_files_total", "Files sftp sessions closed, by direction (upload, download, both, none) and status (ok, partial, denied, error).", "direction", "status")
	m.fileOps = counter("sftp_file_operations_total", "sftp operations other than reading and writing (rename, remove, mkdir, rmdir, setstat, symlink, link), by op and status.", "op", "status")
	m.recordings = counter("recordings_total", "Session recordings sealed, by result (whole, capped).", "result")
	m.recordingFailed = prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_recording_failures_total", Help: "Sessions refused because their recording could not be written."})
	m.auditFailures = prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_audit_write_failures_total", Help: "Audit events that could not be written to the trail."})
	m.recordingBytes = prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_recording_bytes_total", Help: "Bytes of session recordings sealed."})
	m.dialSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "bastion_upstream_dial_duration_seconds",
		Help:    "How long reaching a VM's sshd took once it was verified: the wait for a turn, TCP, the handshake and authentication.",
		Buckets: []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30},
	})
	m.upstreamFailed = counter("upstream_failures_total", "Upstream connections that failed, by cause ("+strings.Join(audit.Causes, ", ")+").", "cause")
	m.dispenseSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "bastion_dispense_duration_seconds",
		Help:    "How long making a VM from a template took, until it was reachable, by result (ok, failed).",
		Buckets: []float64{1, 5, 10, 20, 30, 60, 120, 300, 600},
	}, []string{"result"})
	m.reg.MustRegister(m.upstreamReuses, m.channelsActive, m.sessionSeconds, m.recordingFailed, m.recordingBytes, m.auditFailures, m.dialSeconds, m.dispenseSeconds)
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
	for _, d := range []string{"up", "down"} {
		m.bytes.WithLabelValues(d)
	}
	for _, k := range []string{"session", "forward"} {
		m.channelsActive.WithLabelValues(k)
	}
	for _, r := range []string{"whole", "capped"} {
		m.recordings.WithLabelValues(r)
	}
	for _, c := range audit.Causes {
		m.upstreamFailed.WithLabelValues(c)
	}
	return m
}

// AuditWriteFailed counts an audit event the trail could not take.
func (m *Metrics) AuditWriteFailed() { m.auditFailures.Inc() }

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
	audit.File: true,
}

// knownKinds bounds the type label of channels.
var knownKinds = map[string]bool{
	"shell": true, "exec": true, "subsystem": true, "direct-tcpip": true, "forwarded-tcpip": true,
	"auth-agent@openssh.com": true, "x11": true, "direct-streamlocal@openssh.com": true,
	"forwarded-streamlocal@openssh.com": true,
}

// knownFileOps bounds the labels of file events.
var knownFileOps = map[string]bool{
	"rename": true, "remove": true, "mkdir": true, "rmdir": true, "setstat": true, "symlink": true, "link": true,
	"ok": true, "partial": true, "denied": true, "error": true, "upload": true, "download": true, "both": true, "none": true,
}

// knownCauses bounds the cause label of upstream failures.
var knownCauses = func() map[string]bool {
	known := make(map[string]bool)
	for _, c := range audit.Causes {
		known[c] = true
	}
	return known
}()

// bounded is v if known says so, else "other".
func bounded(known map[string]bool, v string) string {
	if known[v] {
		return v
	}
	return "other"
}

// knownChannels bounds the channel label of denials.
var knownChannels = map[string]bool{
	"shell": true, "exec": true, "scp": true, "scp-read": true, "sftp": true, "sftp-read": true,
	"local-forward": true, "remote-forward": true, "agent": true, "x11": true, "dispense": true,
	"destroy": true, "jump": true, "watch": true, "connect": true, "session": true, "direct-tcpip": true,
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
		m.denials.WithLabelValues(bounded(knownChannels, e.Channel)).Inc()
		if strings.HasPrefix(e.Reason, "the recording cannot be written") {
			m.recordingFailed.Inc()
		}
	case audit.SessionStart, audit.ForwardStart:
		if e.Activity != nil && e.Channel != "watch" && e.Channel != "command" {
			m.channels.WithLabelValues(bounded(knownKinds, e.Kind)).Inc()
			m.channelsActive.WithLabelValues(channelKind(e.Type)).Inc()
		}
	case audit.SessionEnd, audit.ForwardEnd:
		if e.Activity != nil && e.Channel != "watch" && e.Channel != "command" {
			m.channelsActive.WithLabelValues(channelKind(e.Type)).Dec()
			m.bytes.WithLabelValues("up").Add(float64(e.BytesUp))
			m.bytes.WithLabelValues("down").Add(float64(e.BytesDown))
			if e.Type == audit.SessionEnd {
				m.sessionSeconds.Observe(e.Seconds)
			}
			switch {
			case e.Recording != "" && e.RecordingCapped:
				m.recordings.WithLabelValues("capped").Inc()
			case e.Recording != "":
				m.recordings.WithLabelValues("whole").Inc()
			}
			m.recordingBytes.Add(float64(e.RecordingBytes))
		}
	case audit.File:
		if e.Activity == nil {
			break
		}
		switch e.Op {
		case "file":
			m.files.WithLabelValues(bounded(knownFileOps, or(e.Direction, "none")), bounded(knownFileOps, e.Status)).Inc()
		case "summary":
		default:
			m.fileOps.WithLabelValues(bounded(knownFileOps, e.Op), bounded(knownFileOps, e.Status)).Inc()
		}
	case audit.Connected:
		if e.Reused {
			m.upstreamReuses.Inc() // no dial: neither a connection nor its duration
			break
		}
		m.upstreams.WithLabelValues("connected").Inc()
		if e.Activity != nil {
			m.dialSeconds.Observe(e.Seconds)
		}
	case audit.UpstreamFailed:
		m.upstreams.WithLabelValues("failed").Inc()
		m.upstreamFailed.WithLabelValues(bounded(knownCauses, e.Cause)).Inc()
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
	case audit.Dispensed, audit.DispenseFailed:
		result := "ok"
		if e.Type == audit.DispenseFailed {
			result = "failed"
		}
		m.dispenses.WithLabelValues(result).Inc()
		if e.Activity != nil {
			m.dispenseSeconds.WithLabelValues(result).Observe(e.Seconds)
		}
	}
}

// channelKind is session or forward, for the active gauge.
func channelKind(t audit.Type) string {
	if t == audit.SessionStart || t == audit.SessionEnd {
		return "session"
	}
	return "forward"
}

func or(s, def string) string {
	if s == "" {
		return def
	}
	return s
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

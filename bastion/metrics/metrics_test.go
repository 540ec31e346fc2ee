package metrics

import (
	"io"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/bastionvm/bastion/bastion/audit"
)

func scrape(t *testing.T, m *Metrics) string {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler(func() error { return nil }).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Result().Body)
	return string(body)
}

// Labels stay bounded whatever the events carry, and a trust check's
// duration is read from its detail.
func TestObserve(t *testing.T) {
	m := New("test")
	m.Observe(audit.Event{Type: "made_up", Account: "alice"})
	m.Observe(audit.Event{Type: audit.Denied, Channel: "x; rm -rf /", VM: "web1"})
	m.Observe(audit.Event{Type: audit.Denied, Channel: "sftp"})
	m.Observe(audit.Event{Type: audit.TrustVerified, Detail: "addr 10.0.0.5:22 host key SHA256:x modes [ob-ib ib-ob] expires 2026-12-02T10:00:00Z took 1.63s"})
	m.Observe(audit.Event{Type: audit.TrustFailed, Detail: "took 40s"})
	body := scrape(t, m)
	for _, want := range []string{
		`bastion_audit_events_total{type="other"} 1`,
		`bastion_policy_denials_total{channel="other"} 1`,
		`bastion_policy_denials_total{channel="sftp"} 1`,
		`bastion_trust_checks_total{result="verified"} 1`,
		`bastion_trust_check_duration_seconds_bucket{result="verified",le="2"} 1`,
		`bastion_trust_check_duration_seconds_bucket{result="verified",le="1"} 0`,
		`bastion_trust_check_duration_seconds_bucket{result="failed",le="32"} 0`,
		`bastion_trust_check_duration_seconds_count{result="failed"} 1`,
	} {
		if !strings.Contains(body, want+"\n") {
			t.Errorf("no %s in:\n%s", want, body)
		}
	}
	for _, never := range []string{"made_up", "alice", "web1", "rm -rf"} {
		if strings.Contains(body, never) {
			t.Errorf("the metrics carry %q", never)
		}
	}
}

// Sessions, forwards and sftp files move the channel, byte, duration,
// file and recording series.
func TestObserveSessions(t *testing.T) {
	m := New("test")
	status := 0
	m.Observe(audit.Event{Type: audit.SessionStart, Activity: &audit.Activity{Kind: "shell"}})
	m.Observe(audit.Event{Type: audit.ForwardStart, Activity: &audit.Activity{Kind: "direct-tcpip"}})
	m.Observe(audit.Event{Type: audit.SessionEnd, Activity: &audit.Activity{Kind: "shell", ExitStatus: &status, Seconds: 90, BytesUp: 10, BytesDown: 1000,
		Recording: "s-1", RecordingCapped: true, RecordingBytes: 4096}})
	m.Observe(audit.Event{Type: audit.Connected, Activity: &audit.Activity{Seconds: 0.3}})
	m.Observe(audit.Event{Type: audit.Connected, Reused: true, Activity: &audit.Activity{Seconds: 0.001}})
	m.Observe(audit.Event{Type: audit.UpstreamFailed, Cause: "auth"})
	m.Observe(audit.Event{Type: audit.UpstreamFailed, Cause: "10.0.0.5 said no"})
	m.Observe(audit.Event{Type: audit.Dispensed, Activity: &audit.Activity{Seconds: 25}})
	m.Observe(audit.Event{Type: audit.File, Activity: &audit.Activity{Op: "file", Direction: "upload", Status: "ok"}})
	m.Observe(audit.Event{Type: audit.File, Activity: &audit.Activity{Op: "rename", Status: "denied"}})
	m.Observe(audit.Event{Type: audit.Denied, Channel: "shell", Reason: "the recording cannot be written: no space left on device"})
	m.AuditWriteFailed()
	body := scrape(t, m)
	for _, want := range []string{
		`bastion_channels_opened_total{type="shell"} 1`,
		`bastion_channels_opened_total{type="direct-tcpip"} 1`,
		`bastion_channels_active{kind="session"} 0`,
		`bastion_channels_active{kind="forward"} 1`,
		`bastion_bytes_total{direction="up"} 10`,
		`bastion_bytes_total{direction="down"} 1000`,
		`bastion_session_duration_seconds_bucket{le="60"} 0`,
		`bastion_session_duration_seconds_bucket{le="300"} 1`,
		`bastion_recordings_total{result="capped"} 1`,
		`bastion_recording_failures_total 1`,
		`bastion_sftp_files_total{direction="upload",status="ok"} 1`,
		`bastion_sftp_file_operations_total{op="rename",status="denied"} 1`,
		`bastion_audit_write_failures_total 1`,
		`bastion_recording_bytes_total 4096`,
		`bastion_upstream_connections_total{result="connected"} 1`,
		`bastion_upstream_reuses_total 1`,
		`bastion_upstream_dial_duration_seconds_bucket{le="0.01"} 0`,
		`bastion_upstream_dial_duration_seconds_bucket{le="0.25"} 0`,
		`bastion_upstream_dial_duration_seconds_bucket{le="0.5"} 1`,
		`bastion_upstream_failures_total{cause="auth"} 1`,
		`bastion_upstream_failures_total{cause="other"} 1`,
		`bastion_upstream_failures_total{cause="timeout"} 0`,
		`bastion_dispense_duration_seconds_bucket{result="ok",le="20"} 0`,
		`bastion_dispense_duration_seconds_bucket{result="ok",le="30"} 1`,
	} {
		if !strings.Contains(body, want+"\n") {
			t.Errorf("no %s in:\n%s", want, body)
		}
	}
}

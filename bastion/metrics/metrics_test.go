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

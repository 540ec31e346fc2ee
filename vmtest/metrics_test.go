package vmtest

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/bastionvm/bastion/internal/testenv"
)

// TestMetricsScrapedByPrometheus: Debian's Prometheus scrapes the
// operations listener of a bastion in front of a real guest; after one
// ssh -J exec, its queries see the channel, the bytes, the session's
// duration, the dial, the verified trust and the guest's agent up.
func TestMetricsScrapedByPrometheus(t *testing.T) {
	prometheus := testenv.Need(t, "prometheus")
	b := newBastionProc(t, "", sharingRule)
	ops := testenv.FreeAddr(t)
	// The connection to the guest is kept while the test queries.
	b.server(fmt.Sprintf("ops_listen = %q\nupstream_linger = \"10m\"", ops))
	b.launch()

	dir := t.TempDir()
	write(t, filepath.Join(dir, "prometheus.yml"), fmt.Sprintf(`global:
  scrape_interval: 1s
scrape_configs:
  - job_name: bastion
    static_configs:
      - targets: [%q]
`, ops))
	web := testenv.FreeAddr(t)
	cmd := exec.Command(prometheus, "--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"), "--web.listen-address="+web)
	log, err := os.Create(filepath.Join(dir, "prometheus.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatalf("prometheus: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			out, _ := os.ReadFile(log.Name())
			t.Logf("prometheus:\n%s", out)
		}
	})
	query := func(q string) (float64, bool) {
		resp, err := http.Get("http://" + web + "/api/v1/query?query=" + url.QueryEscape(q))
		if err != nil {
			return 0, false
		}
		defer resp.Body.Close()
		var r struct {
			Data struct {
				Result []struct {
					Value [2]any `json:"value"`
				} `json:"result"`
			} `json:"data"`
		}
		if json.NewDecoder(resp.Body).Decode(&r) != nil || len(r.Data.Result) != 1 {
			return 0, false
		}
		s, _ := r.Data.Result[0].Value[1].(string)
		v, err := strconv.ParseFloat(s, 64)
		return v, err == nil
	}
	waitFor(t, func() bool { v, ok := query(`up{job="bastion"}`); return ok && v == 1 }, "Prometheus scraping the bastion")
	if v, ok := query(`bastion_trusts{state="valid"}`); !ok || v != 0 {
		t.Fatalf("before any login: bastion_trusts{state=\"valid\"} = %v (%v)", v, ok)
	}

	const size = 1 << 20
	res := b.ssh(nil, "root@"+web1, "head -c "+strconv.Itoa(size)+" /dev/zero")
	if res.Exit != 0 || len(res.Stdout) != size {
		t.Fatalf("ssh -J exec: %v, %d bytes", res, len(res.Stdout))
	}
	for q, want := range map[string]func(float64) bool{
		`bastion_channels_opened_total{type="exec"}`:                    func(v float64) bool { return v == 1 },
		`bastion_channels_active{kind="session"}`:                       func(v float64) bool { return v == 0 },
		`bastion_bytes_total{direction="down"}`:                         func(v float64) bool { return v == size },
		`bastion_session_duration_seconds_count`:                        func(v float64) bool { return v == 1 },
		`bastion_upstream_dial_duration_seconds_count`:                  func(v float64) bool { return v == 1 },
		`bastion_upstream_connections_total{result="connected"}`:        func(v float64) bool { return v == 1 },
		`bastion_upstream_idle`:                                         func(v float64) bool { return v == 1 },
		`bastion_trust_checks_total{result="verified"}`:                 func(v float64) bool { return v == 1 },
		`bastion_trust_check_duration_seconds_count{result="verified"}`: func(v float64) bool { return v == 1 },
		`bastion_trusts{state="valid"}`:                                 func(v float64) bool { return v == 1 },
		`bastion_guest_agents{state="up"}`:                              func(v float64) bool { return v >= 1 },
		`bastion_authentications_total{result="success"}`:               func(v float64) bool { return v >= 1 },
		`bastion_audit_events_total{type="session_end"}`:                func(v float64) bool { return v == 1 },
	} {
		var got float64
		var ok bool
		deadline := time.Now().Add(20 * time.Second)
		for {
			if got, ok = query(q); ok && want(got) {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("%s = %v (answered: %v)", q, got, ok)
				break
			}
			time.Sleep(250 * time.Millisecond)
		}
	}
}

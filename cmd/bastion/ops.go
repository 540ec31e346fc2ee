package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"runtime/debug"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/bastion/metrics"
	"github.com/bastionvm/bastion/bastion/trust"
	"github.com/bastionvm/bastion/hypervisor"
)

// serveOps starts the operations listener (server.ops_listen): metrics,
// liveness and readiness. Ready means the configuration is loaded (it is,
// once this runs), every hypervisor answers, and the server is not
// draining. It returns a function that stops the listener.
func serveOps(addr string, m *metrics.Metrics, srv *bastion.Server, pool *hypervisor.Pool, trusts *trust.Manager, logger *slog.Logger) (func(), error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("server.ops_listen: %w", err)
	}
	gauge := func(name, help string, labels prometheus.Labels, f func() float64) {
		m.Register(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "bastion_" + name, Help: help, ConstLabels: labels}, f))
	}
	gauge("connections_active", "Authenticated front-door connections open now.", nil,
		func() float64 { n, _ := srv.Counts(); return float64(n) })
	gauge("connections_unauthenticated", "Front-door connections not yet authenticated (each holds a max_startups place).", nil,
		func() float64 { return float64(srv.Unauthenticated()) })
	gauge("links_active", "Links to VMs open now (one connection's channels to one VM).", nil,
		func() float64 { _, n := srv.Counts(); return float64(n) })
	gauge("upstream_idle", "Connections to VMs open with no session, kept for their person's next login (server.upstream_linger).", nil,
		func() float64 { return float64(srv.IdleUpstreams()) })
	gauge("ready", "1 while /readyz answers ready, else 0.", nil,
		func() float64 {
			if ready(srv, pool) != nil {
				return 0
			}
			return 1
		})
	if trusts != nil {
		const help = "Trusts by state: valid (verified and unexpired), checking (a dual-band check under way)."
		gauge("trusts", help, prometheus.Labels{"state": "valid"}, func() float64 { n, _ := trusts.Counts(); return float64(n) })
		gauge("trusts", help, prometheus.Labels{"state": "checking"}, func() float64 { _, n := trusts.Counts(); return float64(n) })
	}
	if pool != nil {
		const help = "Running guests whose agent answered the last command or event (up) or did not (down), of those heard from since start."
		gauge("guest_agents", help, prometheus.Labels{"state": "up"}, func() float64 { n, _ := pool.Agents(); return float64(n) })
		gauge("guest_agents", help, prometheus.Labels{"state": "down"}, func() float64 { _, n := pool.Agents(); return float64(n) })
	}
	hs := &http.Server{
		Handler:           m.Handler(func() error { return ready(srv, pool) }),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		MaxHeaderBytes:    16 << 10,
	}
	go func() {
		if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			logger.Error("operations listener stopped", "err", err)
		}
	}()
	logger.Info("operations listener", "addr", ln.Addr().String())
	return func() { hs.Close() }, nil
}

// ready is nil when the bastion should be sent new connections.
func ready(srv *bastion.Server, pool *hypervisor.Pool) error {
	if srv.Draining() {
		return errors.New("draining")
	}
	if pool != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		if err := pool.Reachable(ctx); err != nil {
			return err
		}
	}
	return nil
}

// tee sends every event to each sink in turn.
func tee(sinks ...audit.Sink) audit.Sink {
	return func(e audit.Event) {
		for _, s := range sinks {
			s.Emit(e)
		}
	}
}

// buildVersion is the module version this binary was built from, or
// "devel" (with the VCS revision when the build recorded one).
func buildVersion() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	if v := info.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	for _, s := range info.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			return "devel-" + s.Value[:12]
		}
	}
	return "devel"
}

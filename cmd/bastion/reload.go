package main

import (
	"context"
	"log/slog"
	"net/netip"
	"os"
	"sync/atomic"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/policy"
	"github.com/bastionvm/bastion/vm"
)

// live holds the accounts and policy the front door uses, swapped whole on
// a reload.
type live struct {
	accounts atomic.Pointer[bastion.AccountSet]
	policy   atomic.Pointer[policy.Policy]
}

func newLive(c *Config) (*live, error) {
	accounts, err := c.accounts()
	if err != nil {
		return nil, err
	}
	l := &live{}
	l.accounts.Store(accounts)
	l.policy.Store(c.policy)
	return l, nil
}

func (l *live) Identify(key gossh.PublicKey) (bastion.Account, bool) {
	return l.accounts.Load().Identify(key)
}

func (l *live) IdentifyCert(cert *gossh.Certificate, account string, source netip.Addr, now time.Time) (bastion.Account, *bastion.CertLogin, error) {
	return l.accounts.Load().IdentifyCert(cert, account, source, now)
}

func (l *live) Revoked(key gossh.PublicKey) string { return l.accounts.Load().Revoked(key) }

func (l *live) Decide(r policy.Request) policy.Decision {
	return l.policy.Load().Decide(r)
}

func (l *live) Possible(r policy.Request, kinds ...policy.Channel) bool {
	return l.policy.Load().Possible(r, kinds...)
}

func (l *live) Logins(account string, groups []string, source netip.Addr, d vm.Domain, t time.Time) []string {
	return l.policy.Load().Logins(account, groups, source, d, t)
}

// reloader re-reads the configuration on SIGHUP (a receive on hup) and when
// the configuration or policy file changes. A configuration that fails to
// load leaves the running one in place, and the log says why.
type reloader struct {
	path    string
	live    *live
	srv     *bastion.Server
	log     *slog.Logger
	policy  string // the policy file in use, if separate
	revoked string // the KRL in use, if any
	seen    map[string]time.Time
}

func (r *reloader) run(ctx context.Context, hup <-chan os.Signal) {
	r.seen = r.stamps()
	tick := time.NewTicker(2 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			r.reload("SIGHUP")
		case <-tick.C:
			if now := r.stamps(); changed(r.seen, now) {
				r.seen = now
				r.reload("file changed")
			}
		}
	}
}

func (r *reloader) stamps() map[string]time.Time {
	out := make(map[string]time.Time)
	for _, p := range []string{r.path, r.policy, r.revoked} {
		if p == "" {
			continue
		}
		if info, err := os.Stat(p); err == nil {
			out[p] = info.ModTime()
		}
	}
	return out
}

func changed(a, b map[string]time.Time) bool {
	if len(a) != len(b) {
		return true
	}
	for k, v := range a {
		if !b[k].Equal(v) {
			return true
		}
	}
	return false
}

func (r *reloader) reload(why string) {
	// What is read now is what the next tick compares with: a file that
	// failed after SIGHUP is not tried again until it changes.
	r.seen = r.stamps()
	c, err := LoadConfig(r.path)
	if err != nil {
		r.log.Error("reload failed; the running configuration stays", "why", why, "err", err)
		r.srv.ReloadFailed(why, err)
		return
	}
	accounts, err := c.accounts()
	if err != nil {
		r.log.Error("reload failed; the running configuration stays", "why", why, "err", err)
		r.srv.ReloadFailed(why, err)
		return
	}
	r.live.accounts.Store(accounts)
	r.live.policy.Store(c.policy)
	r.policy, r.revoked = c.Server.PolicyFile, c.Server.RevokedKeys
	r.seen = r.stamps()
	r.log.Info("configuration reloaded: accounts and policy", "why", why, "rules", len(c.policy.Rules))
	r.srv.Reloaded(why)
}

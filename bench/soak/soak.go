// Package soak holds many sessions through one bastion for a while, then
// lets them go, and measures what the process holds before, at the peak and
// after: file descriptors, goroutines, heap. A session is one front-door
// connection (login@vm@bastion) with one kind of work on it, taken in turn:
// exec with output, sftp writes and reads, a -L forward carrying echoes,
// an idle shell. The target is a small SSH server in this process that runs
// no programs; the bastion is the real bastion.Server, as the package's
// own tests wire it.
//
// Everything runs in one process, so the figures are the process's: a
// leak in the bastion, the target or the clients shows alike.
package soak

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pkg/sftp"
	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/bastion/bastiontest"
	"github.com/bastionvm/bastion/internal/testenv"
	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/policy"
)

// Config says how hard and how long to soak.
type Config struct {
	Sessions    int           // held at once
	Duration    time.Duration // of the load, once every session is open
	Concurrency int           // sessions opened at a time; 0 means 32
	StateDir    string        // the bastion's host keys; required
	Log         io.Writer     // progress lines; nil discards them
}

// Figures are what the process holds at one moment.
type Figures struct {
	FDs        int
	Goroutines int
	HeapBytes  uint64 // in use, after a collection for Before and After
}

// Report is the outcome of a soak.
type Report struct {
	Sessions int
	Duration time.Duration
	Ops      map[string]int64 // completed operations by kind
	Lost     int              // sessions that failed at any point
	Errors   []string         // the first few failures
	Before   Figures
	Peak     Figures
	After    Figures
}

// gSize is about what the runtime keeps of every goroutine that ever ran
// at once: it never frees a goroutine's descriptor (runtime.malg), so a
// heap profile after a soak of 33,000 goroutines shows 15 MiB held there
// and nothing of the bastion's.
const gSize = 512

// Leaks lists what did not return to its baseline: a few descriptors and
// goroutines of slack (the runtime's own, timers draining), and of heap
// 16 MiB (the allocator keeps spans it may reuse) plus the runtime's
// goroutine descriptors at the peak.
func (r Report) Leaks() []string {
	var out []string
	if d := r.After.FDs - r.Before.FDs; d > 8 {
		out = append(out, fmt.Sprintf("%d file descriptors more than before the load", d))
	}
	if d := r.After.Goroutines - r.Before.Goroutines; d > 16 {
		out = append(out, fmt.Sprintf("%d goroutines more than before the load", d))
	}
	if r.After.HeapBytes > r.Before.HeapBytes+16<<20+uint64(r.Peak.Goroutines)*gSize {
		out = append(out, fmt.Sprintf("heap %d MiB after, %d MiB before", r.After.HeapBytes>>20, r.Before.HeapBytes>>20))
	}
	return out
}

// kinds of work, taken in turn by the sessions.
var kinds = []string{"exec", "sftp", "forward", "idle"}

const vmName = "web1"

// Run soaks a bastion with cfg and reports.
func Run(cfg Config) (Report, error) {
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 32
	}
	logw := cfg.Log
	if logw == nil {
		logw = io.Discard
	}
	logf := func(format string, args ...any) { fmt.Fprintf(logw, "soak: "+format+"\n", args...) }

	env, err := start(cfg.StateDir)
	if err != nil {
		return Report{}, err
	}
	defer env.stop()
	rep := Report{Sessions: cfg.Sessions, Duration: cfg.Duration, Ops: map[string]int64{}}
	rep.Before = settle(Figures{})
	logf("before: %+v", rep.Before)

	var (
		peakMu sync.Mutex
		ops    [4]atomic.Int64
		errMu  sync.Mutex
	)
	fail := func(err error) {
		errMu.Lock()
		defer errMu.Unlock()
		rep.Lost++
		if len(rep.Errors) < 10 {
			rep.Errors = append(rep.Errors, err.Error())
		}
	}
	sample := func() {
		f := measure(false)
		peakMu.Lock()
		rep.Peak.FDs = max(rep.Peak.FDs, f.FDs)
		rep.Peak.Goroutines = max(rep.Peak.Goroutines, f.Goroutines)
		rep.Peak.HeapBytes = max(rep.Peak.HeapBytes, f.HeapBytes)
		peakMu.Unlock()
	}
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				sample()
			case <-stopSampling:
				return
			}
		}
	}()

	// Open every session, cfg.Concurrency at a time, then let them work
	// until the load ends.
	var (
		opened  sync.WaitGroup
		working sync.WaitGroup
		slots   = make(chan struct{}, cfg.Concurrency)
		loadEnd = make(chan struct{})
	)
	began := time.Now()
	for i := range cfg.Sessions {
		opened.Add(1)
		working.Add(1)
		slots <- struct{}{}
		go func() {
			defer working.Done()
			kind := i % len(kinds)
			s, err := env.open(kinds[kind])
			<-slots
			opened.Done()
			if err != nil {
				fail(fmt.Errorf("session %d (%s): open: %w", i, kinds[kind], err))
				return
			}
			defer s.close()
			<-loadEnd // the load starts once all are open
			n, err := s.work(time.Now().Add(cfg.Duration))
			ops[kind].Add(n)
			if err != nil {
				fail(fmt.Errorf("session %d (%s): %w", i, kinds[kind], err))
			}
		}()
	}
	opened.Wait()
	logf("%d sessions open in %v (%d lost)", cfg.Sessions, time.Since(began).Round(time.Millisecond), rep.Lost)
	sample()
	close(loadEnd)
	working.Wait()
	close(stopSampling)
	<-sampled
	for k, name := range kinds {
		rep.Ops[name] = ops[k].Load()
	}
	logf("load over: ops %v, lost %d", rep.Ops, rep.Lost)

	rep.After = settle(rep.Before)
	logf("after: %+v", rep.After)
	return rep, nil
}

// measure reads the process's figures; collect runs the collector first.
func measure(collect bool) Figures {
	if collect {
		runtime.GC()
		debug.FreeOSMemory()
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	fds, _ := os.ReadDir("/proc/self/fd")
	return Figures{FDs: len(fds), Goroutines: runtime.NumGoroutine(), HeapBytes: ms.HeapInuse}
}

// settle measures once the process has calmed down: up to 30 seconds for
// connections to finish closing and goroutines to end, until the figures
// are within base's slack (or, with a zero base, stop falling).
func settle(base Figures) Figures {
	deadline := time.Now().Add(30 * time.Second)
	f := measure(true)
	for time.Now().Before(deadline) {
		time.Sleep(500 * time.Millisecond)
		next := measure(true)
		calm := next.Goroutines >= f.Goroutines && next.FDs >= f.FDs
		if base != (Figures{}) {
			calm = next.FDs <= base.FDs+8 && next.Goroutines <= base.Goroutines+16
		}
		f = next
		if calm {
			break
		}
	}
	return f
}

// env is the bastion, its target and what clients need to reach it.
type env struct {
	srv       *bastion.Server
	served    chan error
	addr      string
	client    *gossh.ClientConfig
	target    *target
	echoAddr  string
	echoClose func()
}

func start(stateDir string) (*env, error) {
	host, err := keys.LoadOrCreate(stateDir)
	if err != nil {
		return nil, err
	}
	clientKey, _, err := testenv.GenerateKey()
	if err != nil {
		return nil, err
	}
	upstreamKey, _, err := testenv.GenerateKey()
	if err != nil {
		return nil, err
	}
	tg, err := startTarget(upstreamKey.PublicKey())
	if err != nil {
		return nil, err
	}
	echoAddr, echoClose, err := startEcho()
	if err != nil {
		tg.close()
		return nil, err
	}
	accounts, err := bastion.NewAccountSet([]bastion.Account{{Name: "soak", Groups: []string{"soak"}, Keys: []gossh.PublicKey{clientKey.PublicKey()}}})
	if err != nil {
		return nil, err
	}
	fleet := bastiontest.NewFleet()
	fleet.Set(vmName, keys.Upstream{Addr: tg.addr, HostKeys: []gossh.PublicKey{tg.hostKey}, Signer: upstreamKey})
	e := &env{target: tg, echoAddr: echoAddr, echoClose: echoClose, served: make(chan error, 1)}
	e.srv = &bastion.Server{
		HostKey:   host.Key,
		Certifier: host,
		Hostnames: []string{"127.0.0.1", "localhost"},
		Accounts:  accounts,
		VMs:       fleet,
		Resolver:  fleet,
		Policy: &policy.Policy{Rules: []policy.Rule{{
			Name: "soak", Groups: []string{"soak"}, VMs: []string{vmName}, Logins: []string{"soak"},
			Channels: []policy.Channel{policy.Shell, policy.Exec, policy.SFTP, policy.LocalForward},
		}}},
		// A soak opens its sessions many at a time from one address.
		MaxStartups:          bastion.MaxStartups{Start: 200, Rate: 30, Full: 400},
		PerSourceMaxStartups: -1,
		MaxPending:           1 << 20,
		Logger:               slog.New(slog.DiscardHandler),
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	e.addr = ln.Addr().String()
	go func() { e.served <- e.srv.Serve(ln) }()
	ca := host.CA.PublicKey()
	e.client = &gossh.ClientConfig{
		User: "soak@" + vmName,
		Auth: []gossh.AuthMethod{gossh.PublicKeys(clientKey)},
		HostKeyCallback: (&gossh.CertChecker{IsHostAuthority: func(auth gossh.PublicKey, _ string) bool {
			return bytes.Equal(auth.Marshal(), ca.Marshal())
		}}).CheckHostKey,
		Timeout: time.Minute,
	}
	return e, nil
}

func (e *env) stop() {
	e.srv.Close()
	<-e.served
	e.target.close()
	e.echoClose()
}

// session is one front-door connection and its work.
type session struct {
	kind   string
	client *gossh.Client
	env    *env
	sftp   *sftp.Client
	shell  *gossh.Session
	stdin  io.WriteCloser
	stdout io.Reader
	fwd    net.Conn
}

func (e *env) open(kind string) (*session, error) {
	c, err := gossh.Dial("tcp", e.addr, e.client)
	if err != nil {
		return nil, err
	}
	s := &session{kind: kind, client: c, env: e}
	switch kind {
	case "sftp":
		s.sftp, err = sftp.NewClient(c)
	case "idle":
		if s.shell, err = c.NewSession(); err == nil {
			if s.stdin, err = s.shell.StdinPipe(); err == nil {
				if s.stdout, err = s.shell.StdoutPipe(); err == nil {
					err = s.shell.Shell()
				}
			}
		}
	case "forward":
		s.fwd, err = c.Dial("tcp", e.echoAddr)
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	return s, nil
}

func (s *session) close() {
	if s.sftp != nil {
		s.sftp.Close()
	}
	if s.fwd != nil {
		s.fwd.Close()
	}
	if s.shell != nil {
		s.shell.Close()
	}
	s.client.Close()
}

// pause is the think time between operations of one session.
const pause = time.Second

// work does the session's kind of work until end and returns how many
// operations it completed. An idle session proves itself alive once, at
// the end.
func (s *session) work(end time.Time) (int64, error) {
	var n int64
	for {
		if s.kind != "idle" || !time.Now().Before(end) {
			if err := s.op(); err != nil {
				return n, err
			}
			n++
		}
		if !time.Now().Before(end) {
			return n, nil
		}
		time.Sleep(min(pause, time.Until(end)))
	}
}

// exec output size and the sftp file and echo sizes.
const (
	execBytes  = 64 << 10
	fileBytes  = 32 << 10
	echoBytes  = 4 << 10
	opDeadline = time.Minute
)

func (s *session) op() error {
	switch s.kind {
	case "exec":
		sess, err := s.client.NewSession()
		if err != nil {
			return err
		}
		defer sess.Close()
		out, err := sess.Output(fmt.Sprintf("out %d", execBytes))
		if err != nil {
			return err
		}
		if len(out) != execBytes {
			return fmt.Errorf("exec: %d bytes of output, want %d", len(out), execBytes)
		}
	case "sftp":
		data := make([]byte, fileBytes)
		rand.Read(data)
		name := fmt.Sprintf("f-%p", s)
		f, err := s.sftp.Create(name)
		if err != nil {
			return err
		}
		if _, err := f.Write(data); err != nil {
			f.Close()
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
		f, err = s.sftp.Open(name)
		if err != nil {
			return err
		}
		got, err := io.ReadAll(f)
		f.Close()
		if err != nil {
			return err
		}
		if !bytes.Equal(got, data) {
			return errors.New("sftp: the file read back differs")
		}
		return s.sftp.Remove(name)
	case "forward":
		return roundTrip(s.fwd, s.fwd, echoBytes)
	case "idle":
		return roundTrip(s.stdin, s.stdout, 16)
	}
	return nil
}

// roundTrip writes n random bytes to w and reads them back from r.
func roundTrip(w io.Writer, r io.Reader, n int) error {
	data := make([]byte, n)
	rand.Read(data)
	got := make([]byte, n)
	ctx, cancel := context.WithTimeout(context.Background(), opDeadline)
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		_, err := io.ReadFull(r, got)
		errc <- err
	}()
	if _, err := w.Write(data); err != nil {
		return err
	}
	select {
	case err := <-errc:
		if err != nil {
			return err
		}
	case <-ctx.Done():
		return errors.New("no echo within a minute")
	}
	if !bytes.Equal(got, data) {
		return errors.New("the echo differs")
	}
	return nil
}

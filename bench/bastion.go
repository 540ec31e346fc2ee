package main

import (
	"log/slog"
	"net"
	"os"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/bastion/bastiontest"
	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/policy"
)

// heapFloor is the heap reserve cmd/bastion makes at start (see its
// reserveHeap): address space, never touched, so that bulk transfers do
// not start a collection every hundred packets.
var heapFloor []byte

// benchAccount is the bastion account the client's key belongs to.
const benchAccount = "bench"

// inProcess is the bastion under test, served from this process.
type inProcess struct {
	srv     *bastion.Server
	addr    string
	host    *keys.Host
	fleet   *bastiontest.Fleet
	served  chan error
	logFile *os.File
}

// startBastion wires a bastion.Server the way the package's own test
// fixture does: host keys in stateDir, one account holding clientKey, a
// policy letting it reach VMs "target*" and "stub" as login, a static
// resolver (no trust check: that needs a real guest), ciphers as
// server.ciphers (nil: the default) and linger as server.upstream_linger.
func startBastion(stateDir, logPath string, clientKey gossh.PublicKey, login string, ciphers []string, linger time.Duration) (*inProcess, error) {
	host, err := keys.LoadOrCreate(stateDir)
	if err != nil {
		return nil, err
	}
	accounts, err := bastion.NewAccountSet([]bastion.Account{
		{Name: benchAccount, Groups: []string{"bench"}, Keys: []gossh.PublicKey{clientKey}},
	})
	if err != nil {
		return nil, err
	}
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	// Logs and audit events go to a file, as in production; both are per
	// connection or per channel, never per byte. Each record is one Write
	// (slog's handler and the audit sink each hold a lock around theirs),
	// and an *os.File does one Write at a time: lines do not interleave.
	b := &inProcess{host: host, fleet: bastiontest.NewFleet(), served: make(chan error, 1), logFile: logFile}
	if heapFloor == nil {
		heapFloor = make([]byte, 64<<20) // as cmd/bastion's reserveHeap does, once a process
	}
	b.srv = &bastion.Server{
		HostKey:   host.Key,
		Certifier: host,
		Hostnames: []string{"127.0.0.1", "localhost"},
		Accounts:  accounts,
		VMs:       b.fleet,
		Resolver:  b.fleet,
		Policy: &policy.Policy{Rules: []policy.Rule{{
			Name: "bench", Groups: []string{"bench"}, VMs: []string{"target*", "stub"}, Logins: []string{login},
			Channels: []policy.Channel{policy.Shell, policy.Exec, policy.SFTP},
		}}},
		Ciphers:        ciphers,
		UpstreamLinger: linger,
		Logger:         slog.New(slog.NewTextHandler(logFile, &slog.HandlerOptions{Level: slog.LevelInfo})),
		Audit:          audit.JSON(logFile),
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	b.addr = ln.Addr().String()
	go func() { b.served <- b.srv.Serve(ln) }()
	return b, nil
}

func (b *inProcess) stop() {
	b.srv.Close()
	<-b.served
	b.logFile.Close()
}

package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/internal/testenv"
)

// idleSpec tells a client process (the harness re-executed with
// `-mode client -spec FILE`) what sessions to open and hold.
type idleSpec struct {
	Via         string // "bastion": ProxyJump through the bastion; "openssh": through the jump sshd
	JumpAddr    string // the bastion's or the jump sshd's address
	JumpUser    string
	JumpHostKey string // authorized_keys form; for the bastion, its host CA
	Target      string // what the jump is asked to connect to: "<vm>:22" or the target's address
	TargetUser  string
	TargetKey   string // authorized_keys form; for the bastion, its host CA
	KeyPath     string // the client's private key
	Command     string // run in each session, kept open: it echoes what it reads
	N           int
	Concurrency int
}

// idleSession is one held session: an outer connection to the jump, an
// inner one to the target tunnelled through it, and a session channel.
type idleSession struct {
	outer, inner *gossh.Client
	sess         *gossh.Session
	stdin        io.WriteCloser
	stdout       *bufio.Reader
}

func (s *idleSession) close() {
	if s.sess != nil {
		s.sess.Close()
	}
	if s.inner != nil {
		s.inner.Close()
	}
	if s.outer != nil {
		s.outer.Close()
	}
}

// clientMain opens spec.N sessions, spec.Concurrency at a time, printing
// "progress K" now and then and "ready K ERR" once done (K held; ERR is
// "-" or the first error, after which it stops opening). Then it reads
// commands from stdin: "check" round-trips a line through a sample of
// sessions and prints "checked OK/TRIED"; EOF closes everything.
func clientMain(specPath string) {
	data, err := os.ReadFile(specPath)
	if err != nil {
		fatalf("client: %v", err)
	}
	var spec idleSpec
	if err := json.Unmarshal(data, &spec); err != nil {
		fatalf("client: %v", err)
	}
	if _, err := raiseNofile(4*uint64(spec.N) + 1024); err != nil {
		fatalf("client: %v", err)
	}
	keyData, err := os.ReadFile(spec.KeyPath)
	if err != nil {
		fatalf("client: %v", err)
	}
	signer, err := gossh.ParsePrivateKey(keyData)
	if err != nil {
		fatalf("client: %v", err)
	}
	jumpCheck, err := hostKeyCheck(spec.JumpHostKey, spec.Via == "bastion")
	if err != nil {
		fatalf("client: %v", err)
	}
	targetCheck, err := hostKeyCheck(spec.TargetKey, spec.Via == "bastion")
	if err != nil {
		fatalf("client: %v", err)
	}
	outerConfig := &gossh.ClientConfig{
		User: spec.JumpUser, Auth: []gossh.AuthMethod{gossh.PublicKeys(signer)},
		HostKeyCallback: jumpCheck, Timeout: 30 * time.Second,
	}
	innerConfig := &gossh.ClientConfig{
		User: spec.TargetUser, Auth: []gossh.AuthMethod{gossh.PublicKeys(signer)},
		HostKeyCallback: targetCheck,
	}
	open := func() (*idleSession, error) {
		s := &idleSession{}
		nc, err := net.DialTimeout("tcp", spec.JumpAddr, 30*time.Second)
		if err != nil {
			return nil, fmt.Errorf("jump: %w", err)
		}
		// A jump that accepts but never answers (out of descriptors, say)
		// must not hang the client: everything gets a minute.
		timer := time.AfterFunc(time.Minute, func() { nc.Close() })
		defer timer.Stop()
		conn0, chans0, reqs0, err := gossh.NewClientConn(nc, spec.JumpAddr, outerConfig)
		if err != nil {
			nc.Close()
			return nil, fmt.Errorf("jump: %w", err)
		}
		s.outer = gossh.NewClient(conn0, chans0, reqs0)
		tunnel, err := s.outer.Dial("tcp", spec.Target)
		if err != nil {
			s.close()
			return nil, fmt.Errorf("direct-tcpip: %w", err)
		}
		conn, chans, reqs, err := gossh.NewClientConn(tunnel, spec.Target, innerConfig)
		if err != nil {
			tunnel.Close()
			s.close()
			return nil, fmt.Errorf("target: %w", err)
		}
		s.inner = gossh.NewClient(conn, chans, reqs)
		if s.sess, err = s.inner.NewSession(); err != nil {
			s.close()
			return nil, fmt.Errorf("session: %w", err)
		}
		if s.stdin, err = s.sess.StdinPipe(); err != nil {
			s.close()
			return nil, err
		}
		out, err := s.sess.StdoutPipe()
		if err != nil {
			s.close()
			return nil, err
		}
		s.stdout = bufio.NewReader(out)
		if err := s.sess.Start(spec.Command); err != nil {
			s.close()
			return nil, fmt.Errorf("exec: %w", err)
		}
		if !timer.Stop() {
			s.close()
			return nil, errors.New("timed out opening the session")
		}
		return s, nil
	}

	var (
		mu       sync.Mutex
		sessions []*idleSession
		firstErr error
		stop     atomic.Bool
		wg       sync.WaitGroup
		next     atomic.Int64
	)
	for w := 0; w < max(1, spec.Concurrency); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() && next.Add(1) <= int64(spec.N) {
				s, err := open()
				mu.Lock()
				if err != nil {
					if firstErr == nil {
						firstErr = err
					}
					stop.Store(true)
				} else {
					sessions = append(sessions, s)
					if len(sessions)%500 == 0 {
						fmt.Printf("progress %d\n", len(sessions))
					}
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	msg := "-"
	if firstErr != nil {
		msg = strings.ReplaceAll(firstErr.Error(), "\n", " ")
	}
	fmt.Printf("ready %d %s\n", len(sessions), msg)

	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		if in.Text() == "check" {
			ok, tried, slowest := checkSessions(sessions, 20)
			fmt.Printf("checked %d/%d,slowest=%v\n", ok, tried, slowest.Round(time.Millisecond))
		}
	}
	for _, s := range sessions {
		s.close()
	}
}

// checkSessions round-trips a line through up to n sessions chosen at
// random, all at once, proving they still reach the target end to end. It
// reports how many answered within 30 seconds and the slowest answer.
func checkSessions(sessions []*idleSession, n int) (ok, tried int, slowest time.Duration) {
	type answer struct {
		good    bool
		latency time.Duration
	}
	pick := rand.Perm(len(sessions))[:min(n, len(sessions))]
	answers := make(chan answer, len(pick))
	for _, i := range pick {
		s := sessions[i]
		go func() {
			start := time.Now()
			want := fmt.Sprintf("ping %d\n", i)
			if _, err := io.WriteString(s.stdin, want); err != nil {
				answers <- answer{}
				return
			}
			line, err := s.stdout.ReadString('\n')
			answers <- answer{err == nil && line == want, time.Since(start)}
		}()
	}
	timeout := time.After(30 * time.Second)
	for range pick {
		select {
		case a := <-answers:
			if a.good {
				ok++
			}
			slowest = max(slowest, a.latency)
		case <-timeout:
			return ok, len(pick), 30 * time.Second
		}
	}
	return ok, len(pick), slowest
}

// hostKeyCheck accepts the one key given, or with ca any certificate it
// signed.
func hostKeyCheck(authorized string, ca bool) (gossh.HostKeyCallback, error) {
	key, _, _, _, err := gossh.ParseAuthorizedKey([]byte(authorized))
	if err != nil {
		return nil, err
	}
	if !ca {
		return gossh.FixedHostKey(key), nil
	}
	checker := &gossh.CertChecker{IsHostAuthority: func(auth gossh.PublicKey, _ string) bool {
		return bytes.Equal(auth.Marshal(), key.Marshal())
	}}
	return checker.CheckHostKey, nil
}

// stubTargetMain is the harness re-executed as `-mode stub -spec FILE`: a
// minimal SSH server in Go standing in for a VM when the bastion is asked
// to hold more sessions than OpenSSH could serve on this machine (each of
// its sessions costs three processes). It accepts the public key in the
// spec file, echoes every session's input, and prints "listening ADDR
// HOSTKEY".
func stubTargetMain(specPath string) {
	if _, err := raiseNofile(200000); err != nil {
		fatalf("stub: %v", err)
	}
	data, err := os.ReadFile(specPath)
	if err != nil {
		fatalf("stub: %v", err)
	}
	authorized, _, _, _, err := gossh.ParseAuthorizedKey(data)
	if err != nil {
		fatalf("stub: %v", err)
	}
	signer, _, err := testenv.GenerateKey()
	if err != nil {
		fatalf("stub: %v", err)
	}
	config := &gossh.ServerConfig{
		PublicKeyCallback: func(_ gossh.ConnMetadata, key gossh.PublicKey) (*gossh.Permissions, error) {
			if bytes.Equal(key.Marshal(), authorized.Marshal()) {
				return nil, nil
			}
			return nil, errors.New("unknown key")
		},
	}
	config.AddHostKey(signer)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fatalf("stub: %v", err)
	}
	fmt.Printf("listening %s %s", ln.Addr(), gossh.MarshalAuthorizedKey(signer.PublicKey()))
	for {
		nc, err := ln.Accept()
		if err != nil {
			fatalf("stub: %v", err)
		}
		go func() {
			_, chans, reqs, err := gossh.NewServerConn(nc, config)
			if err != nil {
				nc.Close()
				return
			}
			go gossh.DiscardRequests(reqs)
			for newCh := range chans {
				if newCh.ChannelType() != "session" {
					newCh.Reject(gossh.UnknownChannelType, "sessions only")
					continue
				}
				ch, chReqs, err := newCh.Accept()
				if err != nil {
					continue
				}
				go func() {
					for req := range chReqs {
						req.Reply(req.Type == "exec" || req.Type == "shell", nil)
					}
				}()
				go func() {
					io.Copy(ch, ch)
					ch.Close()
				}()
			}
		}()
	}
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

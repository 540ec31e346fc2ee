package soak

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"

	"github.com/pkg/sftp"
	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/internal/testenv"
)

// target is the soak's VM: an SSH server that lets in one key and serves
// "out N" execs (N zero bytes, exit 0), echoing shells, sftp in memory and
// direct-tcpip to any address.
type target struct {
	addr    string
	hostKey gossh.PublicKey
	ln      net.Listener
	wg      sync.WaitGroup

	mu    sync.Mutex
	conns map[net.Conn]bool
}

func startTarget(authorized gossh.PublicKey) (*target, error) {
	signer, _, err := testenv.GenerateKey()
	if err != nil {
		return nil, err
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
		return nil, err
	}
	t := &target{addr: ln.Addr().String(), hostKey: signer.PublicKey(), ln: ln, conns: make(map[net.Conn]bool)}
	t.wg.Add(1)
	go func() {
		defer t.wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			t.mu.Lock()
			t.conns[nc] = true
			t.mu.Unlock()
			t.wg.Add(1)
			go func() {
				defer t.wg.Done()
				t.serve(nc, config)
				t.mu.Lock()
				delete(t.conns, nc)
				t.mu.Unlock()
			}()
		}
	}()
	return t, nil
}

func (t *target) close() {
	t.ln.Close()
	t.mu.Lock()
	for nc := range t.conns {
		nc.Close()
	}
	t.mu.Unlock()
	t.wg.Wait()
}

func (t *target) serve(nc net.Conn, config *gossh.ServerConfig) {
	defer nc.Close()
	conn, chans, reqs, err := gossh.NewServerConn(nc, config)
	if err != nil {
		return
	}
	defer conn.Close()
	go gossh.DiscardRequests(reqs)
	var wg sync.WaitGroup
	defer wg.Wait()
	for newCh := range chans {
		switch newCh.ChannelType() {
		case "session":
			ch, chReqs, err := newCh.Accept()
			if err != nil {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				serveSession(ch, chReqs)
			}()
		case "direct-tcpip":
			var dest struct {
				Host       string
				Port       uint32
				OriginHost string
				OriginPort uint32
			}
			if err := gossh.Unmarshal(newCh.ExtraData(), &dest); err != nil {
				newCh.Reject(gossh.ConnectionFailed, "bad payload")
				continue
			}
			out, err := net.Dial("tcp", net.JoinHostPort(dest.Host, strconv.Itoa(int(dest.Port))))
			if err != nil {
				newCh.Reject(gossh.ConnectionFailed, err.Error())
				continue
			}
			ch, chReqs, err := newCh.Accept()
			if err != nil {
				out.Close()
				continue
			}
			go gossh.DiscardRequests(chReqs)
			wg.Add(1)
			go func() {
				defer wg.Done()
				splice(ch, out)
			}()
		default:
			newCh.Reject(gossh.UnknownChannelType, "not served")
		}
	}
}

// serveSession serves one session channel.
func serveSession(ch gossh.Channel, reqs <-chan *gossh.Request) {
	defer ch.Close()
	for req := range reqs {
		switch req.Type {
		case "exec":
			var cmd struct{ Command string }
			gossh.Unmarshal(req.Payload, &cmd)
			n, err := strconv.Atoi(strings.TrimPrefix(cmd.Command, "out "))
			if !strings.HasPrefix(cmd.Command, "out ") || err != nil || n < 0 || n > 1<<30 {
				req.Reply(false, nil)
				continue
			}
			req.Reply(true, nil)
			go gossh.DiscardRequests(reqs)
			_, err = io.CopyN(ch, zeros{}, int64(n))
			exit(ch, err)
			return
		case "shell":
			req.Reply(true, nil)
			go gossh.DiscardRequests(reqs)
			_, err := io.Copy(ch, ch)
			exit(ch, err)
			return
		case "subsystem":
			var sub struct{ Name string }
			gossh.Unmarshal(req.Payload, &sub)
			if sub.Name != "sftp" {
				req.Reply(false, nil)
				continue
			}
			req.Reply(true, nil)
			go gossh.DiscardRequests(reqs)
			srv := sftp.NewRequestServer(ch, sftp.InMemHandler())
			err := srv.Serve()
			srv.Close()
			if errors.Is(err, io.EOF) {
				err = nil
			}
			exit(ch, err)
			return
		default:
			req.Reply(req.Type == "env" || req.Type == "pty-req", nil)
		}
	}
}

func exit(ch gossh.Channel, err error) {
	status := make([]byte, 4)
	if err != nil {
		binary.BigEndian.PutUint32(status, 1)
	}
	ch.SendRequest("exit-status", false, status)
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// splice copies both ways between a channel and a connection, then closes
// both.
func splice(ch gossh.Channel, c net.Conn) {
	done := make(chan struct{}, 2)
	go func() { io.Copy(c, ch); c.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
	go func() { io.Copy(ch, c); ch.CloseWrite(); done <- struct{}{} }()
	<-done
	<-done
	ch.Close()
	c.Close()
}

// startEcho serves TCP echoes on a loopback port until closed.
func startEcho() (addr string, stop func(), err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, fmt.Errorf("echo: %w", err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns = map[net.Conn]bool{}
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = true
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				io.Copy(c, c)
				c.Close()
				mu.Lock()
				delete(conns, c)
				mu.Unlock()
			}()
		}
	}()
	return ln.Addr().String(), func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	}, nil
}

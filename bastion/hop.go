package bastion

import (
	"context"
	"errors"
	"sync"
	"time"

	gossh "golang.org/x/crypto/ssh"
)

// What every hop needs: requests with a deadline, keepalives, the exit
// status.

// sendExitStatus tells the client of ch that its command exited with
// status.
func sendExitStatus(ch gossh.Channel, status uint32) {
	ch.SendRequest("exit-status", false, gossh.Marshal(struct{ Status uint32 }{status}))
}

// errTimeout is returned by within when a peer does not answer in time.
var errTimeout = errors.New("no answer from the peer in time")

// within runs a request that waits for the peer's answer, giving up after
// the server's request timeout. On timeout it calls abandon, which must
// make send return (by closing what it waits on). Only keepalive passes a
// nil abandon: a probe left waiting returns when its late answer arrives
// or when keepalive closes the connection after three missed probes.
func (s *Server) within(send func() (bool, []byte, error), abandon func()) (bool, []byte, error) {
	type answer struct {
		ok      bool
		payload []byte
		err     error
	}
	c := make(chan answer, 1)
	go func() {
		ok, payload, err := send()
		c <- answer{ok, payload, err}
	}()
	t := time.NewTimer(s.requestTimeout())
	defer t.Stop()
	select {
	case a := <-c:
		return a.ok, a.payload, a.err
	case <-t.C:
		if abandon != nil {
			abandon()
		}
		return false, nil, errTimeout
	}
}

// sendRequest sends a global request on conn within the request timeout.
func (s *Server) sendRequest(conn gossh.Conn, name string, wantReply bool, payload []byte) (bool, []byte, error) {
	return s.within(func() (bool, []byte, error) {
		return conn.SendRequest(name, wantReply, payload)
	}, func() { conn.Close() })
}

// keepalive probes conn every keepalive interval and closes it after three
// probes in a row go unanswered. It returns at once: the probes run from a
// timer, so an idle connection keeps no goroutine waiting for them. The
// timer stops when ended is done (the connection closed), so that it does
// not hold the connection's memory for up to an interval after its end.
func (s *Server) keepalive(ended context.Context, conn gossh.Conn) {
	interval := s.keepAliveInterval()
	if interval <= 0 {
		return
	}
	var (
		mu    sync.Mutex // protects timer
		timer *time.Timer
	)
	missed := 0 // touched only by one probe at a time
	var probe func()
	schedule := func() {
		mu.Lock()
		defer mu.Unlock()
		if ended.Err() == nil {
			timer = time.AfterFunc(interval, probe)
		}
	}
	probe = func() {
		_, _, err := s.within(func() (bool, []byte, error) {
			return conn.SendRequest("keepalive@openssh.com", true, nil)
		}, nil)
		switch {
		case err == nil:
			missed = 0
		case errors.Is(err, errTimeout):
			missed++
			if missed >= 3 {
				s.logger().Warn("peer stopped answering keepalives; closing", "remote", conn.RemoteAddr().String())
				conn.Close()
				return
			}
		default:
			return // the connection is closed
		}
		schedule()
	}
	schedule()
	context.AfterFunc(ended, func() {
		mu.Lock()
		defer mu.Unlock()
		timer.Stop()
	})
}

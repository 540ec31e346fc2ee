package bastion

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// backlogSource is a channel-like reader: each Read takes all that is
// waiting, up to len(p), and records how much it was asked for.
type backlogSource struct {
	data  []byte
	err   error // returned once data is exhausted
	asked []int
}

func (s *backlogSource) Read(p []byte) (int, error) {
	s.asked = append(s.asked, len(p))
	if len(s.data) == 0 {
		return 0, s.err
	}
	n := copy(p, s.data)
	s.data = s.data[n:]
	return n, nil
}

func TestReadAheadGulpsUnderBacklogAndReleasesItsBuffer(t *testing.T) {
	data := make([]byte, 3*bulkSize+1000)
	rand.Read(data)
	src := &backlogSource{data: data, err: io.EOF}
	ra := &readAhead{src: src}
	var got bytes.Buffer
	p := make([]byte, 4096) // what x/crypto/ssh's bufio.Reader asks for
	for {
		n, err := ra.Read(p)
		got.Write(p[:n])
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got.Bytes(), data) {
		t.Fatalf("read %d bytes, not the %d written", got.Len(), len(data))
	}
	// One small read, then gulps of bulkSize: not one read per 4 KiB.
	if len(src.asked) > 6 {
		t.Errorf("source read %d times: %v", len(src.asked), src.asked)
	}
	if src.asked[1] != bulkSize {
		t.Errorf("second read asked for %d bytes, want a gulp of %d", src.asked[1], bulkSize)
	}
	if ra.buf != nil && ra.r >= ra.w && !ra.backlog {
		t.Errorf("drained reader still holds its buffer")
	}
}

func TestReadAheadHoldsNoBufferWhenCaughtUp(t *testing.T) {
	src := &backlogSource{data: []byte("hello"), err: io.EOF}
	ra := &readAhead{src: src}
	p := make([]byte, 4096)
	n, err := ra.Read(p)
	if n != 5 || err != nil {
		t.Fatalf("Read = %d, %v", n, err)
	}
	if ra.buf != nil || ra.backlog {
		t.Errorf("a short read took a buffer (backlog %v)", ra.backlog)
	}
	if _, err := ra.Read(p); err != io.EOF {
		t.Errorf("after the data: %v, want EOF", err)
	}
}

func TestReadAheadReturnsTheErrorAfterTheBytesBeforeIt(t *testing.T) {
	boom := errors.New("connection reset")
	data := make([]byte, 10000)
	src := &backlogSource{data: data, err: boom}
	ra := &readAhead{src: src}
	p := make([]byte, 4096)
	total := 0
	for {
		n, err := ra.Read(p)
		total += n
		if err != nil {
			if !errors.Is(err, boom) {
				t.Fatalf("error %v, want %v", err, boom)
			}
			break
		}
	}
	if total != len(data) {
		t.Errorf("got %d bytes before the error, want %d", total, len(data))
	}
}

func TestPumpCopiesInGulpsAndStopsAtEOF(t *testing.T) {
	data := make([]byte, 5*bulkSize+123)
	rand.Read(data)
	src := &backlogSource{data: data, err: io.EOF}
	var dst bytes.Buffer
	if err := pump(&dst, src); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dst.Bytes(), data) {
		t.Fatalf("copied %d bytes, not the %d given", dst.Len(), len(data))
	}
	// 32 KiB first, then bulkSize while the backlog lasts.
	if len(src.asked) > 8 {
		t.Errorf("source read %d times: %v", len(src.asked), src.asked)
	}
}

type failingWriter struct{ err error }

func (w failingWriter) Write([]byte) (int, error) { return 0, w.err }

func TestPumpReturnsTheWriteError(t *testing.T) {
	boom := errors.New("broken pipe")
	err := pump(failingWriter{boom}, &backlogSource{data: []byte("x"), err: io.EOF})
	if !errors.Is(err, boom) {
		t.Errorf("pump = %v, want %v", err, boom)
	}
}

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		accepted <- c
	}()
	a, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b := <-accepted
	if b == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

func TestBulkConnDeliversEveryWriteInOrderAndFlushesOnClose(t *testing.T) {
	a, b := tcpPair(t)
	bc := newBulkConn(a)
	var want bytes.Buffer
	var got bytes.Buffer
	done := make(chan error, 1)
	go func() {
		_, err := io.Copy(&got, b)
		done <- err
	}()
	chunk := make([]byte, 40000)
	for i := 0; i < 200; i++ {
		rand.Read(chunk[:i*97%len(chunk)+1])
		p := chunk[:i*97%len(chunk)+1]
		want.Write(p)
		if n, err := bc.Write(p); n != len(p) || err != nil {
			t.Fatalf("Write = %d, %v", n, err)
		}
	}
	if err := bc.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Bytes(), want.Bytes()) {
		t.Fatalf("peer got %d bytes, want %d in the same order", got.Len(), want.Len())
	}
	if _, err := bc.Write([]byte("late")); err == nil {
		t.Error("Write after Close succeeded")
	}
}

func TestWriteBehindReportsAWriteErrorLater(t *testing.T) {
	a, b := tcpPair(t)
	bc := newBulkConn(a)
	b.Close()
	// The peer is gone: the first writes may be queued, but an error must
	// come back within a few, and from Close.
	var err error
	deadline := time.Now().Add(10 * time.Second)
	for err == nil && time.Now().Before(deadline) {
		_, err = bc.Write(make([]byte, 64<<10))
		time.Sleep(time.Millisecond)
	}
	if err == nil {
		t.Fatal("writes to a closed peer never failed")
	}
	if cerr := bc.Close(); cerr == nil {
		t.Error("Close reported no error after a failed write")
	}
}

func TestWriteBehindCloseGivesUpOnAPeerThatDoesNotRead(t *testing.T) {
	old := closeFlushTimeout
	closeFlushTimeout = 200 * time.Millisecond
	t.Cleanup(func() { closeFlushTimeout = old })
	a, _ := tcpPair(t) // the other end never reads
	bc := newBulkConn(a)
	// Fill the socket buffers and the queue.
	written := make(chan struct{})
	go func() {
		defer close(written)
		for i := 0; i < 4096; i++ {
			if _, err := bc.Write(make([]byte, 64<<10)); err != nil {
				return
			}
		}
	}()
	time.Sleep(300 * time.Millisecond)
	start := time.Now()
	closed := make(chan error, 1)
	go func() { closed <- bc.Close() }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close waited for a peer that does not read")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Close took %v", d)
	}
	select {
	case <-written:
	case <-time.After(10 * time.Second):
		t.Fatal("a writer blocked on the full queue was not released by Close")
	}
}

func TestWriteBehindConcurrentWritersKeepEachWriteWhole(t *testing.T) {
	a, b := tcpPair(t)
	bc := newBulkConn(a)
	var got bytes.Buffer
	done := make(chan struct{})
	go func() {
		io.Copy(&got, b)
		close(done)
	}()
	var wg sync.WaitGroup
	for w := byte('a'); w < 'a'+8; w++ {
		wg.Add(1)
		go func(c byte) {
			defer wg.Done()
			for i := 0; i < 100; i++ {
				bc.Write(bytes.Repeat([]byte{c}, 1000))
			}
		}(w)
	}
	wg.Wait()
	bc.Close()
	<-done
	if got.Len() != 8*100*1000 {
		t.Fatalf("got %d bytes", got.Len())
	}
	for i := 0; i < got.Len(); i += 1000 {
		run := got.Bytes()[i : i+1000]
		if !bytes.Equal(run, bytes.Repeat(run[:1], 1000)) {
			t.Fatalf("write at %d was interleaved with another", i)
		}
	}
}

// Quick acknowledgments are asked for before the reads of a conversation
// (small reads), not before the gulps of a backlog: a stream's
// acknowledgments may wait, and each would cost a system call.
func TestReadAheadAsksForQuickAcksOnlyOutsideABacklog(t *testing.T) {
	src := &backlogSource{data: make([]byte, 3*bulkSize), err: io.EOF}
	asked := 0
	ra := &readAhead{src: src, quickAck: func() { asked++ }}
	p := make([]byte, 4096)
	ra.Read(p) // fills p: a backlog from here on
	for {
		if _, err := ra.Read(p); err != nil {
			break
		}
	}
	// The first read's, and the last's, once the backlog has drained; none
	// for the gulps between or the 4 KiB reads served from them.
	if asked != 2 {
		t.Errorf("%d quick acknowledgments over %d source reads (%v), want 2", asked, len(src.asked), src.asked)
	}
}

// quickAcker finds the TCP connection, under a PROXY protocol reader too,
// and sets TCP_QUICKACK on it; a connection that is not TCP gets none.
func TestQuickAckerFindsTheTCPConnection(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			defer c.Close()
			io.Copy(io.Discard, c)
		}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, conn := range []net.Conn{c, rawOf{c}} {
		ack := quickAcker(conn)
		if ack == nil {
			t.Fatalf("no quick acknowledgment for %T", conn)
		}
		ack()
		if !quickAckSet(t, c.(*net.TCPConn)) {
			t.Errorf("TCP_QUICKACK not set through %T", conn)
		}
	}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if quickAcker(a) != nil {
		t.Error("a quick acknowledgment for a pipe")
	}
}

// rawOf stands for go-proxyproto's Conn, which gives its connection by Raw.
type rawOf struct{ net.Conn }

func (r rawOf) Raw() net.Conn { return r.Conn }

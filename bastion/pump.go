package bastion

import (
	"errors"
	"io"
	"net"
	"sync"
	"time"
)

// Moving bytes in bulk.
//
// x/crypto/ssh sends a window adjustment after every read from a channel,
// and hands each AES-GCM packet to its connection in two writes (its 4 KiB
// bufio.Writer flushes after the first 4,096 bytes). Left alone, the
// bastion's three hops cost several system calls and a few tiny packets
// for every 32 KiB carried. The types here batch both while data is
// backed up, and hold no large buffer while a session is idle, so an idle
// session costs what it did.

// bulkSize is the size of a read and of a write queue while data flows.
const bulkSize = 256 << 10

// bulkBuffers holds the large buffers, taken while data flows and given
// back as soon as it stops. Take them with bulkBuffer.
var bulkBuffers = sync.Pool{New: func() any {
	b := make([]byte, bulkSize)
	return &b
}}

// bulkBuffer returns a buffer of bulkSize bytes from the pool.
func bulkBuffer() *[]byte {
	b := bulkBuffers.Get().(*[]byte)
	*b = (*b)[:bulkSize]
	return b
}

// closeFlushTimeout bounds how long Close waits for queued bytes to reach a
// peer that has stopped reading. A variable for tests.
var closeFlushTimeout = 5 * time.Second

// writeBehind is a connection whose writes return once queued. A goroutine
// of its own, started when there is something to write and gone when there
// is not, makes the writes: while the peer keeps up, each write is one
// system call as before; while a write is in progress, everything queued
// meanwhile goes out in the next one. At most bulkSize bytes wait; a write
// that would exceed it blocks until the queue is taken, so a slow peer
// still slows the writer down. An error from the connection is returned by
// the next Write and by Close.
type writeBehind struct {
	conn io.WriteCloser
	// deadline, if set, is the connection's SetWriteDeadline: Close uses
	// it to stop a write stuck on a peer that does not read.
	deadline func(time.Time) error

	mu       sync.Mutex
	changed  sync.Cond // the queue was taken, or the flusher stopped
	queue    *[]byte   // waiting to be written; nil when empty
	flushing bool      // the flusher goroutine is running
	err      error     // the first write error, or errWriteBehindClosed
}

var errWriteBehindClosed = errors.New("write on closed connection")

func newWriteBehind(conn io.WriteCloser, deadline func(time.Time) error) *writeBehind {
	w := &writeBehind{conn: conn, deadline: deadline}
	w.changed.L = &w.mu
	return w
}

func (w *writeBehind) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for w.err == nil && w.queue != nil && len(*w.queue)+len(p) > bulkSize {
		w.changed.Wait()
	}
	if w.err != nil {
		return 0, w.err
	}
	if w.queue == nil {
		w.queue = bulkBuffer()
		*w.queue = (*w.queue)[:0]
	}
	*w.queue = append(*w.queue, p...)
	if !w.flushing {
		w.flushing = true
		go w.flush()
	}
	return len(p), nil
}

// flush writes the queue until it is empty, then stops.
func (w *writeBehind) flush() {
	w.mu.Lock()
	for w.queue != nil && w.err == nil {
		q := w.queue
		w.queue = nil
		w.changed.Broadcast()
		w.mu.Unlock()
		_, err := w.conn.Write(*q)
		recycle(q)
		w.mu.Lock()
		if err != nil && w.err == nil {
			w.err = err
		}
	}
	if w.queue != nil {
		recycle(w.queue)
		w.queue = nil
	}
	w.flushing = false
	w.changed.Broadcast()
	w.mu.Unlock()
}

// Close writes what is queued, waiting at most closeFlushTimeout for a peer
// that does not read, then closes the connection.
func (w *writeBehind) Close() error {
	w.mu.Lock()
	expired := false
	if w.flushing {
		if w.deadline != nil {
			w.deadline(time.Now().Add(closeFlushTimeout))
		}
		timer := time.AfterFunc(closeFlushTimeout, func() {
			w.mu.Lock()
			expired = true
			w.changed.Broadcast()
			w.mu.Unlock()
		})
		for w.flushing && !expired {
			w.changed.Wait()
		}
		timer.Stop()
	}
	err := w.err
	if w.err == nil {
		w.err = errWriteBehindClosed
	}
	w.changed.Broadcast()
	w.mu.Unlock()
	if cerr := w.conn.Close(); err == nil || err == errWriteBehindClosed {
		err = cerr
	}
	return err
}

// recycle gives a queue buffer back to the pool, unless a write too large
// for it made it grow.
func recycle(b *[]byte) {
	if cap(*b) == bulkSize {
		bulkBuffers.Put(b)
	}
}

// bulkConn is a net.Conn that reads ahead and writes behind.
type bulkConn struct {
	net.Conn
	in  readAhead
	out *writeBehind
}

func newBulkConn(c net.Conn) *bulkConn {
	b := &bulkConn{Conn: c, out: newWriteBehind(c, c.SetWriteDeadline)}
	b.in.src = c
	b.in.quickAck = quickAcker(c)
	return b
}

func (c *bulkConn) Read(p []byte) (int, error)  { return c.in.Read(p) }
func (c *bulkConn) Write(p []byte) (int, error) { return c.out.Write(p) }
func (c *bulkConn) Close() error                { return c.out.Close() }

// readAhead reads in large gulps while its source has a backlog, and
// straight into the caller's buffer otherwise. A read that fills the
// caller's buffer suggests a backlog: the next read takes all that is
// waiting, up to bulkSize, in one read of the source (one window
// adjustment when the source is a channel). Once the taken bytes are
// consumed and the gulp did not fill the buffer, the buffer goes back to
// the pool: an idle reader holds none, unless a burst ended exactly where
// a gulp did. One goroutine reads. The source's first error is kept, so a
// deadline's timeout ends the reader for good (as x/crypto/ssh treats it).
type readAhead struct {
	src     io.Reader
	buf     *[]byte // taken from bulkBuffers while there is a backlog
	r, w    int     // unread bytes are (*buf)[r:w]
	err     error   // the source's error, returned after the bytes before it
	backlog bool    // the last read of the source filled what it was given
	// quickAck, if set, is called before each read outside a backlog.
	quickAck func()
}

func (ra *readAhead) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if ra.r < ra.w {
		n := copy(p, (*ra.buf)[ra.r:ra.w])
		ra.r += n
		return n, nil
	}
	if ra.err != nil {
		return 0, ra.err
	}
	if !ra.backlog {
		if ra.buf != nil {
			bulkBuffers.Put(ra.buf)
			ra.buf = nil
		}
		if ra.quickAck != nil {
			ra.quickAck() // a conversation, not a stream: see quickAcker
		}
		n, err := ra.src.Read(p)
		ra.backlog = n == len(p)
		return n, err
	}
	if ra.buf == nil {
		ra.buf = bulkBuffer()
	}
	n, err := ra.src.Read(*ra.buf)
	ra.backlog = n == len(*ra.buf)
	ra.err = err
	ra.r, ra.w = 0, n
	if n == 0 {
		return 0, err
	}
	ra.r = copy(p, (*ra.buf)[:n])
	if ra.r == n {
		return n, err
	}
	return ra.r, nil
}

// pump copies src to dst until src ends. It reads into 2 KiB while the
// source sends little (an idle or interactive session keeps no more), into
// 32 KiB (a packet) once a read fills that, and into up to bulkSize while
// a backlog waits, so that a channel source sends one window adjustment
// per gulp rather than one per packet. It returns nil at io.EOF.
func pump(dst io.Writer, src io.Reader) error {
	small := make([]byte, 2<<10)
	var big *[]byte
	defer func() {
		if big != nil {
			bulkBuffers.Put(big)
		}
	}()
	for {
		buf := small
		if big != nil {
			buf = *big
		}
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		switch {
		case big == nil && n == len(buf) && len(small) < packetSize:
			small = make([]byte, packetSize)
		case big == nil && n == len(buf):
			big = bulkBuffer()
		case big != nil && n < len(buf):
			bulkBuffers.Put(big)
			big = nil
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// packetSize is the largest payload x/crypto/ssh puts in a channel packet.
const packetSize = 32 << 10

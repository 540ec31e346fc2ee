package bastion

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"hash"
	"strconv"
	"sync"
	"time"

	"github.com/bastionvm/bastion/bastion/audit"
)

// sftpTrail reads an sftp session as it passes through, both ways, and
// audits what it did to files: one file event per handle when it closes
// (path, direction, flags, bytes, SHA-256 when every byte from offset 0
// was seen, duration, status), one per rename, remove, mkdir, rmdir,
// setstat, symlink and link, and a summary when the session ends. Nothing
// per read or write packet.
//
// It only watches: the bytes are forwarded unchanged whatever it makes of
// them. A stream it cannot follow (a packet past maxSFTPPacket) stops the
// trail, and the summary says so.
type sftpTrail struct {
	emit func(audit.Activity) // a file event with these fields

	mu       sync.Mutex
	toVM     sftpStream
	fromVM   sftpStream
	pending  map[uint32]*sftpRequest // by request id
	handles  map[string]*sftpFile
	stashed  int // bytes held for reordering, over all handles
	files    int // handles closed
	ops      int // other operations
	failures int
	lost     string // why the trail stopped following, if it did
}

const (
	maxSFTPPacket  = 256<<10 + 1024 // OpenSSH's largest, and its header
	maxSFTPPending = 4096           // requests awaiting an answer
	maxSFTPHandles = 1024
	// maxSFTPStash bounds the out-of-order data held to hash a file in
	// order: pkg/sftp's clients keep up to 64 requests of 32 KiB in flight.
	maxSFTPStash = 4 << 20
)

// SFTP packet types (draft-ietf-secsh-filexfer-02, as OpenSSH speaks it).
const (
	fxpOpen     = 3
	fxpClose    = 4
	fxpRead     = 5
	fxpWrite    = 6
	fxpSetstat  = 9
	fxpFsetstat = 10
	fxpRemove   = 13
	fxpMkdir    = 14
	fxpRmdir    = 15
	fxpRename   = 18
	fxpSymlink  = 20
	fxpStatus   = 101
	fxpHandle   = 102
	fxpData     = 103
	fxpExtended = 200

	fxOK               = 0
	fxEOF              = 1
	fxPermissionDenied = 3

	pflagRead   = 0x01
	pflagWrite  = 0x02
	pflagAppend = 0x04
	pflagCreat  = 0x08
	pflagTrunc  = 0x10
	pflagExcl   = 0x20
)

// sftpRequest is a request awaiting its answer.
type sftpRequest struct {
	op           string // "open", "read", "write", "close", or a file operation
	path, target string
	flags        uint32
	handle       string
	offset       uint64
	n            int
	file         *sftpFile
}

// sftpFile is an open handle.
type sftpFile struct {
	path    string
	flags   uint32
	began   time.Time
	up      int64 // bytes written
	down    int64 // bytes read
	failed  bool  // a read or write the VM refused
	eof     bool  // a read reached the end of the file
	whole   bool  // every byte from offset 0 hashed, in order, so far
	why     string
	sum     hash.Hash
	next    uint64            // the offset the hash has reached
	stash   map[uint64][]byte // data past next, by offset
	writes  bool              // the hash is of writes (else of reads)
	hashing bool              // the first data has decided what the hash is of
}

// sftpStream reassembles the packets of one direction.
type sftpStream struct {
	buf []byte
}

func newSFTPTrail(emit func(audit.Activity)) *sftpTrail {
	return &sftpTrail{emit: emit, pending: make(map[uint32]*sftpRequest), handles: make(map[string]*sftpFile)}
}

// ToVM and FromVM feed the bytes each way; they are the recorders of the
// copiers.
func (t *sftpTrail) ToVM(p []byte)   { t.feed(&t.toVM, p, t.request) }
func (t *sftpTrail) FromVM(p []byte) { t.feed(&t.fromVM, p, t.reply) }

func (t *sftpTrail) feed(s *sftpStream, p []byte, handle func(typ byte, body []byte)) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.lost != "" {
		return
	}
	// Whole packets are read where they lie; only a packet cut by the end
	// of p is kept for the next call.
	data := p
	if len(s.buf) > 0 {
		s.buf = append(s.buf, p...)
		data = s.buf
	}
	for len(data) >= 4 {
		n := binary.BigEndian.Uint32(data)
		if n == 0 || n > maxSFTPPacket {
			t.stop("a packet of " + strconv.Itoa(int(n)) + " bytes")
			return
		}
		if len(data) < 4+int(n) {
			break
		}
		handle(data[4], data[5:4+n])
		if t.lost != "" {
			return
		}
		data = data[4+n:]
	}
	if len(data) == 0 {
		s.buf = s.buf[:0]
		return
	}
	s.buf = append(s.buf[:0], data...) // overlapping, when data is in s.buf: append moves it
}

// stop gives up following the stream.
func (t *sftpTrail) stop(why string) {
	t.lost = why
	t.toVM.buf, t.fromVM.buf = nil, nil
	t.pending, t.handles = nil, nil
}

// request reads a packet from the client.
func (t *sftpTrail) request(typ byte, b []byte) {
	d := sftpDecoder{b: b}
	id := d.uint32()
	var r *sftpRequest
	switch typ {
	case fxpOpen:
		r = &sftpRequest{op: "open", path: d.string()}
		r.flags = d.uint32()
	case fxpClose:
		r = &sftpRequest{op: "close", handle: d.string()}
	case fxpRead, fxpWrite:
		r = &sftpRequest{op: "read", handle: d.string()}
		r.offset = d.uint64()
		f := t.handles[r.handle]
		if f == nil {
			return
		}
		r.file = f
		if typ == fxpRead {
			r.n = int(d.uint32())
			break
		}
		r.op = "write"
		data := d.bytes()
		r.n = len(data)
		f.up += int64(len(data))
		t.hash(f, true, r.offset, data)
	case fxpSetstat:
		r = &sftpRequest{op: "setstat", path: d.string()}
	case fxpFsetstat:
		r = &sftpRequest{op: "setstat", handle: d.string()}
		if f := t.handles[r.handle]; f != nil {
			r.path = f.path
		}
	case fxpRemove:
		r = &sftpRequest{op: "remove", path: d.string()}
	case fxpMkdir:
		r = &sftpRequest{op: "mkdir", path: d.string()}
	case fxpRmdir:
		r = &sftpRequest{op: "rmdir", path: d.string()}
	case fxpRename:
		r = &sftpRequest{op: "rename", path: d.string(), target: d.string()}
	case fxpSymlink:
		// OpenSSH sends the target first, then the link's path.
		r = &sftpRequest{op: "symlink", target: d.string(), path: d.string()}
	case fxpExtended:
		switch d.string() {
		case "posix-rename@openssh.com":
			r = &sftpRequest{op: "rename", path: d.string(), target: d.string()}
		case "hardlink@openssh.com":
			r = &sftpRequest{op: "link", target: d.string(), path: d.string()}
		}
	}
	if r == nil || d.bad {
		return
	}
	if len(t.pending) >= maxSFTPPending {
		t.stop("more than " + strconv.Itoa(maxSFTPPending) + " requests unanswered")
		return
	}
	t.pending[id] = r
}

// reply reads a packet from the VM and settles the request it answers.
func (t *sftpTrail) reply(typ byte, b []byte) {
	d := sftpDecoder{b: b}
	id := d.uint32()
	r := t.pending[id]
	if r == nil || d.bad {
		return
	}
	delete(t.pending, id)
	status := uint32(fxOK)
	if typ == fxpStatus {
		status = d.uint32()
	}
	switch r.op {
	case "open":
		if typ == fxpHandle {
			if len(t.handles) >= maxSFTPHandles {
				t.stop("more than " + strconv.Itoa(maxSFTPHandles) + " files open")
				return
			}
			t.handles[d.string()] = &sftpFile{path: r.path, flags: r.flags, began: time.Now(), whole: true, sum: sha256.New()}
			return
		}
		t.failures++
		t.emit(audit.Activity{Op: "file", Path: cut(r.path, maxPathAudited), Flags: openFlags(r.flags), Status: statusOf(status)})
	case "read":
		switch {
		case typ == fxpData:
			data := d.bytes()
			r.file.down += int64(len(data))
			t.hash(r.file, false, r.offset, data)
		case status == fxEOF:
			r.file.eof = true
		default:
			r.file.failed = true
		}
	case "write":
		if status != fxOK {
			r.file.failed = true
		}
	case "close":
		f := t.handles[r.handle]
		if f == nil {
			return
		}
		delete(t.handles, r.handle)
		t.files++
		t.stashed -= stashSize(f)
		act := audit.Activity{Op: "file", Path: cut(f.path, maxPathAudited), Flags: openFlags(f.flags), BytesUp: f.up, BytesDown: f.down,
			Seconds: seconds(time.Since(f.began))}
		switch {
		case f.up > 0 && f.down > 0:
			act.Direction = "both"
		case f.up > 0:
			act.Direction = "upload"
		case f.down > 0:
			act.Direction = "download"
		}
		if len(f.stash) > 0 {
			f.whole, f.why = false, "not every byte from offset 0 was seen in order"
		}
		whole := f.whole && f.hashing
		switch {
		case f.failed || status != fxOK:
			act.Status = "error"
			t.failures++
		case f.down > 0 && f.up == 0 && !f.eof:
			act.Status = "partial" // the client stopped before the end of the file
		default:
			act.Status = "ok"
		}
		switch {
		case whole && (f.writes || f.eof):
			act.SHA256 = hex.EncodeToString(f.sum.Sum(nil))
		case whole:
			act.Unhashed = "read only in part"
		case f.hashing:
			act.Unhashed = f.why
		}
		t.emit(act)
	default: // a file operation
		t.ops++
		if status != fxOK {
			t.failures++
		}
		t.emit(audit.Activity{Op: r.op, Path: cut(r.path, maxPathAudited), Target: cut(r.target, maxPathAudited), Status: statusOf(status)})
	}
}

// hash adds data at offset to f's hash, in order: data that arrives
// ahead of the hash is held (within maxSFTPStash) until what comes before
// it has. The first data decides whether the hash is of writes or reads;
// a file both written and read is not hashed.
func (t *sftpTrail) hash(f *sftpFile, write bool, offset uint64, data []byte) {
	if !f.hashing {
		f.hashing, f.writes = true, write
	}
	if !f.whole || len(data) == 0 {
		return
	}
	if write != f.writes {
		f.whole, f.why = false, "written and read"
		return
	}
	switch {
	case offset == f.next:
		f.sum.Write(data)
		f.next += uint64(len(data))
		for next := f.stash[f.next]; next != nil; next = f.stash[f.next] {
			delete(f.stash, f.next)
			t.stashed -= len(next)
			f.sum.Write(next)
			f.next += uint64(len(next))
		}
	case offset > f.next && t.stashed+len(data) <= maxSFTPStash && f.stash[offset] == nil:
		if f.stash == nil {
			f.stash = make(map[uint64][]byte)
		}
		f.stash[offset] = append([]byte(nil), data...)
		t.stashed += len(data)
	default:
		f.whole, f.why = false, "not every byte from offset 0 was seen in order"
		t.stashed -= stashSize(f)
		f.stash = nil
	}
}

func stashSize(f *sftpFile) int {
	n := 0
	for _, b := range f.stash {
		n += len(b)
	}
	return n
}

// summary is the session's totals, for its end.
func (t *sftpTrail) summary() audit.Activity {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, f := range t.handles { // still open when the session ended
		t.files++
		t.emit(audit.Activity{Op: "file", Path: cut(f.path, maxPathAudited), Flags: openFlags(f.flags), BytesUp: f.up, BytesDown: f.down,
			Seconds: seconds(time.Since(f.began)), Status: "partial", Unhashed: "not closed before the session ended"})
	}
	return audit.Activity{Op: "summary", Files: t.files, FileOps: t.ops, Failures: t.failures, Unhashed: t.lost}
}

// maxPathAudited bounds a path in an event.
const maxPathAudited = 4 << 10

func openFlags(f uint32) []string {
	var out []string
	for _, fl := range []struct {
		bit  uint32
		name string
	}{{pflagRead, "read"}, {pflagWrite, "write"}, {pflagAppend, "append"}, {pflagCreat, "create"}, {pflagTrunc, "truncate"}, {pflagExcl, "exclusive"}} {
		if f&fl.bit != 0 {
			out = append(out, fl.name)
		}
	}
	return out
}

func statusOf(code uint32) string {
	switch code {
	case fxOK:
		return "ok"
	case fxPermissionDenied:
		return "denied"
	}
	return "error"
}

// sftpDecoder reads the fields of a packet; past its end, it reads zeros
// and says bad.
type sftpDecoder struct {
	b   []byte
	bad bool
}

func (d *sftpDecoder) uint32() uint32 {
	if len(d.b) < 4 {
		d.bad, d.b = true, nil
		return 0
	}
	v := binary.BigEndian.Uint32(d.b)
	d.b = d.b[4:]
	return v
}

func (d *sftpDecoder) uint64() uint64 {
	if len(d.b) < 8 {
		d.bad, d.b = true, nil
		return 0
	}
	v := binary.BigEndian.Uint64(d.b)
	d.b = d.b[8:]
	return v
}

func (d *sftpDecoder) bytes() []byte {
	n := d.uint32()
	if d.bad || uint64(n) > uint64(len(d.b)) {
		d.bad, d.b = true, nil
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

func (d *sftpDecoder) string() string { return string(d.bytes()) }

// sftpFollower runs a trail on a goroutine of its own, so that hashing
// what moves costs the copiers a copy, not the hash: on a machine with a
// core to spare, sftp keeps its speed. Both directions go through one
// queue, in the order the copiers saw them; bytes are queued before they
// are forwarded, so a request is always read before its answer, and an
// answer before any request that uses it (a new handle's first write). A full queue makes the copiers wait: the trail never skips.
type sftpFollower struct {
	trail  *sftpTrail
	chunks chan sftpChunk
	done   chan struct{}

	mu     sync.Mutex // held while queueing, so that close waits for it
	closed bool
}

type sftpChunk struct {
	toVM bool
	b    *[]byte
}

// sftpQueue is how many chunks (of up to bulkSize) wait for the trail.
const sftpQueue = 8

func newSFTPFollower(emit func(audit.Activity)) *sftpFollower {
	f := &sftpFollower{trail: newSFTPTrail(emit), chunks: make(chan sftpChunk, sftpQueue), done: make(chan struct{})}
	go func() {
		defer close(f.done)
		for c := range f.chunks {
			if c.toVM {
				f.trail.ToVM(*c.b)
			} else {
				f.trail.FromVM(*c.b)
			}
			recycle(c.b)
		}
	}()
	return f
}

func (f *sftpFollower) ToVM(p []byte)   { f.queue(true, p) }
func (f *sftpFollower) FromVM(p []byte) { f.queue(false, p) }

func (f *sftpFollower) queue(toVM bool, p []byte) {
	for len(p) > 0 {
		b := bulkBuffer()
		n := copy(*b, p)
		*b, p = (*b)[:n], p[n:]
		f.mu.Lock()
		if f.closed {
			f.mu.Unlock()
			recycle(b)
			return
		}
		f.chunks <- sftpChunk{toVM, b}
		f.mu.Unlock()
	}
}

// summary waits for the trail to read what was queued and returns its
// totals; what arrives later is not read.
func (f *sftpFollower) summary() audit.Activity {
	f.mu.Lock()
	if !f.closed {
		f.closed = true
		close(f.chunks)
	}
	f.mu.Unlock()
	<-f.done
	return f.trail.summary()
}

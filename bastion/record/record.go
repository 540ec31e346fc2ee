// Package record writes session recordings: one asciicast v2 file per
// session channel, as asciinema reads them. A header line, then one event
// per line, [seconds, code, data]: "o" for output, "i" for input, "r" for
// a new terminal size ("COLSxROWS") and "m" for a marker, which the
// bastion uses for its own events and, last, for how the program ended.
//
// A Cast is written as the session runs (each event is one write, so a
// crash loses at most the event in flight), hashed as it is written, and
// sealed when it closes: read-only, its SHA-256 known.
package record

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"
)

// Mode is what a rule records of a session.
type Mode string

const (
	None   Mode = "none"
	Output Mode = "output"
	Input  Mode = "input" // input and output: what is typed, passwords included
)

// Ext is the recordings' file name extension.
const Ext = ".cast"

// Header is what the cast's first line says of the session.
type Header struct {
	Cols, Rows uint32
	Term       string
	Command    string // the exec command line; empty for a shell
	Title      string
	Time       time.Time
}

// Cast is one recording being written. Its methods are safe for
// concurrent use; after Close they do nothing.
type Cast struct {
	ID   string // the file name without Ext
	Path string

	mu       sync.Mutex
	f        *os.File
	sum      hash.Hash
	began    time.Time
	max      int64 // of output and input data; 0 means no cap
	recorded int64
	written  int64 // bytes in the file, header and events
	capped   bool
	pending  [2][]byte // output, input: the start of a character the next write completes
	err      error     // the first write that failed
	onFail   func(error)
}

// ErrBadID is returned for a recording id that is not a plain file name.
var ErrBadID = errors.New("not a recording id")

// ValidID reports whether id is fit for a file name in the recordings
// directory: letters, digits, '-' and '_', at most 128 of them.
func ValidID(id string) bool {
	if id == "" || len(id) > 128 {
		return false
	}
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// Create starts the recording id in dir, with at most max bytes of output
// and input (0: no cap). The file is new (never one that exists, nor
// through a symbolic link) and 0600. onFail, if set, is called once, from
// the write that failed, when the recording can no longer be written.
func Create(dir, id string, h Header, max int64, onFail func(error)) (*Cast, error) {
	if !ValidID(id) {
		return nil, fmt.Errorf("%w: %q", ErrBadID, id)
	}
	path := filepath.Join(dir, id+Ext)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, err
	}
	if h.Time.IsZero() {
		h.Time = time.Now()
	}
	c := &Cast{ID: id, Path: path, f: f, sum: sha256.New(), began: h.Time, max: max, onFail: onFail}
	type env struct {
		Term string `json:"TERM,omitempty"`
	}
	head, _ := json.Marshal(struct {
		Version   int    `json:"version"`
		Width     uint32 `json:"width"`
		Height    uint32 `json:"height"`
		Timestamp int64  `json:"timestamp"`
		Command   string `json:"command,omitempty"`
		Title     string `json:"title,omitempty"`
		Env       env    `json:"env"`
	}{2, max1(h.Cols, 80), max1(h.Rows, 24), h.Time.Unix(), h.Command, h.Title, env{h.Term}})
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.writeLocked(append(head, '\n')); err != nil {
		f.Close()
		os.Remove(path)
		return nil, err
	}
	return c, nil
}

// max1 is v, or def if v is 0: a terminal of no size is the usual one.
func max1(v, def uint32) uint32 {
	if v == 0 {
		return def
	}
	return v
}

// Output records what the program wrote to the terminal.
func (c *Cast) Output(p []byte) { c.data(0, "o", p) }

// Input records what the person typed.
func (c *Cast) Input(p []byte) { c.data(1, "i", p) }

// Resize records a new terminal size.
func (c *Cast) Resize(cols, rows uint32) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.eventLocked("r", fmt.Sprintf("%dx%d", cols, rows))
}

// Marker records one of the bastion's own events.
func (c *Cast) Marker(text string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.eventLocked("m", text)
}

// Size is how many bytes the file holds so far.
func (c *Cast) Size() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.written
}

// Capped reports whether the cap ended the recording of data.
func (c *Cast) Capped() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.capped
}

// data records p, of stream which (0 output, 1 input), as UTF-8 text: a
// character split between two writes is recorded whole with the second,
// invalid bytes as U+FFFD. Past the cap, a marker says so and nothing
// more is recorded.
func (c *Cast) data(which int, code string, p []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.f == nil || c.capped || c.err != nil || len(p) == 0 {
		return
	}
	if c.max > 0 && c.recorded+int64(len(p)) > c.max {
		p = p[:c.max-c.recorded]
		c.capped = true
	}
	c.recorded += int64(len(p))
	b := append(c.pending[which], p...)
	c.pending[which] = nil
	if cut := incomplete(b); cut > 0 && !c.capped {
		c.pending[which] = append([]byte(nil), b[len(b)-cut:]...)
		b = b[:len(b)-cut]
	}
	if len(b) > 0 {
		c.eventLocked(code, string(b))
	}
	if c.capped {
		c.eventLocked("m", fmt.Sprintf("recording stopped: the cap of %d bytes is reached; the session goes on", c.max))
	}
}

// incomplete is how many bytes at the end of b start a character that
// is not whole yet (0 to 3).
func incomplete(b []byte) int {
	for n := 1; n <= utf8.UTFMax-1 && n <= len(b); n++ {
		r := b[len(b)-n]
		if !utf8.RuneStart(r) {
			continue
		}
		if !utf8.FullRune(b[len(b)-n:]) {
			return n
		}
		return 0
	}
	return 0
}

// eventLocked writes one event; c.mu is held.
func (c *Cast) eventLocked(code, data string) {
	if c.f == nil || c.err != nil {
		return
	}
	t := strconv.FormatFloat(time.Since(c.began).Seconds(), 'f', 6, 64)
	text, _ := json.Marshal(data) // invalid UTF-8 becomes U+FFFD
	line := make([]byte, 0, len(t)+len(code)+len(text)+10)
	line = append(line, '[')
	line = append(line, t...)
	line = append(line, `, "`...)
	line = append(line, code...)
	line = append(line, `", `...)
	line = append(line, text...)
	line = append(line, "]\n"...)
	if err := c.writeLocked(line); err != nil && c.onFail != nil {
		go c.onFail(err)
	}
}

// writeLocked writes b whole, hashing it, and keeps the first failure.
func (c *Cast) writeLocked(b []byte) error {
	n, err := c.f.Write(b)
	c.sum.Write(b[:n])
	c.written += int64(n)
	if err != nil {
		c.err = err
	}
	return err
}

// Close records how the program ended (exitStatus, or else exitSignal,
// or neither if it is not known), writes what is pending, and seals the
// file: synced, closed, read-only. It returns the file's SHA-256 in hex,
// and the first error in writing it, if any.
func (c *Cast) Close(exitStatus *int, exitSignal string) (sum string, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.f == nil {
		return hex.EncodeToString(c.sum.Sum(nil)), c.err
	}
	for which, code := range []string{"o", "i"} {
		if len(c.pending[which]) > 0 {
			c.eventLocked(code, string(c.pending[which]))
			c.pending[which] = nil
		}
	}
	switch {
	case exitStatus != nil:
		c.eventLocked("m", fmt.Sprintf("exit status %d", *exitStatus))
	case exitSignal != "":
		c.eventLocked("m", "exit signal "+exitSignal)
	default:
		c.eventLocked("m", "ended without an exit status")
	}
	if err := c.f.Sync(); err != nil && c.err == nil {
		c.err = err
	}
	if err := c.f.Chmod(0o400); err != nil && c.err == nil {
		c.err = err
	}
	if err := c.f.Close(); err != nil && c.err == nil {
		c.err = err
	}
	c.f = nil
	return hex.EncodeToString(c.sum.Sum(nil)), c.err
}

// Play writes the output of the cast read from r to w at its own pace,
// speed times faster, with no pause longer than maxIdle (0: as recorded).
// Input, resizes and markers are not shown.
func Play(w io.Writer, r io.Reader, speed float64, maxIdle time.Duration) error {
	if speed <= 0 {
		speed = 1
	}
	s := bufio.NewScanner(r)
	s.Buffer(nil, 16<<20)
	if !s.Scan() {
		return errors.New("not a recording: no header line")
	}
	var head struct {
		Version int `json:"version"`
	}
	if err := json.Unmarshal(s.Bytes(), &head); err != nil || head.Version != 2 {
		return errors.New("not a recording: the first line is not an asciicast v2 header")
	}
	var last float64
	for line := 2; s.Scan(); line++ {
		var ev [3]json.RawMessage
		var at float64
		var code, data string
		if json.Unmarshal(s.Bytes(), &ev) != nil || json.Unmarshal(ev[0], &at) != nil ||
			json.Unmarshal(ev[1], &code) != nil || json.Unmarshal(ev[2], &data) != nil {
			return fmt.Errorf("line %d is not an event", line)
		}
		if code != "o" {
			continue
		}
		pause := time.Duration((at - last) / speed * float64(time.Second))
		if maxIdle > 0 && pause > maxIdle {
			pause = maxIdle
		}
		if pause > 0 {
			time.Sleep(pause)
		}
		last = at
		if _, err := io.WriteString(w, data); err != nil {
			return err
		}
	}
	return s.Err()
}

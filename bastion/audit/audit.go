// Package audit is the bastion's trail: the events every part of it emits
// (the front door, trust, dispense, reloads) and the JSON-lines form they
// are written in. docs/audit.md documents the format.
package audit

import (
	"encoding/json"
	"io"
	"sync"
	"time"
)

// Type names what an event records.
type Type string

// Event types.
const (
	Login          Type = "login"            // a person authenticated to the front door
	LoginFailed    Type = "login_failed"     // an unknown key or a rate-limited source
	Denied         Type = "denied"           // the policy or the front door refused a request
	Connected      Type = "connected"        // an upstream connection to a VM was established
	UpstreamFailed Type = "upstream_failed"  // verification or the upstream connection failed
	Disconnected   Type = "disconnected"     // a link to a VM ended
	TrustVerified  Type = "trust_verified"   // a dual-band check succeeded
	TrustFailed    Type = "trust_failed"     // a dual-band check failed
	TrustDropped   Type = "trust_dropped"    // a lifecycle event, or the VM refusing it, ended a trust
	HostKeyChanged Type = "host_key_changed" // a VM presented a new host key, and a full check proved it
	Reloaded       Type = "reloaded"         // accounts and policy were reloaded
	ReloadFailed   Type = "reload_failed"    // a reload was refused; the running configuration stays
	Ended          Type = "ended"            // the bastion ended a session: policy change, time limit
	Dispensed      Type = "dispensed"        // a VM was made from a template
	DispenseFailed Type = "dispense_failed"  // making a VM failed; what was made is removed
	Destroyed      Type = "destroyed"        // a VM was removed
	SessionStart   Type = "session_start"    // a shell, command or subsystem started on a VM
	SessionEnd     Type = "session_end"      // it ended
	ForwardStart   Type = "forward_start"    // a forwarded TCP, unix-socket, agent or X11 channel opened
	ForwardEnd     Type = "forward_end"      // it closed
	File           Type = "file"             // an sftp session closed a file or changed one (op), or ended (op summary)
)

// Causes are the values of an upstream_failed event's cause.
var Causes = []string{"no_such_vm", "not_verified", "host_key", "auth", "timeout", "unreachable"}

// Version is the format version every event carries in "v". Version 1
// had no "v" field and no per-channel events.
const Version = 2

// Event is one entry of the trail. Its JSON form, one object per line, is
// the documented format: every field but v, seq, time and type is omitted
// when empty.
type Event struct {
	V       int       `json:"v"`   // set by the JSON sink: Version
	Seq     uint64    `json:"seq"` // set by the JSON sink: 1, 2, … in the order written
	Time    time.Time `json:"time"`
	Type    Type      `json:"type"`
	Session string    `json:"session,omitempty"` // the front-door connection, across its links and channels
	Account string    `json:"account,omitempty"`
	Source  string    `json:"source,omitempty"`
	// Balancer is the load balancer a connection came through (PROXY
	// protocol); Source is then the client behind it.
	Balancer string `json:"balancer,omitempty"`
	Replica  string `json:"replica,omitempty"` // the bastion that emitted it: server.replica
	// KeyID and CertSerial are the certificate a login was made with.
	KeyID      string  `json:"key_id,omitempty"`
	CertSerial *uint64 `json:"cert_serial,omitempty"`
	VM         string  `json:"vm,omitempty"`
	Login      string  `json:"login,omitempty"`
	Channel    string  `json:"channel,omitempty"`
	Detail     string  `json:"detail,omitempty"` // the command, forward target or subsystem
	Rule       string  `json:"rule,omitempty"`
	Reason     string  `json:"reason,omitempty"`
	Cause      string  `json:"cause,omitempty"` // upstream_failed: the kind of failure, one of Causes
	// Reused says a link joined an upstream connection another link
	// opened, with no dial of its own (connected).
	Reused bool `json:"reused,omitempty"`
	*Activity
}

// Activity is what a channel, or a whole link, did: the fields of the
// session_*, forward_* and disconnected events.
type Activity struct {
	ChannelID  uint32   `json:"channel_id,omitempty"` // 1, 2, … within the session
	Kind       string   `json:"kind,omitempty"`       // shell, exec, subsystem; or the forward's channel type
	Command    string   `json:"command,omitempty"`    // the exec command line or the subsystem name
	Term       string   `json:"term,omitempty"`       // the pty's TERM, when a pty was asked for
	Cols       uint32   `json:"cols,omitempty"`
	Rows       uint32   `json:"rows,omitempty"`
	Env        []string `json:"env,omitempty"` // names of environment variables passed to the VM
	Host       string   `json:"host,omitempty"`
	Port       uint32   `json:"port,omitempty"`
	Socket     string   `json:"socket,omitempty"` // a forward's unix socket path on the VM (streamlocal)
	ExitStatus *int     `json:"exit_status,omitempty"`
	ExitSignal string   `json:"exit_signal,omitempty"`
	Seconds    float64  `json:"duration,omitempty"`   // how long it ran, in seconds
	BytesUp    int64    `json:"bytes_up,omitempty"`   // from the client to the VM
	BytesDown  int64    `json:"bytes_down,omitempty"` // from the VM to the client

	Recording       string `json:"recording,omitempty"`        // the recording's id: its file name in server.recordings, less .cast
	RecordingSHA256 string `json:"recording_sha256,omitempty"` // of the sealed file, hex
	RecordingCapped bool   `json:"recording_capped,omitempty"` // server.recording_max_bytes ended it before the session
	RecordingBytes  int64  `json:"recording_bytes,omitempty"`  // the sealed file's size

	Stages []Stage `json:"stages,omitempty"` // dispensed, dispense_failed: each stage, in order

	// File events (sftp):
	Op        string   `json:"op,omitempty"`        // file (a handle closed), rename, remove, mkdir, rmdir, setstat, symlink, link, summary
	Path      string   `json:"path,omitempty"`      // as the client named it
	Target    string   `json:"target,omitempty"`    // rename's new name, symlink's and link's target
	Direction string   `json:"direction,omitempty"` // upload, download or both; empty if nothing moved
	Flags     []string `json:"flags,omitempty"`     // the open flags: read, write, append, create, truncate, exclusive
	SHA256    string   `json:"sha256,omitempty"`    // of every byte from offset 0, when all were seen in order
	Unhashed  string   `json:"unhashed,omitempty"`  // why there is no sha256; for summary, why the trail stopped
	Status    string   `json:"status,omitempty"`    // ok, partial, denied, error
	Files     int      `json:"files,omitempty"`     // summary: handles closed
	FileOps   int      `json:"file_ops,omitempty"`  // summary: other operations
	Failures  int      `json:"failures,omitempty"`  // summary: what the VM refused
}

// Stage is one step of a dispense and how long it took.
type Stage struct {
	Name    string  `json:"stage"` // overlay, start, agent, hostname, address, trust LOGIN
	Seconds float64 `json:"duration"`
}

// With returns a copy of e with the given type and decision fields.
func (e Event) With(t Type, channel, rule, reason string) Event {
	e.Type, e.Channel, e.Rule, e.Reason = t, channel, rule, reason
	return e
}

// Sink receives events. A nil Sink drops them.
type Sink func(Event)

// Emit stamps e with the time, if it has none, and hands it to s.
func (s Sink) Emit(e Event) {
	if s == nil {
		return
	}
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	s(e)
}

// JSON writes events as JSON lines to w. It is safe for concurrent use.
func JSON(w io.Writer) Sink { return NewWriter(w).Emit }

// Writer writes events as JSON lines, numbering them, and remembers
// whether the last write failed, so that a bastion that must not run
// unaudited can refuse new sessions. It is safe for concurrent use.
type Writer struct {
	mu   sync.Mutex
	w    io.Writer
	seq  uint64
	err  error // of the last write
	torn bool  // the last line written stops short of its end
}

// NewWriter writes to w, which should not buffer: each event is written
// as it is emitted.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// Emit writes e; it is a Sink.
func (w *Writer) Emit(e Event) {
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	e.V = Version
	w.mu.Lock()
	defer w.mu.Unlock()
	// Numbered as emitted, written or not: a gap in a stream means
	// lines were lost.
	w.seq++
	e.Seq = w.seq
	line, err := json.Marshal(e)
	if err != nil {
		w.err = err
		return
	}
	line = append(line, '\n')
	if w.torn {
		// The last write stopped inside its line: this one starts on a
		// line of its own.
		line = append([]byte{'\n'}, line...)
	}
	// Not a json.Encoder: it fails every write after the first failure,
	// and a disk that was full for a moment would end the trail.
	n, err := w.w.Write(line)
	w.err = err
	if n > 0 {
		w.torn = n < len(line)
	}
}

// Err is the error of the last write, or nil if it succeeded.
func (w *Writer) Err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

package audit

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite testdata/events.jsonl")

// TestFormatGolden pins the JSON form of one event of every type, as
// docs/audit.md documents it: field names, their order, what is left out
// when empty, v and seq.
func TestFormatGolden(t *testing.T) {
	at := time.Date(2026, 12, 2, 10, 5, 11, 902114000, time.UTC)
	status := 3
	serial := uint64(42)
	session := "4307217e2c208b23"
	link := Event{Session: session, Account: "alice", Source: "203.0.113.24:53122", VM: "web1", Login: "dev"}
	with := func(e Event, t Type, a *Activity) Event { e.Type, e.Activity = t, a; return e }
	sftp := link
	sftp.Channel = "sftp"
	events := []Event{
		{Type: Login, Session: session, Account: "alice", Source: "203.0.113.24:53122", Balancer: "10.0.0.5:41872", Replica: "b1"},
		{Type: LoginFailed, Session: "9f1c2b7a00d4e561", Source: "198.51.100.9:40218", Reason: "unknown key", Detail: "SHA256:…"},
		{Type: Denied, Session: session, Account: "alice", Source: "203.0.113.24:53122", VM: "db1", Channel: "jump", Reason: "no rule allows it"},
		with(link, Connected, &Activity{Seconds: 0.041}),
		with(link, SessionStart, &Activity{ChannelID: 1, Kind: "exec", Command: "uname -a", Term: "xterm-256color", Cols: 120, Rows: 40, Env: []string{"LANG", "LC_ALL"}}),
		with(link, SessionEnd, &Activity{ChannelID: 1, Kind: "exec", Command: "uname -a", ExitStatus: &status, Seconds: 0.041, BytesUp: 0, BytesDown: 86}),
		with(link, SessionEnd, &Activity{ChannelID: 2, Kind: "shell", ExitSignal: "KILL", Seconds: 3600.5, BytesUp: 1200, BytesDown: 98000,
			Recording: session + "-2", RecordingSHA256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", RecordingCapped: true, RecordingBytes: 16777216}),
		with(link, ForwardStart, &Activity{ChannelID: 3, Kind: "direct-tcpip", Host: "127.0.0.1", Port: 5432}),
		with(link, ForwardEnd, &Activity{ChannelID: 3, Kind: "direct-tcpip", Host: "127.0.0.1", Port: 5432, Seconds: 12.3, BytesUp: 512, BytesDown: 4096}),
		with(sftp, SessionStart, &Activity{ChannelID: 4, Kind: "subsystem", Command: "sftp"}),
		with(sftp, File, &Activity{ChannelID: 4, Op: "file", Path: "/srv/app.tar", Direction: "upload", Flags: []string{"write", "create", "truncate"},
			Seconds: 0.812, BytesUp: 1048576, SHA256: "5c4c8e1b0a9d2f8e7b6a5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f", Status: "ok"}),
		with(sftp, File, &Activity{ChannelID: 4, Op: "file", Path: "/var/log/syslog", Direction: "download", Flags: []string{"read"},
			Seconds: 0.2, BytesDown: 65536, Unhashed: "read only in part", Status: "partial"}),
		with(sftp, File, &Activity{ChannelID: 4, Op: "rename", Path: "/srv/app.tar", Target: "/srv/app-1.tar", Status: "ok"}),
		with(sftp, File, &Activity{ChannelID: 4, Op: "remove", Path: "/etc/shadow", Status: "denied"}),
		with(sftp, File, &Activity{ChannelID: 4, Op: "summary", Files: 2, FileOps: 2, Failures: 1}),
		with(link, SessionStart, &Activity{ChannelID: 5, Kind: "exec", Command: "scp -t /srv/drop", Direction: "upload", Path: "/srv/drop"}),
		with(link, Disconnected, &Activity{Seconds: 3612.9, BytesUp: 1712, BytesDown: 102182}),
		{Type: UpstreamFailed, Session: session, Account: "alice", VM: "web2", Login: "dev", Reason: "the VM's sshd cannot be reached", Cause: "unreachable"},
		{Type: TrustVerified, VM: "web1", Login: "dev", Detail: "addr 192.168.214.10:22 host key SHA256:… modes [ob-ib ib-ob] expires 2026-12-02T10:15:11Z took 1.63s"},
		{Type: TrustFailed, VM: "web2", Login: "dev", Reason: "guest agent is not connected", Detail: "took 10s"},
		{Type: TrustDropped, VM: "web1", Login: "dev", Reason: "vm rebooted"},
		{Type: HostKeyChanged, VM: "web1", Detail: "SHA256:old → SHA256:new"},
		{Type: Reloaded, Reason: "SIGHUP"},
		{Type: ReloadFailed, Reason: "bastion.toml:12: unknown channel \"teleport\""},
		{Type: Ended, Session: session, Account: "alice", VM: "web1", Login: "dev", Channel: "shell", Reason: "time limit 12h0m0s"},
		{Type: Dispensed, Account: "alice", VM: "web3", Detail: "debian", Activity: &Activity{Seconds: 24.73, Stages: []Stage{{"overlay", 0.08}, {"start", 0.41}, {"agent", 17.9}, {"hostname", 0.05}, {"address", 2.1}, {"trust root", 4.19}}}},
		{Type: DispenseFailed, Account: "alice", VM: "web3", Detail: "debian", Reason: "a VM of that name exists: web3"},
		{Type: Destroyed, Account: "bob", VM: "web3"},
		with(link, ForwardStart, &Activity{ChannelID: 6, Kind: "direct-streamlocal@openssh.com", Socket: "/run/user/1000/vscode-ipc-1a7a.sock"}),
		{Type: Login, Session: "c01d5e7a2b9f4410", Account: "alice", Source: "203.0.113.24:53122", KeyID: "alice@sso", CertSerial: &serial},
		{Type: LoginFailed, Session: "c01d5e7a2b9f4411", Source: "203.0.113.24:53122", Reason: `certificate "alice@sso": cert has expired`},
	}
	var buf bytes.Buffer
	sink := JSON(&buf)
	for _, e := range events {
		e.Time = at
		sink.Emit(e)
	}
	const golden = "testdata/events.jsonl"
	if *update {
		os.WriteFile(golden, buf.Bytes(), 0o644)
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (go test -update writes it)", err)
	}
	if buf.String() != string(want) {
		t.Fatalf("the format changed; if on purpose, raise Version, document it, and run go test -update:\n%s", buf.String())
	}
	// Every line is one object with v, seq in order, time and type.
	for i, line := range strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n") {
		var got struct {
			V    int
			Seq  uint64
			Type string
		}
		if err := json.Unmarshal([]byte(line), &got); err != nil || got.V != Version || got.Seq != uint64(i+1) || got.Type == "" {
			t.Fatalf("line %d: %s: %+v %v", i+1, line, got, err)
		}
	}
}

// flaky is a file on a disk that fills: each write takes at most room
// bytes, failing with ENOSPC past them.
type flaky struct {
	bytes.Buffer
	room int
}

func (f *flaky) Write(p []byte) (int, error) {
	if len(p) <= f.room {
		f.room -= len(p)
		return f.Buffer.Write(p)
	}
	n, _ := f.Buffer.Write(p[:f.room])
	f.room = 0
	return n, syscall.ENOSPC
}

// TestWriterAfterFullDisk: a write that fails is reported by Err, and the
// trail goes on once there is room again, the next event on a line of its
// own after the torn one, its seq saying how many were lost.
func TestWriterAfterFullDisk(t *testing.T) {
	disk := &flaky{room: 1 << 20}
	w := NewWriter(disk)
	w.Emit(Event{Type: Login, Account: "alice"})
	disk.room = 10
	w.Emit(Event{Type: Login, Account: "bob"}) // torn after 10 bytes
	if !errors.Is(w.Err(), syscall.ENOSPC) {
		t.Fatalf("Err after a failed write: %v", w.Err())
	}
	w.Emit(Event{Type: Login, Account: "carol"}) // nothing written
	disk.room = 1 << 20
	w.Emit(Event{Type: Login, Account: "dave"})
	if w.Err() != nil {
		t.Fatalf("Err after a write that succeeded: %v", w.Err())
	}
	lines := strings.Split(strings.TrimSuffix(disk.String(), "\n"), "\n")
	if len(lines) != 3 || len(lines[1]) != 10 {
		t.Fatalf("the trail: %q", disk.String())
	}
	for i, want := range map[int]struct {
		account string
		seq     uint64
	}{0: {"alice", 1}, 2: {"dave", 4}} {
		var e Event
		if err := json.Unmarshal([]byte(lines[i]), &e); err != nil || e.Account != want.account || e.Seq != want.seq {
			t.Fatalf("line %d: %q (%v); want %s with seq %d", i+1, lines[i], err, want.account, want.seq)
		}
	}
}

package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/bastion/record"
)

// TestSessionsLs: the session channels of an audit file, filtered by
// account, VM and start time; a running one says so; a torn line is
// passed over; a configuration with no audit file is told why.
func TestSessionsLs(t *testing.T) {
	dir := t.TempDir()
	trail := filepath.Join(dir, "audit.jsonl")
	f, _ := os.Create(trail)
	w := audit.NewWriter(f)
	t0 := time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)
	status := 0
	ev := func(typ audit.Type, at time.Time, account, vm string, act audit.Activity) {
		w.Emit(audit.Event{Type: typ, Time: at, Session: "aaaa" + account, Account: account, VM: vm, Login: "root", Activity: &act})
	}
	ev(audit.SessionStart, t0, "alice", "web1", audit.Activity{ChannelID: 1, Kind: "shell"})
	ev(audit.SessionEnd, t0.Add(90*time.Second), "alice", "web1", audit.Activity{ChannelID: 1, Kind: "shell", ExitStatus: &status, Recording: "aaaaalice-1", RecordingSHA256: "00"})
	f.WriteString(`{"v":2,"seq":3,"ty` + "\n")
	ev(audit.SessionStart, t0.Add(time.Hour), "bob", "db1", audit.Activity{ChannelID: 2, Kind: "exec", Command: "pg_dump\tall"})
	f.Close()
	config := filepath.Join(dir, "bastion.toml")
	os.WriteFile(config, []byte("[server]\nstate_dir = \""+dir+"/state\"\naudit = \""+trail+"\"\n"), 0o600)

	ls := func(q sessionFilter) string {
		t.Helper()
		var out strings.Builder
		if err := sessionsLs(config, q, &out); err != nil {
			t.Fatal(err)
		}
		return out.String()
	}
	all := ls(sessionFilter{})
	if !strings.Contains(all, "aaaaalice-1") || !strings.Contains(all, "1m30s") || !strings.Contains(all, "yes") ||
		!strings.Contains(all, "aaaabob-2") || !strings.Contains(all, "running") || !strings.Contains(all, `pg_dump\tall`) {
		t.Fatalf("sessions ls:\n%s", all)
	}
	for _, tc := range []struct {
		q         sessionFilter
		want, not string
	}{
		{sessionFilter{account: "bob"}, "aaaabob-2", "aaaaalice-1"},
		{sessionFilter{vm: "web1"}, "aaaaalice-1", "aaaabob-2"},
		{sessionFilter{since: t0.Add(time.Minute).Format(time.RFC3339)}, "aaaabob-2", "aaaaalice-1"},
		{sessionFilter{until: t0.Add(time.Minute).Format(time.RFC3339)}, "aaaaalice-1", "aaaabob-2"},
	} {
		if out := ls(tc.q); !strings.Contains(out, tc.want) || strings.Contains(out, tc.not) {
			t.Errorf("%+v:\n%s", tc.q, out)
		}
	}
	if err := sessionsLs(config, sessionFilter{since: "yesterday"}, &strings.Builder{}); err == nil || !strings.Contains(err.Error(), `--since: "yesterday"`) {
		t.Errorf("a bad --since: %v", err)
	}
	os.WriteFile(config, []byte("[server]\nstate_dir = \""+dir+"/state\"\n"), 0o600)
	if err := sessionsLs(config, sessionFilter{}, &strings.Builder{}); err == nil || !strings.Contains(err.Error(), `server.audit is "stdout"`) {
		t.Errorf("with the audit on stdout: %v", err)
	}
}

// TestSessionsPlay: a recording is played; an id that is a path and a
// missing recording are refused by name.
func TestSessionsPlay(t *testing.T) {
	dir := t.TempDir()
	casts := filepath.Join(dir, "casts")
	os.Mkdir(casts, 0o700)
	c, err := record.Create(casts, "abc-1", record.Header{}, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	c.Output([]byte("hello from the VM\r\n"))
	c.Close(nil, "")
	config := filepath.Join(dir, "bastion.toml")
	os.WriteFile(config, []byte("[server]\nstate_dir = \""+dir+"/state\"\nrecordings = \""+casts+"\"\n"), 0o600)
	var out strings.Builder
	if err := sessionsPlay(config, "abc-1", sessionFilter{speed: 100}, &out); err != nil || out.String() != "hello from the VM\r\n" {
		t.Fatalf("play: %q %v", out.String(), err)
	}
	if err := sessionsPlay(config, "../abc-1", sessionFilter{}, &out); err == nil || !strings.Contains(err.Error(), "is not a session id") {
		t.Errorf("a path: %v", err)
	}
	if err := sessionsPlay(config, "abc-2", sessionFilter{}, &out); err == nil || !strings.Contains(err.Error(), "session abc-2 has no recording") {
		t.Errorf("missing: %v", err)
	}
}

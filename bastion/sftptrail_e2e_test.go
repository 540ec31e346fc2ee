package bastion_test

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/policy"
)

// TestSFTPFileTrail: OpenSSH's sftp through ProxyJump puts a 3 MiB file,
// gets it back, renames it, makes and removes a directory, removes the
// file, and fails to put one into a directory that does not exist. Each leaves one file
// event with the path, the direction, the bytes and the SHA-256 of what
// moved; the session ends with a summary.
func TestSFTPFileTrail(t *testing.T) {
	f := newFixture(t)
	local, remote := t.TempDir(), t.TempDir()
	data := make([]byte, 3<<20+123)
	rand.Read(data)
	os.WriteFile(filepath.Join(local, "up"), data, 0o600)
	sum := sha256.Sum256(data)
	batch := filepath.Join(local, "batch")
	os.WriteFile(batch, []byte(strings.Join([]string{
		"put " + local + "/up " + remote + "/up",
		"get " + remote + "/up " + local + "/down",
		"rename " + remote + "/up " + remote + "/moved",
		"mkdir " + remote + "/dir",
		"rmdir " + remote + "/dir",
		"rm " + remote + "/moved",
		"-put " + local + "/up " + remote + "/nodir/x",
	}, "\n")+"\n"), 0o600)
	if res := f.client.Run(nil, "sftp", "-J", "bastion", "-b", batch, f.login+"@web1"); res.Exit != 0 {
		t.Fatalf("sftp: %v", res)
	}
	f.audit.wait(t, audit.SessionEnd, "web1", 1)
	var files []*audit.Activity
	for _, e := range f.audit.of(audit.File) {
		if e.Channel != string(policy.SFTP) || e.Session == "" || e.ChannelID == 0 {
			t.Fatalf("file event without its session: %+v", e)
		}
		files = append(files, e.Activity)
	}
	find := func(op, path string) *audit.Activity {
		t.Helper()
		for _, a := range files {
			if a.Op == op && a.Path == path {
				return a
			}
		}
		t.Fatalf("no %s event for %s in %d events", op, path, len(files))
		return nil
	}
	want := hex.EncodeToString(sum[:])
	put := find("file", remote+"/up")
	if put.Direction != "upload" || put.BytesUp != int64(len(data)) || put.SHA256 != want || put.Status != "ok" || !slices.Contains(put.Flags, "write") {
		t.Fatalf("put: %+v", put)
	}
	var get *audit.Activity
	for _, a := range files {
		if a.Op == "file" && a.Path == remote+"/up" && a.Direction == "download" {
			get = a
		}
	}
	if get == nil || get.BytesDown != int64(len(data)) || get.SHA256 != want || get.Status != "ok" {
		t.Fatalf("get: %+v", get)
	}
	if r := find("rename", remote+"/up"); r.Target != remote+"/moved" || r.Status != "ok" {
		t.Fatalf("rename: %+v", r)
	}
	for _, op := range []string{"mkdir", "rmdir"} {
		if a := find(op, remote+"/dir"); a.Status != "ok" {
			t.Fatalf("%s: %+v", op, a)
		}
	}
	if a := find("remove", remote+"/moved"); a.Status != "ok" {
		t.Fatalf("remove: %+v", a)
	}
	if a := find("file", remote+"/nodir/x"); a.Status != "error" || a.BytesUp != 0 {
		t.Fatalf("a missing file: %+v", a)
	}
	last := files[len(files)-1]
	if last.Op != "summary" || last.Files != 2 || last.FileOps != 4 || last.Failures < 1 {
		t.Fatalf("summary: %+v", last)
	}
}

// TestLegacyTransfersAudited: legacy scp (-O) both ways and rsync through
// ProxyJump: each session_start says the direction and the path on the
// VM, and its session_end the bytes.
func TestLegacyTransfersAudited(t *testing.T) {
	f := newFixture(t)
	local, remote := t.TempDir(), t.TempDir()
	data := make([]byte, 200<<10)
	rand.Read(data)
	os.WriteFile(filepath.Join(local, "f"), data, 0o600)
	target := f.login + "@web1"
	for _, run := range [][]string{
		{"scp", "-O", "-J", "bastion", local + "/f", target + ":" + remote + "/scp-up"},
		{"scp", "-O", "-J", "bastion", target + ":" + remote + "/scp-up", local + "/scp-down"},
		{"rsync", "-e", "ssh -F " + f.client.Config + " -J bastion", local + "/f", target + ":" + remote + "/rsync-up"},
	} {
		if res := f.client.Run(nil, run[0], run[1:]...); res.Exit != 0 {
			t.Fatalf("%s: %v", strings.Join(run, " "), res)
		}
	}
	f.audit.wait(t, audit.SessionEnd, "web1", 3)
	starts, ends := f.audit.of(audit.SessionStart), f.audit.of(audit.SessionEnd)
	for i, want := range []struct {
		direction, path string
		up              bool
	}{{"upload", remote + "/scp-up", true}, {"download", remote + "/scp-up", false}, {"upload", remote + "/rsync-up", true}} {
		s, e := starts[i], ends[i]
		moved := e.BytesDown
		if want.up {
			moved = e.BytesUp
		}
		if s.Direction != want.direction || s.Path != want.path || moved < int64(len(data)) {
			t.Errorf("transfer %d: start %+v, end %+v", i+1, s.Activity, e.Activity)
		}
	}
}

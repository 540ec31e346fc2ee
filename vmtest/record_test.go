package vmtest

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestRecordingOnGuest: `ssh -tt -J` to a real guest with server.recordings
// set: the session's cast is sealed in the directory, session_end names it
// with its SHA-256 and the command's exit status, and Debian's asciinema
// plays the command's output back.
func TestRecordingOnGuest(t *testing.T) {
	b := newBastionProc(t, "", defaultRule)
	dir := filepath.Join(b.dir, "recordings")
	b.server(`recordings = "` + dir + `"`)
	b.launch()
	res := b.ssh(nil, "root@"+web1, "-tt", "uname -n; printf 'on the %s\\n' guest; exit 6")
	if res.Exit != 6 || !strings.Contains(string(res.Stdout), "on the guest") {
		t.Fatalf("ssh -tt: %v %q", res, res.Stdout)
	}
	var end map[string]any
	for deadline := time.Now().Add(10 * time.Second); end == nil; time.Sleep(50 * time.Millisecond) {
		if evs := b.auditEvents("session_end"); len(evs) > 0 {
			end = evs[0]
		} else if time.Now().After(deadline) {
			t.Fatal("no session_end")
		}
	}
	if end["exit_status"] != 6.0 || end["command"] != "uname -n; printf 'on the %s\\n' guest; exit 6" {
		t.Fatalf("session_end: %v", end)
	}
	id, _ := end["recording"].(string)
	path := filepath.Join(dir, id+".cast")
	data, err := os.ReadFile(path)
	if id == "" || err != nil {
		t.Fatalf("session_end names the recording %q: %v", id, err)
	}
	if sum := sha256.Sum256(data); hex.EncodeToString(sum[:]) != end["recording_sha256"] {
		t.Fatalf("recording_sha256 %v, the file's %x", end["recording_sha256"], sum)
	}
	if !strings.Contains(string(data), `"m", "exit status 6"]`) {
		t.Fatalf("the cast does not end with the exit status:\n%s", data)
	}
	out, err := exec.Command("setsid", "asciinema", "play", "-s", "100", path).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "on the guest") || !strings.Contains(string(out), web1) {
		t.Fatalf("asciinema play: %v\n%s", err, out)
	}

	// The bastion's own listing and player.
	out, err = exec.Command(binary, "sessions", "ls", "--config", b.config, "--vm", web1).CombinedOutput()
	if err != nil || !regexp.MustCompile(`(?m)^`+id+` +me +`+web1+` +root +\S+ \S+ +\S+ +exec +6 +yes +uname -n; printf`).Match(out) {
		t.Fatalf("bastion sessions ls: %v\n%s", err, out)
	}
	out, err = exec.Command(binary, "sessions", "ls", "--config", b.config, "--account", "nobody").CombinedOutput()
	if err != nil || strings.Contains(string(out), id) {
		t.Fatalf("bastion sessions ls --account nobody: %v\n%s", err, out)
	}
	out, err = exec.Command(binary, "sessions", "play", "--config", b.config, "--speed", "100", id).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "on the guest") {
		t.Fatalf("bastion sessions play: %v\n%s", err, out)
	}
	// A recording changed after it was sealed is not played.
	os.WriteFile(path, append(data, data[len(data)-40:]...), 0o400)
	out, err = exec.Command(binary, "sessions", "play", "--config", b.config, id).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "is not the one the audit trail sealed") {
		t.Fatalf("bastion sessions play of a changed recording: %v\n%s", err, out)
	}
}

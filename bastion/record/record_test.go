package record

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// events reads a cast back: its header and its events.
func events(t *testing.T, path string) (map[string]any, [][3]any) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	s.Buffer(nil, 1<<20)
	var head map[string]any
	var evs [][3]any
	for s.Scan() {
		if head == nil {
			if err := json.Unmarshal(s.Bytes(), &head); err != nil {
				t.Fatalf("header %q: %v", s.Text(), err)
			}
			continue
		}
		var ev [3]any
		if err := json.Unmarshal(s.Bytes(), &ev); err != nil {
			t.Fatalf("event %q: %v", s.Text(), err)
		}
		evs = append(evs, ev)
	}
	return head, evs
}

// TestCast: a character split across two writes is recorded whole, a
// resize and a marker are events, the exit status comes last, and the
// sealed file is read-only with the SHA-256 Close returned.
func TestCast(t *testing.T) {
	dir := t.TempDir()
	c, err := Create(dir, "s1-1", Header{Cols: 100, Rows: 30, Term: "xterm", Command: "top"}, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	euro := []byte("€") // three bytes
	c.Output(append([]byte("price: "), euro[:1]...))
	c.Output(euro[1:])
	c.Input([]byte("q"))
	c.Resize(120, 40)
	c.Marker("policy ended the session")
	status := 3
	sum, err := c.Close(&status, "")
	if err != nil {
		t.Fatal(err)
	}
	head, evs := events(t, c.Path)
	if head["version"] != 2.0 || head["width"] != 100.0 || head["height"] != 30.0 || head["command"] != "top" {
		t.Fatalf("header: %v", head)
	}
	want := [][2]string{{"o", "price: "}, {"o", "€"}, {"i", "q"}, {"r", "120x40"}, {"m", "policy ended the session"}, {"m", "exit status 3"}}
	if len(evs) != len(want) {
		t.Fatalf("events: %v", evs)
	}
	for i, w := range want {
		if evs[i][1] != w[0] || evs[i][2] != w[1] {
			t.Fatalf("event %d: %v, want %v", i, evs[i], w)
		}
	}
	data, _ := os.ReadFile(c.Path)
	if got := sha256.Sum256(data); hex.EncodeToString(got[:]) != sum {
		t.Fatalf("Close said %s; the file's sha256 is %x", sum, got)
	}
	if info, _ := os.Stat(c.Path); info.Mode().Perm() != 0o400 {
		t.Fatalf("sealed file mode %v", info.Mode())
	}
}

// TestCastCap: past the cap, a marker says the recording stopped and no
// more data is recorded; the cast still ends with the exit status.
func TestCastCap(t *testing.T) {
	c, err := Create(t.TempDir(), "s1-2", Header{}, 10, nil)
	if err != nil {
		t.Fatal(err)
	}
	c.Output([]byte("12345678"))
	c.Output([]byte("abcdef"))
	c.Output([]byte("more"))
	if !c.Capped() {
		t.Fatal("not capped")
	}
	c.Close(nil, "KILL")
	_, evs := events(t, c.Path)
	var out string
	for _, ev := range evs {
		if ev[1] == "o" {
			out += ev[2].(string)
		}
	}
	if out != "12345678ab" || len(evs) != 4 || !strings.HasPrefix(evs[2][2].(string), "recording stopped") || evs[3][2] != "exit signal KILL" {
		t.Fatalf("output %q, events %v", out, evs)
	}
}

// TestCreateRefuses: no directory, an id that is a path, and an existing
// file (or a symbolic link planted in its place) are errors.
func TestCreateRefuses(t *testing.T) {
	dir := t.TempDir()
	if _, err := Create(filepath.Join(dir, "missing"), "a", Header{}, 0, nil); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing directory: %v", err)
	}
	if _, err := Create(dir, "../a", Header{}, 0, nil); !errors.Is(err, ErrBadID) {
		t.Fatalf("id with a slash: %v", err)
	}
	os.Symlink("/etc/passwd", filepath.Join(dir, "b"+Ext))
	if _, err := Create(dir, "b", Header{}, 0, nil); !errors.Is(err, os.ErrExist) {
		t.Fatalf("planted link: %v", err)
	}
}

// TestWriteFailure: a write that fails calls onFail once and stops the
// recording.
func TestWriteFailure(t *testing.T) {
	failed := make(chan error, 2)
	c, err := Create(t.TempDir(), "s1-3", Header{}, 0, func(err error) { failed <- err })
	if err != nil {
		t.Fatal(err)
	}
	c.f.Close() // every write fails from here
	c.Output([]byte("x"))
	c.Output([]byte("y"))
	if err := <-failed; !errors.Is(err, os.ErrClosed) && !errors.Is(err, syscall.EBADF) {
		t.Fatalf("onFail: %v", err)
	}
	if len(failed) != 0 {
		t.Fatal("onFail called twice")
	}
}

// TestPlay: the output events, in order, and nothing else.
func TestPlay(t *testing.T) {
	c, err := Create(t.TempDir(), "s1-4", Header{}, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	c.Output([]byte("one "))
	c.Input([]byte("typed"))
	c.Marker("a marker")
	c.Output([]byte("two\n"))
	c.Close(nil, "")
	f, _ := os.Open(c.Path)
	defer f.Close()
	var out strings.Builder
	if err := Play(&out, f, 1000, 0); err != nil || out.String() != "one two\n" {
		t.Fatalf("Play: %q, %v", out.String(), err)
	}
	if err := Play(&out, strings.NewReader("{}\n"), 1, 0); err == nil {
		t.Fatal("Play took a file that is not a cast")
	}
}

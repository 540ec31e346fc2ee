package bastion

import (
	"bytes"
	"testing"
)

// TestLiveWatchers: a watcher that falls watchBacklog chunks behind is
// dropped, not waited for; a new one starts from the last watchTailSize
// bytes; no more than maxWatchers join; the end closes them all.
func TestLiveWatchers(t *testing.T) {
	lv := &live{id: "s-1"}
	slow, _, err := lv.join()
	if err != nil {
		t.Fatal(err)
	}
	for range watchBacklog + 1 {
		lv.publish(bytes.Repeat([]byte("x"), 100))
	}
	n := 0
	for range slow.c {
		n++
	}
	if !slow.dropped || n != watchBacklog {
		t.Fatalf("the slow watcher: dropped %v after %d chunks", slow.dropped, n)
	}
	_, tail, _ := lv.join()
	if len(tail) != watchTailSize {
		t.Fatalf("a new watcher starts from %d bytes", len(tail))
	}
	for range maxWatchers - 1 {
		if _, _, err := lv.join(); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := lv.join(); err == nil {
		t.Fatalf("watcher %d joined", maxWatchers+1)
	}
	lv.end()
	if _, _, err := lv.join(); err == nil || len(lv.watchers) != 0 {
		t.Fatal("joined a session that ended")
	}
}

package soak

import (
	"testing"
	"time"
)

// TestSoakShort is the soak in the suite: 200 sessions for 30 seconds, no
// session lost, and descriptors, goroutines and heap back to their
// baseline once the load ends. make soak runs the long one.
func TestSoakShort(t *testing.T) {
	rep, err := Run(Config{Sessions: 200, Duration: 30 * time.Second, StateDir: t.TempDir(), Log: testLog{t}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ops %v; before %+v, peak %+v, after %+v", rep.Ops, rep.Before, rep.Peak, rep.After)
	if rep.Lost > 0 {
		t.Errorf("%d of %d sessions lost: %v", rep.Lost, rep.Sessions, rep.Errors)
	}
	for _, kind := range kinds {
		if rep.Ops[kind] == 0 {
			t.Errorf("no %s operation completed", kind)
		}
	}
	if rep.Peak.FDs < rep.Before.FDs+rep.Sessions {
		t.Errorf("peak of %d descriptors against %d before: the sessions were not all held at once", rep.Peak.FDs, rep.Before.FDs)
	}
	for _, leak := range rep.Leaks() {
		t.Error(leak)
	}
}

type testLog struct{ t *testing.T }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Log(string(p))
	return len(p), nil
}

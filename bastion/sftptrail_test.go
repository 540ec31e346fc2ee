package bastion

import (
	"crypto/sha256"
	"encoding/hex"
	"testing"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion/audit"
)

// packet frames an sftp packet of type typ with the given fields.
func packet(typ byte, fields ...any) []byte {
	body := []byte{typ}
	for _, f := range fields {
		switch v := f.(type) {
		case uint32:
			body = gossh.Marshal(struct {
				B []byte `ssh:"rest"`
				V uint32
			}{body, v})
		case uint64:
			body = gossh.Marshal(struct {
				B []byte `ssh:"rest"`
				V uint64
			}{body, v})
		case string:
			body = gossh.Marshal(struct {
				B []byte `ssh:"rest"`
				V string
			}{body, v})
		}
	}
	return append(gossh.Marshal(struct{ N uint32 }{uint32(len(body))}), body...)
}

// TestSFTPTrailOutOfOrder: writes that arrive out of order, as pkg/sftp's
// workers send them, are hashed in order; a file with a gap gets no hash
// and says why; the packets may be split anywhere.
func TestSFTPTrailOutOfOrder(t *testing.T) {
	var got []audit.Activity
	tr := newSFTPTrail(func(a audit.Activity) { got = append(got, a) })
	feed := func(to bool, p []byte) { // a byte at a time
		for i := range p {
			if to {
				tr.ToVM(p[i : i+1])
			} else {
				tr.FromVM(p[i : i+1])
			}
		}
	}
	a, b, c := "first chunk,", "second chunk,", "third"
	feed(true, packet(fxpOpen, uint32(1), "/f", uint32(pflagWrite|pflagCreat)))
	feed(false, packet(fxpHandle, uint32(1), "h1"))
	feed(true, packet(fxpWrite, uint32(2), "h1", uint64(len(a)+len(b)), c))
	feed(true, packet(fxpWrite, uint32(3), "h1", uint64(len(a)), b))
	feed(true, packet(fxpWrite, uint32(4), "h1", uint64(0), a))
	for id := uint32(2); id <= 4; id++ {
		feed(false, packet(fxpStatus, id, uint32(fxOK), "", ""))
	}
	feed(true, packet(fxpClose, uint32(5), "h1"))
	feed(false, packet(fxpStatus, uint32(5), uint32(fxOK), "", ""))
	sum := sha256.Sum256([]byte(a + b + c))
	if len(got) != 1 || got[0].SHA256 != hex.EncodeToString(sum[:]) || got[0].BytesUp != int64(len(a+b+c)) || got[0].Status != "ok" {
		t.Fatalf("out of order: %+v", got)
	}

	// A gap: the middle write never comes.
	got = nil
	tr.ToVM(packet(fxpOpen, uint32(6), "/g", uint32(pflagWrite)))
	tr.FromVM(packet(fxpHandle, uint32(6), "h2"))
	tr.ToVM(packet(fxpWrite, uint32(7), "h2", uint64(0), a))
	tr.ToVM(packet(fxpWrite, uint32(8), "h2", uint64(100), c))
	tr.ToVM(packet(fxpClose, uint32(9), "h2"))
	tr.FromVM(packet(fxpStatus, uint32(9), uint32(fxOK), "", ""))
	if len(got) != 1 || got[0].SHA256 != "" || got[0].Unhashed == "" || tr.stashed != 0 {
		t.Fatalf("a gap: %+v, %d bytes stashed", got, tr.stashed)
	}

	// A packet past the largest sftp sends: the trail stops and says so.
	tr.ToVM([]byte{0x7f, 0xff, 0xff, 0xff})
	if s := tr.summary(); s.Unhashed == "" || s.Files != 2 {
		t.Fatalf("summary: %+v", s)
	}
}

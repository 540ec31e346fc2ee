package hypervisor

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode"

	"libvirt.org/go/libvirt"

	"github.com/bastionvm/bastion/vm"
)

// hostileAgent answers agent commands with the replies it was given, one
// per line, in order, and then fails every command: a guest that controls
// its agent controls every byte libvirt hands back.
type hostileAgent struct {
	mu      sync.Mutex
	replies []string
	sent    int
}

func (h *hostileAgent) send(_ vm.Domain, body string, _ libvirt.DomainQemuAgentCommandTimeout) (string, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !json.Valid([]byte(body)) {
		return "", fmt.Errorf("the pool sent a malformed command: %q", body)
	}
	if h.sent >= len(h.replies) {
		return "", fmt.Errorf("%w: the script ended", ErrAgentFailed)
	}
	h.sent++
	return h.replies[h.sent-1], nil
}

func hostilePool(replies string) (*Pool, *hostileAgent) {
	h := &hostileAgent{replies: strings.Split(replies, "\n")}
	p := &Pool{log: slog.New(slog.DiscardHandler), agentLimit: time.Second, maxRead: 4096, send: h.send}
	return p, h
}

// fitToShow reports whether an error text is fit for a log line and a
// user's terminal: no control characters, no invalid UTF-8.
func fitToShow(s string) bool {
	for _, r := range s {
		if r == '\uFFFD' || !unicode.IsPrint(r) && r != ' ' {
			return false
		}
	}
	return true
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

// FuzzAgentReplies: whatever the guest agent answers, ReadFile, WriteFile
// and Exec neither panic nor hang; ReadFile returns no more than its cap
// and only what the replies carried; Exec succeeds only on a reply that
// says the program exited 0; and every error is fit to show.
func FuzzAgentReplies(f *testing.F) {
	f.Add(`{"return":7}` + "\n" + `{"return":{"count":5,"buf-b64":"` + b64("hello") + `","eof":true}}` + "\n" + `{"return":{}}`)
	f.Add(`{"return":7}` + "\n" + `{"return":{"count":9,"buf-b64":"","eof":false}}`)
	f.Add(`{"return":7}` + "\n" + `{"return":{"count":3,"buf-b64":"` + b64("abc") + `"}}` + "\n" + `{"return":{"count":0,"buf-b64":""}}`)
	f.Add(`{"return":7}` + "\n" + `{"return":{"count":99999}}` + "\n" + `{"return":{}}`)
	f.Add(`{"return":7}` + "\n" + `{"return":{"count":49152}}` + "\n" + `{"return":{"count":49152,"eof":false}}` + "\n" + `{"return":{"count":49152}}` + "\n" + `{"return":{"count":1}}` + "\n" + `{"return":{}}`)
	f.Add(`{"return":{"pid":12}}` + "\n" + `{"return":{"exited":false}}` + "\n" + `{"return":{"exited":true,"exitcode":1,"err-data":"` + b64("\x1b]0;owned\x07\xff\n") + `"}}`)
	f.Add(`{"return":{"pid":12}}` + "\n" + `{"return":{"exited":true,"exitcode":0,"signal":9}}`)
	f.Add(`{"return":{"pid":12}}` + "\n" + `{"return":{"exited":true,"exitcode":1e100}}`)
	f.Add(`{"error":{"class":"GenericError","desc":"no"}}`)
	f.Add(`{"return":null}` + "\n" + `not json` + "\n" + `{"return":[1,2]}`)
	f.Fuzz(func(t *testing.T, replies string) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		d := vm.Domain{Name: "web1", UUID: "uuid-1"}

		p, _ := hostilePool(replies)
		data, err := p.ReadFile(ctx, d, "/etc/ssh/ssh_host_ed25519_key.pub")
		if err == nil {
			if len(data) > p.maxRead {
				t.Fatalf("ReadFile returned %d bytes, past its cap of %d", len(data), p.maxRead)
			}
			if !carried(replies, data) {
				t.Fatalf("ReadFile returned %q, which no reply carried", data)
			}
		} else if !fitToShow(err.Error()) {
			t.Fatalf("ReadFile's error is not fit to show: %q", err)
		}

		p, _ = hostilePool(replies)
		if err := p.WriteFile(ctx, d, "/tmp/nonce", make([]byte, 3*writeChunk+1)); err != nil && !fitToShow(err.Error()) {
			t.Fatalf("WriteFile's error is not fit to show: %q", err)
		}

		p, h := hostilePool(replies)
		err = p.Exec(ctx, d, "/bin/true")
		if err == nil {
			var last struct {
				Return struct {
					Exited   bool
					ExitCode int
					Signal   int
				}
			}
			if json.Unmarshal([]byte(h.replies[h.sent-1]), &last) != nil || !last.Return.Exited || last.Return.ExitCode != 0 || last.Return.Signal != 0 {
				t.Fatalf("Exec succeeded on the reply %q", h.replies[h.sent-1])
			}
		} else if !fitToShow(err.Error()) {
			t.Fatalf("Exec's error is not fit to show: %q", err)
		}
	})
}

// carried reports whether data is the concatenation of the buf-b64 fields
// of the replies after the first (the open's).
func carried(replies string, data []byte) bool {
	var all []byte
	for i, line := range strings.Split(replies, "\n") {
		var r struct {
			Return struct {
				Buf string `json:"buf-b64"`
			} `json:"return"`
		}
		if i == 0 || json.Unmarshal([]byte(line), &r) != nil {
			continue
		}
		b, err := base64.StdEncoding.DecodeString(r.Return.Buf)
		if err != nil {
			continue
		}
		all = append(all, b...)
	}
	return strings.HasPrefix(string(all), string(data))
}

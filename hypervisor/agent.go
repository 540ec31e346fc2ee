package hypervisor

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"libvirt.org/go/libvirt"

	"github.com/bastionvm/bastion/vm"
)

// agent sends one guest agent command to d and decodes its "return" into
// out (if not nil). The agent is told the context's remaining time.
func (p *Pool) agent(ctx context.Context, d vm.Domain, command string, args any, out any) error {
	req := map[string]any{"execute": command}
	if args != nil {
		req["arguments"] = args
	}
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	var reply string
	for delay := 250 * time.Millisecond; ; delay = min(2*delay, 2*time.Second) {
		timeout := p.agentTimeout(ctx)
		reply, err = call(ctx, func() (string, error) { return p.send(d, string(body), timeout) })
		if !errors.Is(err, ErrAgentNotConnected) || !p.settling(d.URI) || !waitFor(ctx, delay) {
			break
		}
		// libvirt was reconnected a moment ago and is still reaching the
		// guest agents: wait for this one within the caller's deadline.
	}
	p.noteAgent(d, err)
	if err != nil {
		return fmt.Errorf("%s: %s: %w", d.Name, command, err)
	}
	if out == nil {
		return nil
	}
	var envelope struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal([]byte(reply), &envelope); err != nil {
		return fmt.Errorf("%s: %s: %w: malformed reply: %w", d.Name, command, ErrAgentFailed, err)
	}
	if err := json.Unmarshal(envelope.Return, out); err != nil {
		return fmt.Errorf("%s: %s: %w: unexpected reply: %w", d.Name, command, ErrAgentFailed, err)
	}
	return nil
}

// noteAgent keeps what the last command to d's agent showed of it: up if
// it answered (even with an error of its own), down if it is not
// connected or did not answer; a guest that is not running is forgotten.
func (p *Pool) noteAgent(d vm.Domain, err error) {
	k := [2]string{d.URI, d.UUID}
	p.agentsMu.Lock()
	defer p.agentsMu.Unlock()
	if p.agents == nil {
		p.agents = make(map[[2]string]bool)
	}
	switch {
	case err == nil, errors.Is(err, ErrAgentFailed), errors.Is(err, ErrCommandDisabled), errors.Is(err, ErrNoSuchUser):
		p.agents[k] = true
	case errors.Is(err, ErrAgentNotConnected), errors.Is(err, ErrAgentSilent):
		p.agents[k] = false
	case errors.Is(err, vm.ErrNotRunning), errors.Is(err, vm.ErrNoSuchVM):
		delete(p.agents, k)
	}
}

// noteAgentEvent keeps what a lifecycle or agent event says of a guest's
// agent.
func (p *Pool) noteAgentEvent(e vm.Event) {
	k := [2]string{e.URI, e.UUID}
	p.agentsMu.Lock()
	defer p.agentsMu.Unlock()
	if p.agents == nil {
		p.agents = make(map[[2]string]bool)
	}
	switch e.Kind {
	case vm.EventAgentArrived:
		p.agents[k] = true
	case vm.EventAgentGone:
		p.agents[k] = false
	case vm.EventStopped, vm.EventUndefined, vm.EventMigrated:
		delete(p.agents, k)
	}
}

// Agents counts the guests whose agent answered the last command or
// event (up) and those whose agent did not (down), of the running guests
// the bastion has talked to or heard from since it started.
func (p *Pool) Agents() (up, down int) {
	p.agentsMu.Lock()
	defer p.agentsMu.Unlock()
	for _, ok := range p.agents {
		if ok {
			up++
		} else {
			down++
		}
	}
	return up, down
}

// libvirtSend is how the pool reaches a guest agent: through libvirt's
// qemuAgentCommand.
func (p *Pool) libvirtSend(d vm.Domain, body string, timeout libvirt.DomainQemuAgentCommandTimeout) (string, error) {
	dom, err := p.domain(d)
	if err != nil {
		return "", err
	}
	defer dom.Free()
	reply, err := dom.QemuAgentCommand(body, timeout, 0)
	if err != nil {
		return "", classify(err)
	}
	return reply, nil
}

// waitFor sleeps d and reports true, or false at once if ctx would end
// within d and a second.
func waitFor(ctx context.Context, d time.Duration) bool {
	if deadline, ok := ctx.Deadline(); ok && time.Until(deadline) < d+time.Second {
		return false
	}
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}

// agentTimeout is the pool's agent timeout in whole seconds, shortened to
// end a second before ctx's deadline (but at least one second), so that a
// silent agent is reported as such rather than as the caller's timeout.
func (p *Pool) agentTimeout(ctx context.Context) libvirt.DomainQemuAgentCommandTimeout {
	limit := p.agentLimit
	if deadline, ok := ctx.Deadline(); ok {
		limit = min(limit, time.Until(deadline)-time.Second)
	}
	return libvirt.DomainQemuAgentCommandTimeout(max(1, int(math.Ceil(limit.Seconds()))))
}

// Ping checks that d runs and its guest agent answers.
func (p *Pool) Ping(ctx context.Context, d vm.Domain) error {
	if !d.Running {
		return fmt.Errorf("%s: %w", d.Name, vm.ErrNotRunning)
	}
	return p.agent(ctx, d, "guest-ping", nil, nil)
}

// readChunk is how much one guest-file-read asks for: far below libvirt's
// 10 MiB cap on one agent reply, with base64's third on top.
const readChunk = 1 << 20

// writeChunk is how much one guest-file-write carries. Measured with qemu-ga
// 7.2 under libvirt 9.0: a request carrying 128 KiB returns in 60 ms, one
// carrying 192 KiB never returns and leaves the agent unavailable.
const writeChunk = 48 << 10

// defaultMaxRead bounds ReadFile unless Options say otherwise: the bastion
// reads keys and nonces, not data, and their size is the guest's choice.
const defaultMaxRead = 64 << 10

// ReadFile reads path in the guest through the agent.
func (p *Pool) ReadFile(ctx context.Context, d vm.Domain, path string) ([]byte, error) {
	var handle int64
	if err := p.agent(ctx, d, "guest-file-open", map[string]any{"path": path, "mode": "r"}, &handle); err != nil {
		return nil, err
	}
	defer p.closeFile(d, handle)
	var data []byte
	for {
		var r struct {
			Count int    `json:"count"`
			Buf   string `json:"buf-b64"`
			EOF   bool   `json:"eof"`
		}
		if err := p.agent(ctx, d, "guest-file-read", map[string]any{"handle": handle, "count": min(readChunk, p.maxRead+1)}, &r); err != nil {
			return nil, err
		}
		b, err := base64.StdEncoding.DecodeString(r.Buf)
		if err != nil {
			return nil, fmt.Errorf("%s: guest-file-read %s: %w: %w", d.Name, path, ErrAgentFailed, err)
		}
		if len(b) != r.Count {
			// Every reply but the last must carry data, or a guest could
			// keep the bastion reading nothing until its deadline.
			return nil, fmt.Errorf("%s: guest-file-read %s: %w: the reply counts %d bytes and carries %d", d.Name, path, ErrAgentFailed, r.Count, len(b))
		}
		data = append(data, b...)
		if len(data) > p.maxRead {
			return nil, fmt.Errorf("%s: %w: %s is larger than %d bytes", d.Name, ErrAgentFailed, path, p.maxRead)
		}
		if r.EOF || r.Count == 0 {
			return data, nil
		}
	}
}

// WriteFile creates or truncates path in the guest and writes data to it.
// The agent creates new files with mode 0600, owned by root.
func (p *Pool) WriteFile(ctx context.Context, d vm.Domain, path string, data []byte) error {
	var handle int64
	if err := p.agent(ctx, d, "guest-file-open", map[string]any{"path": path, "mode": "w"}, &handle); err != nil {
		return err
	}
	for len(data) > 0 {
		n := min(len(data), writeChunk)
		var w struct {
			Count int `json:"count"`
		}
		err := p.agent(ctx, d, "guest-file-write", map[string]any{"handle": handle, "buf-b64": base64.StdEncoding.EncodeToString(data[:n])}, &w)
		if err != nil {
			p.closeFile(d, handle)
			return err
		}
		if w.Count <= 0 || w.Count > n {
			// A count past what was sent would run off the end of data.
			p.closeFile(d, handle)
			return fmt.Errorf("%s: guest-file-write %s: %w: the agent says it wrote %d of %d bytes", d.Name, path, ErrAgentFailed, w.Count, n)
		}
		data = data[w.Count:]
	}
	// A failed close may mean the data never reached the disk.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	return p.agent(ctx, d, "guest-file-close", map[string]any{"handle": handle}, nil)
}

// closeFile closes an agent file handle, on its own short deadline so that
// a caller's expired context does not leak the handle.
func (p *Pool) closeFile(d vm.Domain, handle int64) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.agent(ctx, d, "guest-file-close", map[string]any{"handle": handle}, nil); err != nil {
		p.log.Warn("guest-file-close", "vm", d.Name, "err", err)
	}
}

// ErrExitStatus is wrapped by Exec's error when the program fails.
var ErrExitStatus = errors.New("program in the guest failed")

// Exec runs a program in the guest through the agent and waits for it.
// Output is not captured beyond a short error text: the agent's reply
// cap makes it unfit for data.
func (p *Pool) Exec(ctx context.Context, d vm.Domain, path string, args ...string) error {
	var started struct {
		PID int64 `json:"pid"`
	}
	if args == nil {
		args = []string{} // the agent wants an array, never null
	}
	if err := p.agent(ctx, d, "guest-exec", map[string]any{"path": path, "arg": args, "capture-output": true}, &started); err != nil {
		return err
	}
	for delay := 10 * time.Millisecond; ; delay = min(2*delay, 200*time.Millisecond) {
		var st struct {
			Exited   bool   `json:"exited"`
			ExitCode int    `json:"exitcode"`
			Signal   int    `json:"signal"`
			ErrData  string `json:"err-data"`
		}
		if err := p.agent(ctx, d, "guest-exec-status", map[string]any{"pid": started.PID}, &st); err != nil {
			return err
		}
		if st.Exited {
			if st.ExitCode == 0 && st.Signal == 0 {
				return nil
			}
			stderr, _ := base64.StdEncoding.DecodeString(st.ErrData)
			return fmt.Errorf("%s: %s: %w: exit %d, signal %d: %s", d.Name, path, ErrExitStatus, st.ExitCode, st.Signal, printable(stderr, 200))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %s: %w: %w", d.Name, path, ErrTimeout, ctx.Err())
		case <-time.After(delay):
		}
	}
}

// RemoveFile removes path in the guest. A file already gone is no error.
func (p *Pool) RemoveFile(ctx context.Context, d vm.Domain, path string) error {
	return p.Exec(ctx, d, "/bin/rm", "-f", "--", path)
}

// Chown gives path in the guest to user (and that user's group) with mode
// 0600.
func (p *Pool) Chown(ctx context.Context, d vm.Domain, path, user string) error {
	if err := p.Exec(ctx, d, "/bin/chown", "--", user+":", path); err != nil {
		return err
	}
	return p.Exec(ctx, d, "/bin/chmod", "0600", "--", path)
}

// AddAuthorizedKey appends an authorized_keys line for user in the guest,
// through libvirt's authorized-keys API.
func (p *Pool) AddAuthorizedKey(ctx context.Context, d vm.Domain, user, line string) error {
	return p.setKeys(ctx, d, user, line, libvirt.DOMAIN_AUTHORIZED_SSH_KEYS_SET_APPEND)
}

// RemoveAuthorizedKey removes an authorized_keys line for user.
func (p *Pool) RemoveAuthorizedKey(ctx context.Context, d vm.Domain, user, line string) error {
	return p.setKeys(ctx, d, user, line, libvirt.DOMAIN_AUTHORIZED_SSH_KEYS_SET_REMOVE)
}

func (p *Pool) setKeys(ctx context.Context, d vm.Domain, user, line string, flags libvirt.DomainAuthorizedSSHKeysFlags) error {
	_, err := call(ctx, func() (struct{}, error) {
		dom, err := p.domain(d)
		if err != nil {
			return struct{}{}, err
		}
		defer dom.Free()
		return struct{}{}, classify(dom.AuthorizedSSHKeysSet(user, []string{line}, flags))
	})
	if err != nil {
		return fmt.Errorf("%s: authorized keys of %s: %w", d.Name, user, err)
	}
	return nil
}

// AuthorizedKeys lists user's authorized_keys lines in the guest.
func (p *Pool) AuthorizedKeys(ctx context.Context, d vm.Domain, user string) ([]string, error) {
	keys, err := call(ctx, func() ([]string, error) {
		dom, err := p.domain(d)
		if err != nil {
			return nil, err
		}
		defer dom.Free()
		keys, err := dom.AuthorizedSSHKeysGet(user, 0)
		return keys, classify(err)
	})
	if err != nil {
		return nil, fmt.Errorf("%s: authorized keys of %s: %w", d.Name, user, err)
	}
	return keys, nil
}

// printable is at most limit bytes of b, what a guest wrote, made fit for
// a log line or a user's terminal: control characters, escapes among them,
// and invalid UTF-8 become '?', and trailing space is trimmed.
func printable(b []byte, limit int) string {
	if len(b) > limit {
		b = b[:limit]
	}
	s := strings.Map(func(r rune) rune {
		if r == utf8.RuneError || !unicode.IsPrint(r) && r != ' ' {
			return '?'
		}
		return r
	}, strings.ToValidUTF8(string(b), "?"))
	return strings.TrimRight(s, " ")
}

// SetHostname makes name the guest's host name: the running kernel's
// (written to /proc/sys/kernel/hostname, which needs no program in the
// guest), /etc/hostname, and the 127.0.1.1 line of /etc/hosts, Debian's
// way of letting a machine resolve its own name.
func (p *Pool) SetHostname(ctx context.Context, d vm.Domain, name string) error {
	if err := vm.CheckHostName(name); err != nil {
		return err
	}
	if err := p.WriteFile(ctx, d, "/proc/sys/kernel/hostname", []byte(name)); err != nil {
		return fmt.Errorf("the running host name: %w", err)
	}
	if err := p.WriteFile(ctx, d, "/etc/hostname", []byte(name+"\n")); err != nil {
		return fmt.Errorf("/etc/hostname: %w", err)
	}
	hosts, err := p.ReadFile(ctx, d, "/etc/hosts")
	switch {
	case err != nil && strings.Contains(err.Error(), "No such file or directory"):
		hosts = []byte("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
	case err != nil:
		// Never write a stand-in over a file that could not be read.
		return fmt.Errorf("/etc/hosts: %w", err)
	}
	if err := p.WriteFile(ctx, d, "/etc/hosts", HostsWith(hosts, name)); err != nil {
		return fmt.Errorf("/etc/hosts: %w", err)
	}
	// A file the agent made is 0600; /etc/hosts is for everyone to read.
	return p.Exec(ctx, d, "/bin/chmod", "0644", "/etc/hosts")
}

// HostsWith is an /etc/hosts with name on its 127.0.1.1 line, replacing
// the names there (the image's own) or adding the line after 127.0.0.1's.
func HostsWith(hosts []byte, name string) []byte {
	lines := strings.SplitAfter(string(hosts), "\n")
	if n := len(lines); n > 0 && lines[n-1] == "" {
		lines = lines[:n-1]
	}
	entry := "127.0.1.1\t" + name + "\n"
	var out strings.Builder
	done := false
	for _, line := range lines {
		fields := strings.Fields(line)
		switch {
		case len(fields) > 0 && fields[0] == "127.0.1.1":
			if !done {
				out.WriteString(entry)
				done = true
			}
			continue
		case !strings.HasSuffix(line, "\n"):
			line += "\n"
		}
		out.WriteString(line)
		if !done && len(fields) > 0 && fields[0] == "127.0.0.1" {
			out.WriteString(entry)
			done = true
		}
	}
	if !done {
		out.WriteString(entry)
	}
	return []byte(out.String())
}

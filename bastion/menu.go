package bastion

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/policy"
	"github.com/bastionvm/bastion/vm"
)

// menu serves a session on the bastion itself. With a terminal it shows the
// VMs and logins the account may use and connects the session to the one
// picked; without one it prints the same list and how to connect.
func (s *Server) menu(fc *frontConn, newCh gossh.NewChannel) {
	ch, reqs, err := newCh.Accept()
	if err != nil {
		return
	}
	var ptyReq *gossh.Request
	cert := fc.certLogin()
	for req := range reqs {
		req = forced(cert, req)
		switch req.Type {
		case "pty-req":
			if !cert.Permits("permit-pty") {
				req.Reply(false, nil)
				continue
			}
			ptyReq = req
			req.Reply(true, nil)
		case "env", "window-change":
			if req.WantReply {
				req.Reply(false, nil)
			}
		case "exec":
			var cmd struct{ Command string }
			gossh.Unmarshal(req.Payload, &cmd)
			args := strings.Fields(cmd.Command)
			if len(args) > 0 && args[0] == "watch" {
				req.Reply(true, nil)
				go gossh.DiscardRequests(reqs)
				s.watch(fc, ch, cmd.Command, args)
				return
			}
			if len(args) > 0 && s.Commands[args[0]] != nil {
				req.Reply(true, nil)
				go gossh.DiscardRequests(reqs)
				s.command(fc, ch, cmd.Command, args)
				return
			}
			// A command for a VM sent to the bastion (an IDE or a script
			// given the bastion as its host) fails as a shell's unknown
			// command does: no menu, no list to mistake for its output.
			req.Reply(true, nil)
			go gossh.DiscardRequests(reqs)
			fmt.Fprintf(ch.Stderr(), "bastion: %q is not a command of the bastion; commands for a VM go through it: ssh -J %s@<bastion> <login>@<vm> COMMAND\r\n",
				firstWord(cmd.Command), fc.who().Name)
			sendExitStatus(ch, 127)
			ch.CloseWrite()
			ch.Close()
			return
		case "shell":
			req.Reply(true, nil)
			choices := s.choices(fc)
			if ptyReq == nil {
				s.listChoices(fc, ch, choices)
				sendExitStatus(ch, 0)
				ch.Close()
				return
			}
			s.pick(fc, ch, reqs, ptyReq, choices)
			return
		default:
			if req.WantReply {
				req.Reply(false, nil)
			}
		}
	}
	ch.Close()
}

// firstWord is the command's name, at most 64 bytes of it, for a message.
func firstWord(command string) string {
	word, _, _ := strings.Cut(strings.TrimSpace(command), " ")
	if len(word) > 64 {
		word = word[:64] + "…"
	}
	return word
}

// choice is a VM on the menu and the logins offered for it; "*" means any.
type choice struct {
	vm     vm.Domain
	logins []string
}

func (s *Server) choices(fc *frontConn) []choice {
	if s.VMs == nil || s.Policy == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(fc.ctx, 30*time.Second)
	defer cancel()
	vms, err := s.VMs.List(ctx)
	if err != nil {
		s.logger().Warn("listing VMs for the menu", "err", err)
		return nil
	}
	var out []choice
	for _, d := range vms {
		if !d.Running {
			continue
		}
		if l := s.Policy.Logins(fc.who().Name, fc.who().Groups, sourceAddr(fc.source), d, time.Now()); len(l) > 0 {
			out = append(out, choice{vm: d, logins: l})
		}
	}
	slices.SortFunc(out, func(a, b choice) int { return strings.Compare(a.vm.Name, b.vm.Name) })
	return out
}

func (s *Server) listChoices(fc *frontConn, w io.Writer, choices []choice) {
	if len(choices) == 0 {
		fmt.Fprintf(w, "bastion: no VM is open to %s right now.\r\n", fc.who().Name)
		return
	}
	fmt.Fprintf(w, "VMs %s may reach:\r\n", fc.who().Name)
	for i, c := range choices {
		fmt.Fprintf(w, "  %2d) %-24s %s\r\n", i+1, c.vm.Name, strings.ReplaceAll(strings.Join(c.logins, ", "), "*", "any login"))
	}
	fmt.Fprintf(w, "Connect with: ssh -J %s@<bastion> <login>@<vm>\r\n", fc.who().Name)
}

// pick runs the interactive menu, then forwards the session to the VM.
func (s *Server) pick(fc *frontConn, ch gossh.Channel, reqs <-chan *gossh.Request, ptyReq *gossh.Request, choices []choice) {
	defer ch.Close()
	s.listChoices(fc, ch, choices)
	if len(choices) == 0 {
		sendExitStatus(ch, 1)
		return
	}
	in := &lineReader{ch: ch}
	var picked choice
	for {
		line, ok := in.prompt("Choose a VM (number or name), or q to quit: ")
		if !ok || line == "q" {
			sendExitStatus(ch, 0)
			return
		}
		n, err := strconv.Atoi(line)
		i := slices.IndexFunc(choices, func(c choice) bool { return c.vm.Name == line })
		if err == nil && n >= 1 && n <= len(choices) {
			i = n - 1
		}
		if i >= 0 {
			picked = choices[i]
			break
		}
		fmt.Fprintf(ch, "No VM %q on the list.\r\n", line)
	}
	login := picked.logins[0]
	if len(picked.logins) > 1 || login == "*" {
		offer := ""
		if login != "*" {
			offer = " [" + login + "]"
		}
		line, ok := in.prompt(fmt.Sprintf("Login on %s (%s)%s: ", picked.vm.Name, strings.ReplaceAll(strings.Join(picked.logins, ", "), "*", "any"), offer))
		if !ok {
			sendExitStatus(ch, 0)
			return
		}
		if line != "" || login == "*" {
			login = line
		}
	}
	fmt.Fprintf(ch, "Connecting to %s@%s...\r\n", login, picked.vm.Name)
	// The link is this session's alone; other channels of the connection
	// do not wait for it (establishing may take a whole trust check).
	l, err := s.establish(fc, picked.vm, login)
	if err == nil {
		l.start(fc.conn)
	}
	if err != nil {
		fmt.Fprintf(ch, "%s\r\n", userMessage(picked.vm.Name, err))
		sendExitStatus(ch, 255)
		return
	}
	d := l.allow(ask{kind: policy.Shell})
	if !d.Allow {
		fmt.Fprintf(ch, "%s\r\n", l.denial(policy.Shell))
		sendExitStatus(ch, 255)
		return
	}
	up, upReqs, err := l.openSession(nil)
	if err != nil {
		l.up.sessionRefused(err)
		fmt.Fprintf(ch, "bastion: %s: %v\r\n", picked.vm.Name, err)
		sendExitStatus(ch, 255)
		return
	}
	f := &sessionForward{link: l, up: up, down: ch, id: fc.channelN.Add(1), start: ask{kind: policy.Shell}, limit: d.MaxTime}
	f.notePty(ptyReq.Payload)
	if err := f.record(d); err != nil {
		fmt.Fprintf(ch, "%s\r\n", f.refusal)
		up.Close()
		sendExitStatus(ch, 255)
		return
	}
	for _, r := range []struct {
		name    string
		payload []byte
	}{{"pty-req", ptyReq.Payload}, {"shell", nil}} {
		ok, _, err := s.within(func() (bool, []byte, error) {
			ok, err := up.SendRequest(r.name, true, r.payload)
			return ok, nil, err
		}, func() { up.Close() })
		if err != nil || !ok {
			fmt.Fprintf(ch, "bastion: %s: the VM refused the %s\r\n", picked.vm.Name, r.name)
			up.Close()
			f.discardRecording()
			sendExitStatus(ch, 255)
			return
		}
	}
	f.untrack = l.track(f.start, f.limit, f.end)
	f.started()
	f.runStarted(upReqs, reqs)
}

// lineReader reads lines typed at a remote terminal in raw mode, echoing
// them and handling backspace, ^C and ^D.
type lineReader struct {
	ch  gossh.Channel
	buf []byte
}

// prompt writes p and reads a line; false means the user gave up (^C, ^D)
// or the channel closed.
func (r *lineReader) prompt(p string) (string, bool) {
	io.WriteString(r.ch, p)
	var line []byte
	for {
		if len(r.buf) == 0 {
			b := make([]byte, 256)
			n, err := r.ch.Read(b)
			if err != nil {
				return "", false
			}
			r.buf = b[:n]
		}
		c := r.buf[0]
		r.buf = r.buf[1:]
		switch c {
		case '\r', '\n':
			io.WriteString(r.ch, "\r\n")
			return strings.TrimSpace(string(line)), true
		case 3, 4: // ^C, ^D
			io.WriteString(r.ch, "\r\n")
			return "", false
		case 127, 8: // backspace
			if len(line) > 0 {
				line = line[:len(line)-1]
				io.WriteString(r.ch, "\b \b")
			}
		default:
			if c >= ' ' && c < 127 && len(line) < 256 {
				line = append(line, c)
				r.ch.Write([]byte{c})
			}
		}
	}
}

// command runs one of the bastion's own commands on ch, between a
// session_start and a session_end that name no VM.
func (s *Server) command(fc *frontConn, ch gossh.Channel, line string, args []string) {
	ev := audit.Event{Session: fc.id, Account: fc.who().Name, Source: fc.source.String(), Channel: "command"}
	act := audit.Activity{ChannelID: fc.channelN.Add(1), Kind: "exec", Command: cut(line, maxCommandAudited)}
	start := act
	ev.Type, ev.Activity = audit.SessionStart, &start
	s.audit(ev)
	began := time.Now()
	out := countingWriter{ch, new(atomic.Int64)}
	status := s.Commands[args[0]](fc.ctx, fc.who(), fc.source, args[1:], out)
	sendExitStatus(ch, uint32(status))
	ch.Close()
	act.ExitStatus, act.Seconds, act.BytesDown = &status, seconds(time.Since(began)), out.n.Load()
	ev.Type, ev.Activity = audit.SessionEnd, &act
	s.audit(ev)
}

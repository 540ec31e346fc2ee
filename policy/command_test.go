package policy

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

func TestWordsSplitsPlainCommands(t *testing.T) {
	for _, tc := range []struct {
		command string
		want    []string
	}{
		{"id", []string{"id"}},
		{"systemctl status nginx", []string{"systemctl", "status", "nginx"}},
		{"  journalctl\t-u  nginx.service  ", []string{"journalctl", "-u", "nginx.service"}},
		{"date +%Y-%m-%d", []string{"date", "+%Y-%m-%d"}},
		{"dd if=/dev/zero of=/tmp/x bs=1M count=1", []string{"dd", "if=/dev/zero", "of=/tmp/x", "bs=1M", "count=1"}},
		{"env X=1 rm -rf /", []string{"env", "X=1", "rm", "-rf", "/"}},
		{"scp -v -r -p -d -t -- -dash", []string{"scp", "-v", "-r", "-p", "-d", "-t", "--", "-dash"}},
		{"ls user@host:/a,b", []string{"ls", "user@host:/a,b"}},
		{"/usr/bin/uptime", []string{"/usr/bin/uptime"}},
	} {
		got, err := Words(tc.command)
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("Words(%q) = %q, %v; want %q", tc.command, got, err, tc.want)
		}
	}
}

func TestWordsRefusesWhatAShellWouldInterpret(t *testing.T) {
	for _, tc := range []struct {
		command, want string // want: in the error
	}{
		{"", "no words"},
		{" \t ", "no words"},
		{"systemctl status x; id", `";" at byte 18 is a command separator`},
		{"systemctl status x\nid", "line break"},
		{"systemctl status x\rid", "line break"},
		{"systemctl status x || id", "a pipe or ||"},
		{"systemctl status x && id", "control operator"},
		{"systemctl status x & id", "control operator"},
		{"systemctl status x | sh", "a pipe"},
		{"systemctl status x ^ sh", "Bourne"},
		{"systemctl status `id`", "command substitution"},
		{"systemctl status $(id)", "expansion or substitution"},
		{"systemctl status ${IFS}", "expansion or substitution"},
		{"systemctl status $HOME", "expansion or substitution"},
		{"systemctl status x >/etc/passwd", "redirection"},
		{"systemctl status x 2>/dev/null", "redirection"},
		{"systemctl status </etc/shadow", "redirection"},
		{"systemctl status *", "a glob"},
		{"systemctl status ngin?", "a glob"},
		{"systemctl status [n]ginx", "a glob"},
		{"systemctl status {a,b}", "brace"},
		{"systemctl status ~root", "tilde"},
		{"systemctl status x #comment", "comment"},
		{"! systemctl status x", "negation"},
		{"(systemctl status x)", "subshell"},
		{"systemctl status x\\;id", "escape"},
		{"systemctl status 'x y'", "quote"},
		{`systemctl status "x y"`, "quote"},
		{"systemctl status 'x'", "quote"},
		{"systemctl status x\x00", "control character"},
		{"systemctl status x\x1b", "control character"},
		{"systemctl status x\x7f", "control character"},
		{"systemctl status x\vid", "control character"},
		{"systemctl status n\xc3\xa9", "not ASCII"},
		{"PATH=/tmp systemctl status x", "variable assignment"},
		{"LD_PRELOAD=/tmp/x.so id", "variable assignment"},
		{"echo =ls", "zsh expands"},
	} {
		got, err := Words(tc.command)
		if err == nil || !errors.Is(err, ErrNotPlain) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Words(%q) = %q, %v; want an error with %q", tc.command, got, err, tc.want)
		}
	}
}

// decideCommand asks p about an exec of command by carol (group dev) on
// web1 as dev.
func decideCommand(p *Policy, command string) Decision {
	return p.Decide(Request{Account: "carol", Groups: []string{"dev"}, VM: web1, Login: "dev", Channel: Exec, Command: command, Time: workday})
}

func allowCommands(patterns ...string) *Policy {
	return &Policy{Rules: []Rule{{Name: "allow", Effect: Allow, Groups: []string{"dev"}, VMs: []string{"*"}, Logins: []string{"dev"},
		Channels: []Channel{Exec}, Commands: patterns}}}
}

func TestAllowCommandsMatchWordByWord(t *testing.T) {
	p := allowCommands("systemctl status *", "journalctl -u * **", "uptime", "cat /var/log/app-?.log")
	for _, tc := range []struct {
		command string
		allow   bool
	}{
		{"systemctl status nginx", true},
		{"systemctl  status\tnginx", true},
		{"systemctl status /etc/x", true}, // * spans / within a word
		{"systemctl status", false},       // * is one word, not zero
		{"systemctl status a b", false},   // nor two
		{"systemctl status 'x y'", false}, // quotes would join words
		{"systemctl status 'x'", false},
		{`systemctl status "nginx"`, false},
		{"systemctl status x\\ y", false},
		{"systemctl status nginx; id", false},
		{"systemctl status nginx;id", false},
		{"systemctl status nginx\nid", false},
		{"systemctl status nginx || id", false},
		{"systemctl status nginx && id", false},
		{"systemctl status nginx | sh", false},
		{"systemctl status nginx &", false},
		{"systemctl status `id`", false},
		{"systemctl status $(id)", false},
		{"systemctl status ${PATH}", false},
		{"systemctl status $x", false},
		{"systemctl status nginx >/etc/motd", false},
		{"systemctl status nginx 2>&1", false},
		{"systemctl status <x", false},
		{"systemctl status *", false},
		{"systemctl status ng?nx", false},
		{"systemctl status [a]", false},
		{"systemctl status {a,b}", false},
		{"systemctl status ~", false},
		{"systemctl status x #", false},
		{"/bin/systemctl status nginx", false}, // an allow rule names its program exactly
		{"PATH=/tmp systemctl status nginx", false},
		{"journalctl -u nginx", true}, // ** matches zero words
		{"journalctl -u nginx --since today", true},
		{"journalctl -u nginx --since $(id)", false},
		{"journalctl -u", false},
		{"journalctl", false},
		{"uptime", true},
		{"uptime -p", false},
		{"cat /var/log/app-1.log", true},
		{"cat /var/log/app-12.log", false},
		{"", false},
	} {
		if d := decideCommand(p, tc.command); d.Allow != tc.allow {
			t.Errorf("%q under %q: allow=%v, want %v", tc.command, p.Rules[0].Commands, d.Allow, tc.allow)
		}
	}
	// "**" alone is any plain command, and only that.
	any := allowCommands("**")
	for command, want := range map[string]bool{"id": true, "ls -l /": true, "id; ls": false, "ls $HOME": false} {
		if d := decideCommand(any, command); d.Allow != want {
			t.Errorf("%q under **: allow=%v", command, d.Allow)
		}
	}
	// An allow rule without commands allows any exec, plain or not.
	open := allowCommands()
	if d := decideCommand(open, "cat > /tmp/x; echo done"); !d.Allow {
		t.Errorf("an allow rule without commands refused a shell line: %+v", d)
	}
}

func TestDenyCommandsCatchIndirectionAndNonPlain(t *testing.T) {
	for _, pattern := range []string{"rm *", "rm **"} {
		p := allowCommands("**")
		p.Rules[0].Commands = nil // allow any exec
		p.Rules = append(p.Rules, Rule{Name: "no-rm", Effect: Deny, Channels: []Channel{Exec}, Commands: []string{pattern}})
		for _, tc := range []struct {
			command string
			deny    bool
		}{
			{"rm -rf /", true},
			{"rm x", true},
			{"/bin/rm -rf /", true},
			{"/usr/bin/rm -rf /", true},
			{"./rm -rf /", true},
			{"command rm -rf /", true},
			{"env X=1 rm -rf /", true},
			{"nice rm -rf /", true},
			{"nice -n 19 rm -rf /", true},
			{"sudo -u root rm -rf /", true},
			{"busybox rm -rf /", true},
			{"X=1 rm -rf /", true},  // not plain
			{"'rm' -rf /", true},    // not plain
			{"r\\m -rf /", true},    // not plain
			{"$(echo rm) x", true},  // not plain
			{"ls; rm -rf /", true},  // not plain
			{"ls && rm x", true},    // not plain
			{"ls\nrm x", true},      // not plain
			{"ls -l /", false},      // plain, no rm
			{"rmdir /tmp/x", false}, // another program
			{"/bin/rmdir x", false},
			{"echo harm x", false},
		} {
			d := decideCommand(p, tc.command)
			if d.Allow == tc.deny || (tc.deny && d.Rule != "no-rm") {
				t.Errorf("%q against deny %q: %+v, want deny=%v", tc.command, pattern, d, tc.deny)
			}
		}
		// rm alone: ** matches zero words, * needs one.
		if d := decideCommand(p, "rm"); d.Allow != (pattern == "rm *") {
			t.Errorf("bare rm against deny %q: %+v", pattern, d)
		}
	}
	// A deny pattern with a path compares by base name too.
	p := allowCommands()
	p.Rules = append(p.Rules, Rule{Name: "no-reboot", Effect: Deny, Commands: []string{"/sbin/reboot **"}})
	for _, command := range []string{"reboot", "/usr/sbin/reboot now", "systemd-run reboot"} {
		if d := decideCommand(p, command); d.Allow {
			t.Errorf("%q against deny /sbin/reboot **: allowed", command)
		}
	}
}

func TestParseSCPAcceptsOnlyOpenSSHForms(t *testing.T) {
	for _, tc := range []struct {
		command  string
		download bool
		path     string
	}{
		// What OpenSSH 9.2's scp -O sent, seen with scp -v.
		{"scp -t /tmp/a", false, "/tmp/a"},
		{"scp -f /tmp/a", true, "/tmp/a"},
		{"scp -v -t /tmp/a", false, "/tmp/a"},
		{"scp -v -f /tmp/a", true, "/tmp/a"},
		{"scp -v -r -t /tmp/d", false, "/tmp/d"},
		{"scp -v -r -f /tmp/d", true, "/tmp/d"},
		{"scp -v -p -t /tmp/a", false, "/tmp/a"},
		{"scp -v -p -f /tmp/a", true, "/tmp/a"},
		{"scp -v -d -t /tmp", false, "/tmp"},
		{"scp -v -r -p -d -t /tmp", false, "/tmp"},
		{"scp -v -t .", false, "."},
		{"scp -v -f -- -dash", true, "-dash"},
		// Combined options, and -q.
		{"scp -rpt /tmp", false, "/tmp"},
		{"scp -qf x", true, "x"},
		{"scp -r -p -d -v -q -t -- x", false, "x"},
	} {
		c, ok := ParseSCP(tc.command)
		if !ok || c.Download != tc.download || c.Path != tc.path {
			t.Errorf("ParseSCP(%q) = %+v, %v; want download=%v path %q", tc.command, c, ok, tc.download, tc.path)
		}
		if CommandKind(tc.command) != SCP {
			t.Errorf("CommandKind(%q) is not scp", tc.command)
		}
	}
	for _, command := range []string{
		"scp -f /nonexistent; echo INJECTED-$(id -un)",
		"scp -f /x\nid",
		"scp -f /x || id",
		"scp -f $(id)",
		"scp -f 'a b'",
		"scp -f a*",
		"/usr/bin/scp -f /x",
		"./scp -f /x",
		"sscp -f /x",
		"scp",
		"scp -f",
		"scp -t",
		"scp -f --",
		"scp -f a b",
		"scp -t -f x",
		"scp -tf x",
		"scp -f -t x",
		"scp -r x",
		"scp x -f",
		"scp -f x -r",
		"scp -S /bin/sh -f x",
		"scp -o ProxyCommand=id -f x",
		"scp -F /tmp/cfg -f x",
		"scp -3 -f x",
		"scp -f -- a b",
		"scp -- -f x",
		"scp -f -x",
		"env scp -f x",
		"X=1 scp -f x",
		"scp -f x #",
	} {
		if c, ok := ParseSCP(command); ok {
			t.Errorf("ParseSCP(%q) accepted it: %+v", command, c)
		}
		if CommandKind(command) != Exec {
			t.Errorf("CommandKind(%q) is not exec", command)
		}
	}
}

func TestSCPReadAllowsOnlyDownloads(t *testing.T) {
	scpRule := func(channels ...Channel) *Policy {
		return &Policy{Rules: []Rule{{Name: "r", Effect: Allow, Groups: []string{"dev"}, VMs: []string{"*"}, Logins: []string{"dev"}, Channels: channels}}}
	}
	ask := func(p *Policy, ch Channel, command string) bool {
		return p.Decide(Request{Account: "carol", Groups: []string{"dev"}, VM: web1, Login: "dev", Channel: ch, Command: command, Time: workday}).Allow
	}
	read, full := scpRule(SCPRead), scpRule(SCP)
	for _, tc := range []struct {
		command         string
		underRead, full bool
	}{
		{"scp -f /etc/hostname", true, true},
		{"scp -v -r -p -f /srv", true, true},
		{"scp -t /tmp/x", false, true},
		{"scp -v -d -t /tmp", false, true},
		{"scp -f /x; id", false, false},
		{"scp -f a b", false, false},
		{"cat /etc/hostname", false, false},
	} {
		if got := ask(read, SCP, tc.command); got != tc.underRead {
			t.Errorf("%q under scp-read: allow=%v", tc.command, got)
		}
		if got := ask(full, SCP, tc.command); got != tc.full {
			t.Errorf("%q under scp: allow=%v", tc.command, got)
		}
	}
	// scp-read is about scp only: no sftp, no exec.
	if ask(read, SFTP, "") || ask(read, Exec, "id") {
		t.Error("scp-read allowed sftp or exec")
	}
	// A deny rule listing scp-read stops downloads, not uploads.
	p := scpRule(SCP)
	p.Rules = append(p.Rules, Rule{Name: "no-download", Effect: Deny, Channels: []Channel{SCPRead}})
	if ask(p, SCP, "scp -f x") || !ask(p, SCP, "scp -t x") {
		t.Error("a deny rule with scp-read")
	}
}

// TestDecideClassifiesCommandsItself: whatever kind a caller names for a
// command, exec or scp, the policy decides on what the command is.
func TestDecideClassifiesCommandsItself(t *testing.T) {
	scpOnly := &Policy{Rules: []Rule{{Name: "scp", Effect: Allow, Groups: []string{"dev"}, VMs: []string{"*"}, Logins: []string{"dev"}, Channels: []Channel{SCP}}}}
	execOnly := allowCommands()
	ask := func(p *Policy, ch Channel, command string) Decision {
		return p.Decide(Request{Account: "carol", Groups: []string{"dev"}, VM: web1, Login: "dev", Channel: ch, Command: command, Time: workday})
	}
	if d := ask(scpOnly, SCP, "scp -f /x; echo INJECTED"); d.Allow {
		t.Errorf("a shell line asked as scp: %+v", d)
	}
	if d := ask(scpOnly, Exec, "scp -f /x"); !d.Allow {
		t.Errorf("scp -f asked as exec under an scp rule: %+v", d)
	}
	if d := ask(execOnly, Exec, "scp -f /x"); d.Allow {
		t.Errorf("scp -f under an exec-only rule: %+v", d)
	}
	if d := ask(execOnly, SCP, "ls; id"); !d.Allow {
		t.Errorf("a shell line asked as scp under an exec rule without commands: %+v", d)
	}
	if d := decideCommand(allowCommands("ls"), "ls; id"); d.Allow || !strings.Contains(d.Reason, "(not a plain command)") {
		t.Errorf("the reason for a non-plain command: %+v", d)
	}
}

func TestParseCommandPatterns(t *testing.T) {
	rule := func(commands string) string {
		return "[[rule]]\nname = \"a\"\ngroups = [\"g\"]\nvms = [\"*\"]\nlogins = [\"x\"]\nchannels = [\"exec\", \"scp-read\"]\n\n[[rule]]\nname = \"b\"\neffect = \"deny\"\ncommands = " + commands + "\n"
	}
	for _, tc := range []struct{ commands, want string }{
		{`[""]`, `p.toml:8: rule b: invalid rule: commands: pattern "": an empty pattern`},
		{`["  "]`, "an empty pattern"},
		{`["ls", "ls; id"]`, `pattern "ls; id": "ls;" can never match: a plain command has no ";" (a command separator)`},
		{`["echo 'x'"]`, `has no "'" (a quote`},
		{`["echo $HOME"]`, `has no "$"`},
		{`["echo [ab]"]`, `has no "["`},
		{`["echo a\nb"]`, "line break"},
		{`["cat ~/x"]`, "tilde"},
		{`["X=1 ls"]`, `"X=1" can never match: a plain command has no "=" in its first word`},
		{`["echo =*"]`, `"=*" can never match: no word of a plain command starts with "="`},
		{`["ls ** -l"]`, `"**" is only a pattern word at the end`},
		{`["** ls"]`, `"**" is only a pattern word at the end`},
	} {
		_, err := Parse("p.toml", []byte(rule(tc.commands)), true)
		if err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("commands = %s: %v, want %q", tc.commands, err, tc.want)
		}
	}
	for _, ok := range []string{`["**"]`, `["rm **"]`, `["dd if=* of=*"]`, `["journalctl -u * --since ?? **"]`, `["date +%s"]`} {
		if _, err := Parse("p.toml", []byte(rule(ok)), true); err != nil {
			t.Errorf("commands = %s: %v", ok, err)
		}
	}
	// commands go with exec, scp or scp-read.
	if _, err := Parse("p.toml", []byte("[[rule]]\neffect = \"deny\"\nchannels = [\"scp-read\"]\ncommands = [\"scp -f **\"]\n"), true); err != nil {
		t.Errorf("commands with scp-read: %v", err)
	}
}

// FuzzWords checks that whatever Words accepts is what a shell would read
// the same way: words of plain characters only, no "=" in the first, and
// the words rejoined with single spaces split back into the same words.
func FuzzWords(f *testing.F) {
	for _, seed := range []string{"systemctl status nginx", "a  b\tc", "scp -v -f -- -x", "x; y", "$(id)", "'a b'", "", "dd if=x", "X=1 y"} {
		f.Add(seed)
	}
	const specials = ";&|<>$`*?[]{}~#!()\\'\"\n\r^"
	f.Fuzz(func(t *testing.T, command string) {
		words, err := Words(command)
		if err != nil {
			if !errors.Is(err, ErrNotPlain) || words != nil {
				t.Fatalf("Words(%q): %q, %v", command, words, err)
			}
			return
		}
		if len(words) == 0 {
			t.Fatalf("Words(%q) accepted no words", command)
		}
		if strings.ContainsAny(command, specials) {
			t.Fatalf("Words(%q) accepted a special character", command)
		}
		for i, w := range words {
			if w == "" {
				t.Fatalf("Words(%q): an empty word", command)
			}
			for j := 0; j < len(w); j++ {
				if !plainByte(w[j]) {
					t.Fatalf("Words(%q): word %q has %q", command, w, w[j])
				}
			}
			if (i == 0 && strings.Contains(w, "=")) || w[0] == '=' {
				t.Fatalf("Words(%q): \"=\" in the first word or starting one", command)
			}
		}
		again, err := Words(strings.Join(words, " "))
		if err != nil || !slices.Equal(again, words) {
			t.Fatalf("Words(%q) = %q, but rejoined they split as %q, %v", command, words, again, err)
		}
		// A plain command is scp only if the stricter scp reading agrees.
		if c, ok := ParseSCP(command); ok && (words[0] != "scp" || c.Path != words[len(words)-1]) {
			t.Fatalf("ParseSCP(%q) = %+v", command, c)
		}
	})
}

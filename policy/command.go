package policy

import (
	"errors"
	"fmt"
	"strings"
)

// The VM's sshd hands an exec command line to the login's shell
// (`sh -c COMMAND`), so what a command is allowed to do depends on how that
// shell reads it. The policy only reasons about command lines whose meaning
// it can be sure of: plain commands, a run of words made of characters no
// shell treats specially, separated by blanks. Anything else, a semicolon,
// a quote, a dollar, a glob, a line break, is "not a plain command", and an
// allow rule's commands never match it.

// ErrNotPlain is wrapped by every error of Words.
var ErrNotPlain = errors.New("not a plain command")

// plainByte reports whether c may appear in a plain word. The set is
// letters, digits and - _ . / : , + @ % =, which neither POSIX sh nor bash,
// dash, zsh or ksh give a meaning outside a few positions, and none that
// ends a word or starts another command. Bytes from 0x80 up are refused:
// in some multibyte locales a trailing byte can be a backslash.
func plainByte(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	return strings.IndexByte("-_./:,+@%=", c) >= 0
}

// blank separates words, as <blank> does for the shell's tokenizer.
func blank(c byte) bool { return c == ' ' || c == '\t' }

// special says what the shell would make of a byte that is neither plain
// nor blank.
func special(c byte) string {
	switch c {
	case ';':
		return "a command separator"
	case '\n', '\r':
		return "a line break, which separates commands"
	case '&':
		return "a control operator (& or &&)"
	case '|':
		return "a pipe or ||"
	case '^':
		return "a pipe in the Bourne shell"
	case '<', '>':
		return "a redirection"
	case '$':
		return "an expansion or substitution"
	case '`':
		return "a command substitution"
	case '*', '?', '[', ']':
		return "a glob"
	case '{', '}':
		return "a brace expansion or group"
	case '~':
		return "a tilde expansion"
	case '#':
		return "a comment"
	case '!':
		return "a negation or history expansion"
	case '(', ')':
		return "a subshell or function"
	case '\\':
		return "an escape"
	case '\'', '"':
		return "a quote (quoting is not accepted)"
	}
	if c >= 0x80 {
		return "not ASCII"
	}
	return "a control character"
}

// Words splits command into its words if it is a plain command: one or
// more words of plain characters (letters, digits and - _ . / : , + @ % =)
// separated by spaces or tabs, with no "=" in the first word (there it
// would be a variable assignment, and the program would be the next word)
// nor at the start of any word (zsh expands "=name" to a path).
// A shell splits such a line into exactly these words and expands none of
// them. Anything else is refused with an error wrapping ErrNotPlain that
// names the first offending byte.
func Words(command string) ([]string, error) {
	var words []string
	start := -1
	for i := 0; i <= len(command); i++ {
		if i == len(command) || blank(command[i]) {
			if start >= 0 {
				words = append(words, command[start:i])
				start = -1
			}
			continue
		}
		c := command[i]
		if !plainByte(c) {
			return nil, fmt.Errorf("%w: %q at byte %d is %s", ErrNotPlain, string([]byte{c}), i, special(c))
		}
		if c == '=' && len(words) == 0 {
			return nil, fmt.Errorf("%w: \"=\" at byte %d is in the first word, which makes it a variable assignment", ErrNotPlain, i)
		}
		if c == '=' && start < 0 {
			return nil, fmt.Errorf("%w: \"=\" at byte %d starts a word, which zsh expands to a program's path", ErrNotPlain, i)
		}
		if start < 0 {
			start = i
		}
	}
	if len(words) == 0 {
		return nil, fmt.Errorf("%w: it has no words", ErrNotPlain)
	}
	return words, nil
}

// patternWords splits a commands pattern into its words.
func patternWords(pattern string) []string {
	return strings.FieldsFunc(pattern, func(r rune) bool { return r == ' ' || r == '\t' })
}

// anyWords is the pattern word that, last, matches any further words.
const anyWords = "**"

// matchAllow reports whether a command's words match pattern words one to
// one, each with Glob (so "*" stays within a word), the last pattern word
// "**" matching zero or more further words.
func matchAllow(pattern, words []string) bool {
	for i, p := range pattern {
		if p == anyWords && i == len(pattern)-1 {
			return true
		}
		if i >= len(words) || !Glob(p, words[i]) {
			return false
		}
	}
	return len(pattern) == len(words)
}

// matchDeny reports whether pattern matches words starting at any word,
// with any words after it: `rm *` matches "rm -rf /", "command rm -rf /"
// and "env X=1 rm -rf /". The pattern's first word is also compared by base
// name, so it matches "/bin/rm" and "./rm". An empty pattern matches.
func matchDeny(pattern, words []string) bool {
	if len(pattern) == 0 {
		return true
	}
	for start, w := range words {
		if !Glob(pattern[0], w) && !Glob(baseName(pattern[0]), baseName(w)) {
			continue
		}
		rest, tail := pattern[1:], words[start+1:]
		ok := true
		for i, p := range rest {
			if p == anyWords && i == len(rest)-1 {
				break
			}
			if i >= len(tail) || !Glob(p, tail[i]) {
				ok = false
				break
			}
		}
		if ok {
			return true
		}
	}
	return false
}

func baseName(word string) string {
	return word[strings.LastIndexByte(word, '/')+1:]
}

// checkPattern reports why a commands pattern could never match, or is
// malformed: it is empty, a word has a character no plain word has, "="
// is in its first word or starts a word, or "**" is not its last word.
func checkPattern(pattern string) error {
	words := patternWords(pattern)
	if len(words) == 0 {
		return errors.New("an empty pattern")
	}
	for i, w := range words {
		if w == anyWords && i != len(words)-1 {
			return fmt.Errorf("%q is only a pattern word at the end", anyWords)
		}
		for j := 0; j < len(w); j++ {
			c := w[j]
			switch {
			case c == '*' || c == '?':
			case !plainByte(c):
				return fmt.Errorf("%q can never match: a plain command has no %q (%s)", w, string([]byte{c}), special(c))
			case c == '=' && i == 0:
				return fmt.Errorf("%q can never match: a plain command has no \"=\" in its first word", w)
			case c == '=' && j == 0:
				return fmt.Errorf("%q can never match: no word of a plain command starts with \"=\"", w)
			}
		}
	}
	return nil
}

// SCPCommand is the far side of a legacy scp transfer (scp -O, or scp's
// fallback when the VM has no sftp), in one of the forms OpenSSH's scp
// sends: `scp [-v] [-r] [-p] [-d] -t|-f [--] PATH`.
type SCPCommand struct {
	Download bool   // -f: the VM sends files; otherwise -t, the VM receives them
	Path     string // the one path word
}

// scpOptions are the options scp may be given on the far side, besides
// -t and -f: OpenSSH 9.2 sends -v, -r, -p and -d; -q is accepted too, as
// it only quiets a progress meter scp never shows in this mode.
const scpOptions = "vrpdq"

// ParseSCP reports whether command is exactly a legacy scp's far side: the
// program "scp" (no path, no other name), options from -v -r -p -d -q,
// alone or combined, exactly one -t or -f, an optional "--", and exactly
// one plain path word. The whole command must be plain (see Words).
func ParseSCP(command string) (SCPCommand, bool) {
	words, err := Words(command)
	if err != nil || words[0] != "scp" {
		return SCPCommand{}, false
	}
	var c SCPCommand
	modes := 0
	i := 1
	for ; i < len(words); i++ {
		w := words[i]
		if w == "--" || len(w) < 2 || w[0] != '-' {
			break
		}
		for j := 1; j < len(w); j++ {
			switch {
			case w[j] == 't':
				modes++
			case w[j] == 'f':
				modes++
				c.Download = true
			case strings.IndexByte(scpOptions, w[j]) < 0:
				return SCPCommand{}, false
			}
		}
	}
	if modes != 1 {
		return SCPCommand{}, false
	}
	if i < len(words) && words[i] == "--" {
		i++
	}
	if i != len(words)-1 {
		return SCPCommand{}, false
	}
	c.Path = words[i]
	return c, true
}

// CommandKind classifies an exec request's command: SCP if it is one of
// legacy scp's forms (ParseSCP), otherwise Exec. Anything else that
// starts with scp is an ordinary command and needs an exec rule.
func CommandKind(command string) Channel {
	if _, ok := ParseSCP(command); ok {
		return SCP
	}
	return Exec
}

// scpDownload reports whether command is legacy scp sending files from the
// VM (scp -f), which scp-read allows.
func scpDownload(command string) bool {
	c, ok := ParseSCP(command)
	return ok && c.Download
}

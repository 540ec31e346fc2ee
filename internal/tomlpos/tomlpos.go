// Package tomlpos gives TOML errors a place: "file:line: key: problem". The
// TOML library reports lines for syntax and type errors but not for keys it
// did not decode, nor for values that decode but fail validation; this
// package finds those lines in the text.
package tomlpos

import (
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/BurntSushi/toml"
)

var libraryMessage = regexp.MustCompile(`^toml: line (\d+) \(last key "([^"]*)"\): (.*)$`)

// Error rewrites an error of the TOML library as "name:line: key: problem".
func Error(name string, err error) error {
	var pe toml.ParseError
	if errors.As(err, &pe) {
		if pe.LastKey != "" {
			return fmt.Errorf("%s:%d: %s: %s", name, pe.Position.Line, pe.LastKey, pe.Message)
		}
		return fmt.Errorf("%s:%d: %s", name, pe.Position.Line, pe.Message)
	}
	if m := libraryMessage.FindStringSubmatch(err.Error()); m != nil {
		return fmt.Errorf("%s:%s: %s: %s", name, m[1], m[2], m[3])
	}
	return fmt.Errorf("%s: %w", name, err)
}

// Undecoded reports the keys md did not decode, each with its line. Keys
// under a top-level table for which mine returns false are left to another
// decoder; a nil mine claims every key.
func Undecoded(name string, data []byte, md toml.MetaData, mine func(table string) bool) error {
	var msgs []string
	for _, k := range md.Undecoded() {
		if mine != nil && !mine(k[0]) {
			continue
		}
		msgs = append(msgs, fmt.Sprintf("%s:%d: unknown key %s", name, KeyLine(data, k.String()), k))
	}
	if len(msgs) == 0 {
		return nil
	}
	return errors.New(strings.Join(msgs, "\n"))
}

var (
	tableHeader = regexp.MustCompile(`^\s*\[(\[?)\s*([^\]]+?)\s*\]\]?`)
	keyAssign   = regexp.MustCompile(`^\s*([A-Za-z0-9_.\-"' ]+?)\s*=`)
)

// KeyLine finds the first line that sets key (dotted, as the TOML library
// prints it), or the table header that opens it. It returns 0 when the key
// cannot be placed.
func KeyLine(data []byte, key string) int {
	table := ""
	for i, line := range strings.Split(string(data), "\n") {
		if m := tableHeader.FindStringSubmatch(line); m != nil {
			table = normalize(m[2])
			if table == key {
				return i + 1
			}
			continue
		}
		if m := keyAssign.FindStringSubmatch(line); m != nil {
			full := normalize(m[1])
			if table != "" {
				full = table + "." + full
			}
			if full == key || strings.HasPrefix(key, full+".") {
				return i + 1
			}
		}
	}
	return 0
}

// TableLine finds the header of the index-th (from 0) [[table]] in data,
// or 0.
func TableLine(data []byte, table string, index int) int {
	seen := 0
	for i, line := range strings.Split(string(data), "\n") {
		if m := tableHeader.FindStringSubmatch(line); m != nil && m[1] == "[" && normalize(m[2]) == table {
			if seen == index {
				return i + 1
			}
			seen++
		}
	}
	return 0
}

func normalize(k string) string {
	parts := strings.Split(k, ".")
	for i, p := range parts {
		parts[i] = strings.Trim(strings.TrimSpace(p), `"'`)
	}
	return strings.Join(parts, ".")
}

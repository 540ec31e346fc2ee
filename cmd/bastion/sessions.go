package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/bastionvm/bastion/bastion/audit"
	"github.com/bastionvm/bastion/bastion/record"
)

// sessionFilter is what `bastion sessions ls` selects by.
type sessionFilter struct {
	account, vm  string
	since, until string
	speed        float64
	idle         time.Duration
}

func (q *sessionFilter) flags(fs *flag.FlagSet, cmd string) {
	switch cmd {
	case "sessions ls":
		fs.StringVar(&q.account, "account", "", "only this account's sessions")
		fs.StringVar(&q.vm, "vm", "", "only sessions on this VM")
		fs.StringVar(&q.since, "since", "", "only sessions started at or after this time (RFC 3339, or a duration ago: 24h)")
		fs.StringVar(&q.until, "until", "", "only sessions started before this time (RFC 3339, or a duration ago)")
	case "sessions play":
		fs.Float64Var(&q.speed, "speed", 1, "play this many times faster")
		fs.DurationVar(&q.idle, "idle-limit", 0, "pause at most this long between outputs (0: as recorded)")
	}
}

// sessionRow is one session channel as the audit trail tells it.
type sessionRow struct {
	id                     string // session-channel, as recordings are named
	account, vm, login     string
	start                  time.Time
	end                    time.Time // zero while it runs
	kind, command          string
	recording, sha256      string
	capped, ended, started bool
	exit                   string
}

// readSessions reads the session channels of the audit trail at path, in
// the order they started. Lines that are not events (a torn line after a
// full disk) are passed over.
func readSessions(path string) ([]*sessionRow, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("the audit trail: %w", err)
	}
	defer f.Close()
	byID := make(map[string]*sessionRow)
	var rows []*sessionRow
	s := bufio.NewScanner(f)
	s.Buffer(nil, 1<<20)
	for s.Scan() {
		var e audit.Event
		if json.Unmarshal(s.Bytes(), &e) != nil || e.Activity == nil || e.Session == "" {
			continue
		}
		if e.Type != audit.SessionStart && e.Type != audit.SessionEnd {
			continue
		}
		id := fmt.Sprintf("%s-%d", e.Session, e.ChannelID)
		r := byID[id]
		if r == nil {
			r = &sessionRow{id: id, account: e.Account, vm: e.VM, login: e.Login, kind: e.Kind, command: e.Command, start: e.Time}
			byID[id] = r
			rows = append(rows, r)
		}
		switch e.Type {
		case audit.SessionStart:
			r.started, r.start = true, e.Time
		case audit.SessionEnd:
			r.ended, r.end = true, e.Time
			if !r.started && e.Seconds > 0 {
				r.start = e.Time.Add(-time.Duration(e.Seconds * float64(time.Second)))
			}
			r.recording, r.sha256, r.capped = e.Recording, e.RecordingSHA256, e.RecordingCapped
			switch {
			case e.ExitStatus != nil:
				r.exit = fmt.Sprint(*e.ExitStatus)
			case e.ExitSignal != "":
				r.exit = "signal " + e.ExitSignal
			}
		}
	}
	if err := s.Err(); err != nil {
		return nil, fmt.Errorf("the audit trail: %w", err)
	}
	slices.SortStableFunc(rows, func(a, b *sessionRow) int { return a.start.Compare(b.start) })
	return rows, nil
}

// auditFile is the configuration's audit trail, if it is a file.
func auditFile(c *Config) (string, error) {
	switch c.Server.Audit {
	case "", "stdout", "off":
		return "", fmt.Errorf("server.audit is %q: sessions are listed from an audit file (set server.audit to a path)", c.Server.Audit)
	}
	return c.Server.Audit, nil
}

// when reads a time flag: RFC 3339, or a duration before now.
func when(flagName, v string, now time.Time) (time.Time, error) {
	if v == "" {
		return time.Time{}, nil
	}
	if d, err := time.ParseDuration(v); err == nil {
		return now.Add(-d), nil
	}
	t, err := time.Parse(time.RFC3339, v)
	if err != nil {
		return time.Time{}, fmt.Errorf("--%s: %q is neither an RFC 3339 time nor a duration like 24h", flagName, v)
	}
	return t, nil
}

// sessionsLs prints the session channels the filter selects.
func sessionsLs(configPath string, q sessionFilter, stdout io.Writer) error {
	c, err := LoadConfig(configPath)
	if err != nil {
		return err
	}
	path, err := auditFile(c)
	if err != nil {
		return err
	}
	now := time.Now()
	since, err := when("since", q.since, now)
	if err != nil {
		return err
	}
	until, err := when("until", q.until, now)
	if err != nil {
		return err
	}
	rows, err := readSessions(path)
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tACCOUNT\tVM\tLOGIN\tSTART\tDURATION\tKIND\tEXIT\tRECORDED\tCOMMAND")
	for _, r := range rows {
		if q.account != "" && r.account != q.account || q.vm != "" && r.vm != q.vm ||
			!since.IsZero() && r.start.Before(since) || !until.IsZero() && !r.start.Before(until) {
			continue
		}
		duration := "running"
		if r.ended {
			duration = r.end.Sub(r.start).Round(time.Second).String()
		}
		recorded := "no"
		switch {
		case r.recording != "" && r.capped:
			recorded = "capped"
		case r.recording != "":
			recorded = "yes"
		case !r.ended && c.Server.Recordings != "":
			if _, err := os.Stat(filepath.Join(c.Server.Recordings, r.id+record.Ext)); err == nil {
				recorded = "recording"
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.id, dash(r.account), dash(r.vm), dash(r.login),
			r.start.Local().Format("2006-01-02 15:04:05"), duration, dash(r.kind), dash(r.exit), recorded, quoteCommand(r.command))
	}
	return tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// quoteCommand shows a command line on one line of a table: control
// characters escaped, long ones cut.
func quoteCommand(s string) string {
	if s == "" {
		return "-"
	}
	q := strings.Trim(fmt.Sprintf("%q", s), `"`)
	if len(q) > 80 {
		q = q[:77] + "..."
	}
	return q
}

// sessionsPlay plays the recording id to stdout, after checking it against
// the SHA-256 the audit trail gives for it, when there is one.
func sessionsPlay(configPath, id string, q sessionFilter, stdout io.Writer) error {
	c, err := LoadConfig(configPath)
	if err != nil {
		return err
	}
	if c.Server.Recordings == "" {
		return errors.New("server.recordings is not set: there are no recordings")
	}
	if !record.ValidID(id) {
		return fmt.Errorf("%q is not a session id (bastion sessions ls lists them)", id)
	}
	path := filepath.Join(c.Server.Recordings, id+record.Ext)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("session %s has no recording in %s", id, c.Server.Recordings)
	}
	if err != nil {
		return err
	}
	if trail, err := auditFile(c); err == nil {
		rows, err := readSessions(trail)
		if err != nil {
			return err
		}
		for _, r := range rows {
			if r.id == id && r.sha256 != "" {
				if sum := sha256.Sum256(data); hex.EncodeToString(sum[:]) != r.sha256 {
					return fmt.Errorf("the recording %s is not the one the audit trail sealed (sha256 %x, the trail says %s)", path, sum, r.sha256)
				}
			}
		}
	}
	return record.Play(stdout, strings.NewReader(string(data)), q.speed, q.idle)
}

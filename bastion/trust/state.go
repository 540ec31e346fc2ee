package trust

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/bastionvm/bastion/internal/atomicfile"
)

// StateFile is the name of the state file in the state directory: the
// trusts a serving bastion holds, for `bastion trust ls` and `vm ls`. It
// holds no secret, and is replaced whole on every change.
const StateFile = "trust.json"

// Record is one trust as the state file keeps it.
type Record struct {
	VM          string    `json:"vm"`
	UUID        string    `json:"uuid"`
	Hypervisor  string    `json:"hypervisor"`
	Login       string    `json:"login"`
	Addr        string    `json:"addr"`
	HostKey     string    `json:"host_key"`
	Modes       []string  `json:"modes"`
	Established time.Time `json:"established"`
	Expires     time.Time `json:"expires"`
}

// writeState replaces the state file with trusts, when there is a state
// directory. m.stateMu must be held.
func (m *Manager) writeState(trusts []Trust) error {
	if m.StateDir == "" {
		return nil
	}
	records := make([]Record, 0, len(trusts))
	for _, t := range trusts {
		var modes []string
		for _, mode := range t.Modes {
			modes = append(modes, string(mode))
		}
		records = append(records, Record{VM: t.Domain.Name, UUID: t.Domain.UUID, Hypervisor: t.Domain.URI, Login: t.Login,
			Addr: t.Addr, HostKey: t.Fingerprint(), Modes: modes, Established: t.Established.UTC(), Expires: t.Expires.UTC()})
	}
	data, err := json.MarshalIndent(records, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(m.StateDir, StateFile), append(data, '\n'), 0o600)
}

// ReadState reads the state file in dir; none is no trusts.
func ReadState(dir string) ([]Record, error) {
	path := filepath.Join(dir, StateFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var records []Record
	if err := json.Unmarshal(data, &records); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return records, nil
}

// List prints records as the table of `bastion trust ls`.
func List(out io.Writer, records []Record, now time.Time) error {
	if len(records) == 0 {
		fmt.Fprintln(out, "no trusts (the bastion has not verified any VM yet)")
		return nil
	}
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "VM\tLOGIN\tSTATE\tEXPIRES\tADDRESS\tHOST KEY\tMODES")
	for _, r := range records {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s (%s)\t%s\t%s\t%v\n", r.VM, r.Login, r.state(now), r.Expires.Format(time.RFC3339),
			until(r.Expires, now), r.Addr, r.HostKey, r.Modes)
	}
	return w.Flush()
}

// Summary is what `vm ls` shows of the trusts in dir with the VM whose
// UUID is uuid: "root trusted until 15:04:05Z", or "-" for none.
func Summary(dir, uuid string, now time.Time) string {
	records, _ := ReadState(dir)
	summary := "-"
	for _, r := range records {
		if r.UUID == uuid {
			summary = fmt.Sprintf("%s %s until %s", r.Login, r.state(now), r.Expires.Format("15:04:05Z"))
		}
	}
	return summary
}

func (r Record) state(now time.Time) string {
	if now.After(r.Expires) {
		return "expired"
	}
	return "trusted"
}

func until(t, now time.Time) string {
	d := t.Sub(now).Round(time.Second)
	if d < 0 {
		return (-d).String() + " ago"
	}
	return "in " + d.String()
}

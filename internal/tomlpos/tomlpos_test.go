package tomlpos

import "testing"

func TestLines(t *testing.T) {
	data := []byte(`[server]
listen = "x"

[[rule]]
name = "a"

[[rule]]
name = "b"
time = { zone = "UTC" }
"quoted key" = 1
`)
	for key, want := range map[string]int{"server": 1, "server.listen": 2, "rule": 4, "rule.time.zone": 9, "rule.quoted key": 10, "nowhere": 0} {
		if got := KeyLine(data, key); got != want {
			t.Errorf("KeyLine(%q) = %d, want %d", key, got, want)
		}
	}
	if got := TableLine(data, "rule", 1); got != 7 {
		t.Errorf("TableLine(rule, 1) = %d, want 7", got)
	}
	if got := TableLine(data, "rule", 2); got != 0 {
		t.Errorf("TableLine(rule, 2) = %d, want 0", got)
	}
}

// Package layering holds a test of the module's import graph: the rules of
// docs/design.md's package table, checked on every run so that a package
// that starts leaning on one above it fails CI instead of a review.
package layering

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/bastionvm/bastion/"

// allowed lists, for every product package, the module packages it may
// import (not counting tests). A package missing here is a failure too, so
// a new one gets a row.
var allowed = map[string][]string{
	"vm":                  {},
	"bastion/audit":       {},
	"bastion/record":      {},
	"internal/atomicfile": {},
	"internal/tomlpos":    {},
	"keys":                {"internal/atomicfile"},
	"policy":              {"vm", "internal/tomlpos"},
	"hypervisor":          {"vm"},
	"bastion/trust":       {"vm", "keys", "bastion/audit", "internal/atomicfile"},
	"bastion/dispense":    {"vm", "bastion/audit"},
	"bastion/metrics":     {"bastion/audit"},
	"bastion":             {"vm", "keys", "policy", "bastion/audit", "bastion/record"},
	"cmd/bastion":         {"*"},

	// Test helpers and tooling.
	"internal/testenv":    {},
	"bastion/bastiontest": {"vm", "keys"},
	"bench":               {"*"},
	"bench/soak":          {"*"},
	"vmtest":              {"*"},
}

// helpers are imported by tests and tooling only.
var helpers = []string{"internal/testenv", "bastion/bastiontest"}

func TestImports(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}} {{join .Imports " "}}`, module+"...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		fields := strings.Fields(line)
		pkg, ok := strings.CutPrefix(fields[0], module)
		if !ok || pkg == "internal/layering" {
			continue
		}
		may, known := allowed[pkg]
		if !known {
			t.Errorf("%s is not in the package table: add it to allowed (and to docs/design.md)", pkg)
			continue
		}
		for _, imp := range fields[1:] {
			dep, ok := strings.CutPrefix(imp, module)
			if !ok {
				continue
			}
			if slices.Contains(helpers, dep) && !slices.Contains([]string{"bench", "bench/soak", "vmtest"}, pkg) {
				t.Errorf("%s imports the test helper %s", pkg, dep)
			}
			if !slices.Contains(may, "*") && !slices.Contains(may, dep) {
				t.Errorf("%s imports %s, which it may not (it may import %v)", pkg, dep, may)
			}
		}
	}
}

// TestOnlyHypervisorUsesLibvirt: libvirt (cgo) stays in one package.
func TestOnlyHypervisorUsesLibvirt(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}} {{join .Imports " "}}`, module+"...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		fields := strings.Fields(line)
		if slices.Contains(fields[1:], "libvirt.org/go/libvirt") && fields[0] != module+"hypervisor" {
			t.Errorf("%s imports libvirt; only hypervisor may", fields[0])
		}
	}
}

package vmtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// templates for the dispense tests: the test bed's image, and one whose
// image is missing.
func templates() string {
	return fmt.Sprintf(`
[[template]]
name = "debian"
image = "%[1]s/base.qcow2"
kernel = "%[1]s/vmlinuz"
initrd = "%[1]s/initrd.img"
cmdline = "root=/dev/vda rw console=ttyS0 net.ifnames=0"
pool = "bastion-test"
disk_size = "2GiB"
memory_mib = 256
network = "bastion-test"
logins = ["root"]
labels = { team = "dispensed" }
wait = "4m"

[[template]]
name = "huge"
image = "%[1]s/base.qcow2"
pool = "bastion-test"
min_free = "1000TiB"
network = "bastion-test"
logins = ["root"]

[[template]]
name = "silent"
image = "%[1]s/base.qcow2"
kernel = "%[1]s/vmlinuz"
initrd = "%[1]s/initrd.img"
cmdline = "root=/dev/vda rw console=ttyS0 init=/bin/sleep 3600"
pool = "bastion-test"
disk_size = "2GiB"
memory_mib = 256
network = "bastion-test"
logins = ["root"]
wait = "15s"

[[template]]
name = "missing"
image = "/nonexistent/base.qcow2"
pool = "bastion-test"
network = "bastion-test"
logins = ["root"]
`, imageDir)
}

const dispenseRule = `
[[rule]]
name = "dispense-bt"
groups = ["dev"]
vms = ["bt-*"]
channels = ["dispense", "destroy"]
`

// vmCLI runs `bastion vm args...` with b's configuration.
func (b *bastionProc) vmCLI(args ...string) (string, error) {
	out, err := exec.Command(binary, append([]string{"vm", "--config", b.config}, args...)...).CombinedOutput()
	return string(out), err
}

func overlay(name string) string {
	out, _ := exec.Command(filepath.Join(repo, "testbed", "pool.sh"), "path").Output()
	return filepath.Join(strings.TrimSpace(string(out)), name+".qcow2")
}

func domainExists(name string) bool {
	return exec.Command("virsh", "-q", "-c", "qemu:///system", "dominfo", name).Run() == nil
}

// TestDispense dispenses over SSH, reaches the new VM at once with ssh -J
// and sftp, lists it, destroys it, and finds nothing left.
func TestDispense(t *testing.T) {
	const vm = "bt-disp1"
	t.Cleanup(func() {
		exec.Command(filepath.Join(repo, "testbed", "guest.sh"), "down", vm).Run()
		exec.Command("virsh", "-c", "qemu:///system", "vol-delete", "--pool", "bastion-test", vm+".qcow2").Run()
	})

	// Without the right: refused before anything is made.
	plain := startBastion(t, templates())
	res := plain.client.Run(nil, "ssh", "bastion", "vm", "dispense", "--template", "debian", vm)
	if res.Exit != 1 || !strings.Contains(string(res.Stdout), "dispense "+vm+": denied by policy") || domainExists(vm) {
		t.Fatalf("dispense without the right: %v %q", res, res.Stdout)
	}

	b := startBastion(t, templates()+dispenseRule)
	res = b.client.Run(nil, "ssh", "bastion", "vm", "dispense", "--template", "debian", vm)
	out := string(res.Stdout)
	if res.Exit != 0 || !strings.Contains(out, "waiting for the guest agent...") || !strings.Contains(out, "waiting for the trust for root...") || !strings.Contains(out, "ready in") ||
		!strings.Contains(out, "ssh -J me@127.0.0.1:") || !strings.Contains(out, "root@"+vm) {
		t.Fatalf("dispense over SSH: %v\n%q", res, out)
	}
	t.Logf("dispense over SSH:\n%s", out)
	// Trusted at once: the serving bastion holds the trust already.
	if ls := b.trustLs(); !strings.Contains(ls, vm+"  root   trusted") {
		t.Fatalf("trust ls right after dispense:\n%s", ls)
	}
	if r := b.ssh(nil, "root@"+vm, "grep -q bookworm /etc/os-release && cat /sys/class/dmi/id/product_uuid"); r.Exit != 0 || len(r.Stdout) < 36 {
		t.Fatalf("ssh -J to the new VM: %v %q", r, r.Stdout)
	}
	// It answers to its own name, not its image's (bt-guest).
	if r := b.ssh(nil, "root@"+vm, "hostname; cat /etc/hostname; getent hosts "+vm+" | awk '{print $1}'; stat -c %a /etc/hosts"); r.Exit != 0 ||
		string(r.Stdout) != vm+"\n"+vm+"\n127.0.1.1\n644\n" {
		t.Fatalf("the new VM's host name: %v %q", r, r.Stdout)
	}
	// The audit says how long each stage took.
	var stages []string
	if ev := b.auditEvents("dispensed"); len(ev) == 1 {
		list, _ := ev[0]["stages"].([]any)
		for _, st := range list {
			m, _ := st.(map[string]any)
			if d, ok := m["duration"].(float64); ok && d >= 0 {
				stages = append(stages, fmt.Sprint(m["stage"]))
			}
		}
	}
	if got := strings.Join(stages, ","); got != "overlay,start,agent,hostname,address,trust root" {
		t.Fatalf("dispensed event stages %q", got)
	}
	local := t.TempDir()
	batch := filepath.Join(local, "batch")
	write(t, batch, "put "+batch+" /root/uploaded\nget /root/uploaded "+local+"/back\n")
	if r := b.client.Run(nil, "sftp", "-J", "bastion", "-b", batch, "root@"+vm); r.Exit != 0 {
		t.Fatalf("sftp to the new VM: %v", r)
	}
	if got, _ := os.ReadFile(local + "/back"); len(got) == 0 {
		t.Fatal("sftp round trip lost the file")
	}

	ls, err := b.vmCLI("ls")
	if err != nil || !strings.Contains(ls, vm) || !strings.Contains(ls, "dispensed-by=me") || !strings.Contains(ls, "team=dispensed") {
		t.Fatalf("vm ls: %v\n%s", err, ls)
	}
	if out, err := b.vmCLI("destroy", vm); err != nil {
		t.Fatalf("vm destroy: %v\n%s", err, out)
	}
	if domainExists(vm) {
		t.Fatal("the domain is still defined")
	}
	if _, err := os.Stat(overlay(vm)); err == nil {
		t.Fatal("the overlay is still there")
	}
	waitTrustGone(t, b, vm)
}

func waitTrustGone(t *testing.T, b *bastionProc, vm string) {
	t.Helper()
	for i := 0; i < 100 && strings.Contains(b.trustLs(), vm); i++ {
		exec.Command("sleep", "0.1").Run()
	}
	if strings.Contains(b.trustLs(), vm) {
		t.Fatalf("trust for %s survived its destruction:\n%s", vm, b.trustLs())
	}
}

// TestDispenseFailures: each failure is a clear message and leaves no
// domain and no overlay behind.
func TestDispenseFailures(t *testing.T) {
	b := startBastion(t, templates()+dispenseRule)
	for _, tc := range []struct {
		args []string
		want string
		vm   string
	}{
		{[]string{"dispense", "--template", "nosuch", "bt-disp2"}, `no such template: "nosuch" (templates: debian, huge, missing, silent)`, "bt-disp2"},
		{[]string{"dispense", "--template", "huge", "bt-disp4"}, "not enough free space in the storage pool", "bt-disp4"},
		{[]string{"dispense", "--template", "silent", "bt-disp5"}, "the VM did not become ready in time: guest agent", "bt-disp5"},
		{[]string{"dispense", "--template", "debian", web1}, "a VM of that name exists: " + web1, ""},
		{[]string{"dispense", "--template", "missing", "bt-disp3"}, "base image missing", "bt-disp3"},
		{[]string{"dispense", "--template", "debian", "Bad_Name"}, "not a valid VM name", ""},
		{[]string{"destroy", web1}, "the bastion did not dispense this VM (use --force)", ""},
	} {
		out, err := b.vmCLI(tc.args...)
		if err == nil || !strings.Contains(out, tc.want) {
			t.Errorf("vm %v: %v\n%s\nwant %q", tc.args, err, out, tc.want)
		}
		if tc.vm != "" && (domainExists(tc.vm) || fileExists(overlay(tc.vm))) {
			t.Errorf("vm %v left %s behind", tc.args, tc.vm)
		}
	}
	if !domainExists(web1) {
		t.Fatal("a refused destroy removed web1")
	}
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

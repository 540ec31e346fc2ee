// Package vmtest is the real-guest suite: the bastion binary, libvirt and
// QEMU guests booted by the project's test bed, and OpenSSH clients. It
// runs when BASTION_VMTEST=1 (make test sets it); a component that cannot
// start fails the run and says why.
package vmtest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Guests booted for the suite. web1 serves the client matrix and the
// impostor case; agent is the one whose agent and keys the spoofing cases
// break and mend.
const (
	web1  = "bt-web1"
	agent = "bt-agent"
)

type guest struct {
	Name string `json:"name"`
	UUID string `json:"uuid"`
	IP   string `json:"ip"`
	MAC  string `json:"mac"`
}

var (
	repo     string           // the repository's top directory
	binary   string           // the bastion binary under test
	guests   map[string]guest // by name
	started  time.Time
	imageDir string // the test bed's cached guest image, kernel and initrd
)

func TestMain(m *testing.M) {
	if os.Getenv("BASTION_VMTEST") != "1" {
		fmt.Println("vmtest: the real-guest suite runs with BASTION_VMTEST=1 (make test sets it); not run")
		os.Exit(0)
	}
	started = time.Now()
	if err := setup(); err != nil {
		fmt.Fprintln(os.Stderr, "vmtest: setup failed:", err)
		os.Exit(1)
	}
	code := m.Run()
	if os.Getenv("BASTION_VMTEST_KEEP") != "1" {
		if out, err := script("guest.sh", "down", web1, agent); err != nil {
			fmt.Fprintf(os.Stderr, "vmtest: teardown: %v\n%s", err, out)
		}
		if out, err := script("pool.sh", "down"); err != nil {
			fmt.Fprintf(os.Stderr, "vmtest: teardown: %v\n%s", err, out)
		}
	}
	fmt.Printf("vmtest: the real-guest suite took %v\n", time.Since(started).Round(time.Second))
	os.Exit(code)
}

func setup() error {
	_, file, _, _ := runtime.Caller(0)
	repo = filepath.Dir(filepath.Dir(file))
	if out, err := script("install-host.sh"); err != nil {
		return fmt.Errorf("install-host.sh: %v\n%s", err, out)
	}
	state := os.Getenv("BASTION_TESTBED_STATE")
	if state == "" {
		state = "/var/lib/bastion-testbed"
	}
	if err := lockRun(state); err != nil {
		return err
	}
	if err := clearLeftovers(); err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "vmtest-bin")
	if err != nil {
		return err
	}
	binary = filepath.Join(dir, "bastion")
	gobuild := exec.Command("go", "build", "-o", binary, "./cmd/bastion")
	gobuild.Dir = repo
	if out, err := gobuild.CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %v\n%s", err, out)
	}
	if out, err := script("pool.sh", "up"); err != nil {
		return fmt.Errorf("pool.sh up: %v\n%s", err, out)
	}
	// build-image.sh prints the image's directory on stdout, building it
	// first if need be.
	build := exec.Command(filepath.Join(repo, "testbed", "build-image.sh"))
	build.Stderr = os.Stderr
	imageOut, err := build.Output()
	if err != nil {
		return fmt.Errorf("build-image.sh: %v", err)
	}
	imageDir = strings.TrimSpace(string(imageOut))
	boot := time.Now()
	if out, err := script("guest.sh", "up", web1, agent); err != nil {
		return fmt.Errorf("guest.sh up: %v\n%s", err, out)
	}
	fmt.Printf("vmtest: guests ready in %v\n", time.Since(boot).Round(time.Second))
	data, err := os.ReadFile(filepath.Join(state, "guests.json"))
	if err != nil {
		return err
	}
	var list []guest
	if err := json.Unmarshal(data, &list); err != nil {
		return fmt.Errorf("guests.json: %w", err)
	}
	guests = make(map[string]guest)
	for _, g := range list {
		guests[g.Name] = g
	}
	for _, name := range []string{web1, agent} {
		if _, ok := guests[name]; !ok {
			return fmt.Errorf("guests.json lists no %s", name)
		}
	}
	return nil
}

// lockRun makes this run of the suite the only one on the machine: two runs
// share the guests, the pool and the names of dispensed VMs, and would break
// each other's tests. A second run waits, and says for whom. The lock is the
// process's until it exits.
func lockRun(state string) error {
	if err := os.MkdirAll(state, 0o755); err != nil {
		return err
	}
	name := filepath.Join(state, "vmtest.lock")
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(lockWait)
	for told := false; ; told = true {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		holder, _ := os.ReadFile(name)
		switch {
		case err != syscall.EWOULDBLOCK:
			return fmt.Errorf("lock %s: %w", name, err)
		case time.Now().After(deadline):
			return fmt.Errorf("another run of the suite has held %s for over %v (%s)", name, lockWait, strings.TrimSpace(string(holder)))
		case !told:
			fmt.Printf("vmtest: another run of the suite holds %s (%s); waiting for it\n", name, strings.TrimSpace(string(holder)))
		}
		time.Sleep(time.Second)
	}
	f.Truncate(0)
	fmt.Fprintf(f, "pid %d, since %s\n", os.Getpid(), time.Now().UTC().Format(time.RFC3339))
	lockFile = f // kept open, so kept locked
	return nil
}

var lockFile *os.File

// lockWait bounds the wait for another run: a whole run of the suite takes
// about 25 minutes.
const lockWait = 30 * time.Minute

// clearLeftovers removes what an earlier run that died left behind: VMs it
// dispensed and the volumes in the pool. The suite's own guests stay, to be
// reused.
func clearLeftovers() error {
	out, err := exec.Command("virsh", "-q", "-c", "qemu:///system", "list", "--all", "--name").Output()
	if err != nil {
		return fmt.Errorf("virsh list: %v", err)
	}
	var stale []string
	for _, name := range strings.Fields(string(out)) {
		if strings.HasPrefix(name, "bt-") && name != web1 && name != agent {
			stale = append(stale, name)
		}
	}
	if len(stale) > 0 {
		fmt.Printf("vmtest: removing VMs an earlier run left: %s\n", strings.Join(stale, " "))
		if out, err := script("guest.sh", append([]string{"down"}, stale...)...); err != nil {
			return fmt.Errorf("guest.sh down: %v\n%s", err, out)
		}
	}
	if out, err := script("pool.sh", "down"); err != nil {
		return fmt.Errorf("pool.sh down: %v\n%s", err, out)
	}
	return nil
}

// script runs a test bed script and returns its combined output.
func script(name string, args ...string) ([]byte, error) {
	cmd := exec.Command(filepath.Join(repo, "testbed", name), args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.Bytes(), err
}

// virsh runs virsh on qemu:///system and fails the test on error.
func virsh(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("virsh", append([]string{"-q", "-c", "qemu:///system"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("virsh %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

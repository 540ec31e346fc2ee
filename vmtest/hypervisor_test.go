package vmtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/bastionvm/bastion/hypervisor"
	"github.com/bastionvm/bastion/internal/testenv"
	"github.com/bastionvm/bastion/vm"
)

// TestHypervisor exercises the hypervisor package against a real guest.
func TestHypervisor(t *testing.T) {
	pool, err := hypervisor.Open([]string{"qemu:///system"}, hypervisor.Options{MaxRead: 4 << 20}) // files of several agent chunks
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	d, err := pool.Find(ctx, web1)
	if err != nil {
		t.Fatal(err)
	}
	byUUID, err := pool.Find(ctx, guests[web1].UUID)
	if err != nil || byUUID.Name != web1 || d.UUID != guests[web1].UUID || !d.Running {
		t.Fatalf("Find: %+v / %+v %v", d, byUUID, err)
	}
	if d.Labels["testbed"] != "true" {
		t.Errorf("labels from <metadata>: %v", d.Labels)
	}
	if _, err := pool.Find(ctx, "bt-nosuch"); !errors.Is(err, vm.ErrNoSuchVM) {
		t.Errorf("Find(bt-nosuch): %v", err)
	}
	if err := pool.Ping(ctx, d); err != nil {
		t.Fatal(err)
	}
	addr, err := pool.Address(ctx, d)
	if err != nil || addr.IP.String() != guests[web1].IP || addr.ConfirmedBy == "" {
		t.Fatalf("Address: %+v %v; want %s confirmed by the lease", addr, err, guests[web1].IP)
	}

	// Files larger than one agent chunk, and removal; and the cap on reads.
	data := make([]byte, 3<<20+17)
	rand.Read(data)
	path := "/root/hypervisor-test"
	if err := pool.WriteFile(ctx, d, path, data); err != nil {
		t.Fatal(err)
	}
	back, err := pool.ReadFile(ctx, d, path)
	if err != nil || !bytes.Equal(back, data) {
		t.Fatalf("ReadFile: %d bytes, equal %v, %v", len(back), bytes.Equal(back, data), err)
	}
	capped, err := hypervisor.Open([]string{"qemu:///system"}, hypervisor.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer capped.Close()
	if _, err := capped.ReadFile(ctx, d, path); err == nil || !strings.Contains(err.Error(), "is larger than 65536 bytes") {
		t.Fatalf("ReadFile of 3 MiB with the default cap: %v, want it refused", err)
	}
	if err := pool.RemoveFile(ctx, d, path); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.ReadFile(ctx, d, path); err == nil {
		t.Fatal("read a removed file")
	}
	if err := pool.Exec(ctx, d, "/bin/false"); !errors.Is(err, hypervisor.ErrExitStatus) {
		t.Fatalf("Exec(/bin/false): %v", err)
	}

	// Authorized keys through libvirt's API.
	signer, _ := testenv.NewKey(t)
	line := strings.TrimSpace(string(marshalAuthorized(signer.PublicKey()))) + " hypervisor-test"
	if err := pool.AddAuthorizedKey(ctx, d, "user", line); err != nil {
		t.Fatal(err)
	}
	keys, err := pool.AuthorizedKeys(ctx, d, "user")
	if err != nil || !contains(keys, line) {
		t.Fatalf("AuthorizedKeys: %v %v", keys, err)
	}
	if err := pool.RemoveAuthorizedKey(ctx, d, "user", line); err != nil {
		t.Fatal(err)
	}
	if keys, _ := pool.AuthorizedKeys(ctx, d, "user"); contains(keys, line) {
		t.Fatal("key still there after removal")
	}
	if err := pool.AddAuthorizedKey(ctx, d, "nosuchuser", line); !errors.Is(err, hypervisor.ErrNoSuchUser) {
		t.Fatalf("unknown user: %v", err)
	}

	// A deadline is honoured: an already expired context fails at once.
	expired, cancel2 := context.WithTimeout(context.Background(), time.Nanosecond)
	defer cancel2()
	time.Sleep(time.Millisecond)
	if err := pool.Ping(expired, d); err == nil {
		t.Fatal("Ping with an expired deadline succeeded")
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

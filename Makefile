# The two commands the README opens with are `make demo` and `make test`.
export PATH := /usr/local/go/bin:$(PATH)
GO ?= go

.PHONY: all build deps install test test-quick test-vm bench bench-go soak demo demo-stop fuzz clean

all: build

build:
	$(GO) build -o bin/bastion ./cmd/bastion

# The binary in $(PREFIX)/bin (/usr/local), /etc/bastion/bastion.toml from the
# example if there is none, /var/lib/bastion, the systemd unit and bash
# completion; a system user bastion in the libvirt group. DESTDIR stages.
install: build
	scripts/install.sh bin/bastion

# Host packages (OpenSSH, rsync, libvirt, QEMU, ...) and a running libvirtd.
deps:
	testbed/install-host.sh

# Everything: a tidy go.mod, vet, unit tests, the in-process suite against real OpenSSH,
# and the real-guest suite (boots two libvirt guests; builds the guest image
# once and caches it).
test: deps
	$(GO) mod tidy -diff
	$(GO) vet ./...
	BASTION_VMTEST=1 $(GO) test -count=1 -timeout 40m ./...

# The inner loop: everything but the real-guest suite.
test-quick:
	$(GO) vet ./...
	$(GO) test -count=1 ./...

# Only the real-guest suite; BASTION_VMTEST_KEEP=1 leaves the guests up
# for the next run.
test-vm: deps
	BASTION_VMTEST=1 $(GO) test -count=1 -v -timeout 40m ./vmtest

# Every fuzz target in the module, FUZZTIME each (default 30s).
fuzz:
	scripts/fuzz.sh

# The bastion side by side with an OpenSSH jump host on this machine;
# writes bench/results/results.md and chart.svg.
bench: deps
	$(GO) run ./bench -out bench/results

# 1,000 sessions through one bastion for 10 minutes, then idle: no session
# lost, descriptors, goroutines and heap back to their baseline; writes
# bench/results/soak.md. SOAK_SESSIONS and SOAK_DURATION change it.
soak:
	$(GO) run ./bench -rows soak -out bench/results -soak-sessions $(or $(SOAK_SESSIONS),1000) -soak-duration $(or $(SOAK_DURATION),10m)

# Go benchmarks of the data path and the policy, for the inner loop.
bench-go:
	$(GO) test -run '^$$' -bench . -benchtime 4x ./bastion ./policy

demo:
	scripts/demo.sh

demo-stop:
	scripts/demo.sh stop

clean:
	rm -rf bin .demo

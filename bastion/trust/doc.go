// Package trust holds the bastion's verified trust with each VM: a fresh
// key of the bastion's own, installed for one login through the
// hypervisor, and the VM's host keys and address, proven to belong
// together by a dual-band check. docs/trust.md describes the check step
// by step; check.go implements it in the same order.
//
// A trust is per VM (hypervisor URI and domain UUID) and login. It expires
// after a TTL, is refreshed while in use, and is dropped at once on
// lifecycle events that break the binding: reboot, stop, migration,
// undefine, agent loss.
//
// The files, in the order of a check: trust.go (Manager: the cache, one
// check per VM and login at a time, expiry, Drop, events), check.go (the
// dual-band steps), inband.go (the SSH half: dialing with the pinned keys
// and the nonce round trips), state.go (trust.json and `bastion trust ls`).
package trust

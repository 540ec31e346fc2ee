// Package bastion is the SSH front door: it authenticates people, works out
// which VM and login each request is for, asks the policy, obtains a
// verified upstream from its Resolver, and forwards channels to the VM's
// own sshd.
//
// A request travels through the files in this order: server.go (listener,
// host keys, authentication), identity.go (keys to accounts, rate limits),
// target.go (login@vm names and the ProxyJump inner hop), link.go (one
// downstream connection bound to one VM and login, and its upstream),
// forward.go (channel-level forwarding), audit.go (the audit stream).
package bastion

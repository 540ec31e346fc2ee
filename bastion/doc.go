// Package bastion is the SSH front door: it authenticates people, works out
// which VM and login each request is for, asks the policy, obtains a
// verified upstream from its Resolver, and forwards channels to the VM's
// own sshd. docs/design.md follows one request through it.
//
// A request travels through the files in this order: server.go (the
// interfaces it is wired with, listener, host keys, authentication),
// identity.go (keys to accounts, rate limits), target.go (login@vm names and
// the ProxyJump inner hop), menu.go (`ssh alice@bastion`), link.go (one
// downstream connection bound to one VM and login, its upstream, and its
// end), forward.go (channel-level forwarding and the teardown order),
// hop.go (deadlines and keepalives on every hop), pump.go (batched reads and
// writes on the data path), sftp.go (read-only sftp), commands.go (the
// bastion's own `vm` command), errors.go (what the user is told).
package bastion

// Package vmtest is the real-guest suite (its tests run with
// BASTION_VMTEST=1). What it exports is the shape of the figures its
// timing test hands to the benchmark harness.
package vmtest

// TrustTimings is what TestTrustTimings measures, in seconds per run. With
// BASTION_BENCH_VM_OUT set, the test writes it there as JSON for `make
// bench`, which reads it back with this type.
type TrustTimings struct {
	Guest            string    `json:"guest"`
	ColdCheck        []float64 `json:"cold_check"`         // the dual-band check of a fresh bastion, from the audit event
	SecondLoginCheck []float64 `json:"second_login_check"` // the check for another login, host keys already pinned
	ColdSetup        []float64 `json:"cold_setup"`         // ssh -J bastion root@vm true, no trust yet
	WarmSetup        []float64 `json:"warm_setup"`         // the same with trust held, a new connection to the guest each time
	LingerSetup      []float64 `json:"linger_setup"`       // the same with the connection of the login before kept (server.upstream_linger)
	OpenSSHSetup     []float64 `json:"openssh_setup"`      // ssh -J through an OpenSSH jump host to the same guest
}

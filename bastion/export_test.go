package bastion

// DefaultCiphersFor is the default cipher list on a CPU with or without
// AES instructions.
var DefaultCiphersFor = defaultCiphers

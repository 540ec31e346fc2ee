//go:build !linux

package bastion

import "net"

// quickAcker is Linux's alone (quickack_linux.go).
func quickAcker(net.Conn) func() { return nil }

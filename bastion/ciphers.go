package bastion

import (
	"fmt"
	"runtime"
	"slices"
	"strings"

	gossh "golang.org/x/crypto/ssh"
	"golang.org/x/sys/cpu"
)

// The bastion's ciphers are one list for every hop it negotiates: the
// front door and the ProxyJump inner hop offer it as a server (where the
// client's order picks among what is offered), and the link to the VM
// prefers it in order as a client.
//
// Where the CPU has AES instructions, x/crypto's AES-GCM is assembly and
// its chacha20-poly1305 generic Go, several times slower. OpenSSH clients
// put chacha20-poly1305 first and the AES-CTR modes before AES-GCM, so
// only a server that offers AES-GCM and neither of those gets AES-GCM
// from a client left at its defaults. Without AES instructions
// chacha20-poly1305 is the faster one and comes first.

var (
	aesGCM = []string{gossh.CipherAES128GCM, gossh.CipherAES256GCM}
	aesCTR = []string{gossh.CipherAES128CTR, gossh.CipherAES192CTR, gossh.CipherAES256CTR}
)

// DefaultCiphers is the cipher list of a Server whose Ciphers is nil: on
// a CPU with AES instructions (AES-NI and PCLMULQDQ on amd64, AES and
// PMULL on arm64), AES-GCM alone; otherwise chacha20-poly1305, then
// AES-GCM and AES-CTR.
func DefaultCiphers() []string {
	return slices.Clone(defaultCipherList)
}

var defaultCipherList = defaultCiphers(aesHardware())

func defaultCiphers(hasAES bool) []string {
	if hasAES {
		return slices.Clone(aesGCM)
	}
	return slices.Concat([]string{gossh.CipherChaCha20Poly1305}, aesGCM, aesCTR)
}

// UpstreamCiphers is what the bastion asks for as a client, on the link to
// a VM and in the trust check, given the configured list (nil: the
// default). A configured list is kept as it is. The default list comes
// first, then x/crypto's other secure ciphers: a VM's sshd that has the
// default's picks it (the client's order wins), and one too old for
// AES-GCM is still reached.
func UpstreamCiphers(configured []string) []string {
	if configured != nil {
		return configured
	}
	return defaultUpstreamList
}

var defaultUpstreamList = func() []string {
	list := slices.Clone(defaultCipherList)
	for _, c := range gossh.SupportedAlgorithms().Ciphers {
		if !slices.Contains(list, c) {
			list = append(list, c)
		}
	}
	return list
}()

// aesHardware reports whether x/crypto's AES-GCM runs on AES instructions
// here.
func aesHardware() bool {
	switch runtime.GOARCH {
	case "amd64":
		return cpu.X86.HasAES && cpu.X86.HasPCLMULQDQ
	case "arm64":
		return cpu.ARM64.HasAES && cpu.ARM64.HasPMULL
	}
	return false
}

// ParseCiphers checks server.ciphers: SSH cipher names that x/crypto
// implements and does not consider insecure, each once, in the order of
// preference. An empty list is refused: it would let nothing in.
func ParseCiphers(names []string) ([]string, error) {
	if len(names) == 0 {
		return nil, fmt.Errorf("no cipher named; leave the key out for the default (%s)", strings.Join(DefaultCiphers(), ", "))
	}
	supported := gossh.SupportedAlgorithms().Ciphers
	insecure := gossh.InsecureAlgorithms().Ciphers
	for i, name := range names {
		switch {
		case slices.Contains(insecure, name):
			return nil, fmt.Errorf("%q is insecure, never offered (the bastion offers %s)", name, strings.Join(supported, ", "))
		case !slices.Contains(supported, name):
			return nil, fmt.Errorf("%q is not a cipher the bastion implements (it offers %s)", name, strings.Join(supported, ", "))
		case slices.Contains(names[:i], name):
			return nil, fmt.Errorf("%q is named twice", name)
		}
	}
	return slices.Clone(names), nil
}

// ciphers is the list every hop uses.
func (s *Server) ciphers() []string {
	if s.Ciphers != nil {
		return s.Ciphers
	}
	return defaultCipherList
}

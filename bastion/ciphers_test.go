package bastion_test

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/internal/testenv"
	"github.com/bastionvm/bastion/keys"
)

const (
	aes128GCM = "aes128-gcm@openssh.com"
	aes256GCM = "aes256-gcm@openssh.com"
	chacha20  = "chacha20-poly1305@openssh.com"
)

func TestParseCiphers(t *testing.T) {
	for _, tc := range []struct {
		names []string
		want  string // in the error; "" for none
	}{
		{[]string{aes128GCM}, ""},
		{[]string{chacha20, "aes256-ctr", "aes192-ctr", "aes128-ctr", aes256GCM, aes128GCM}, ""},
		{[]string{aes128GCM, "aes128-gmc@openssh.com"}, `"aes128-gmc@openssh.com" is not a cipher the bastion implements (it offers aes128-gcm@openssh.com,`},
		{[]string{"AES128-CTR"}, `"AES128-CTR" is not a cipher the bastion implements`},
		{[]string{"aes128-cbc"}, `"aes128-cbc" is insecure, never offered`},
		{[]string{"3des-cbc"}, `"3des-cbc" is insecure, never offered`},
		{[]string{"arcfour256"}, `"arcfour256" is insecure, never offered`},
		{[]string{"aes128-ctr", "aes256-ctr", "aes128-ctr"}, `"aes128-ctr" is named twice`},
		{[]string{}, "no cipher named; leave the key out for the default"},
		{nil, "no cipher named"},
	} {
		got, err := bastion.ParseCiphers(tc.names)
		switch {
		case tc.want == "" && (err != nil || !slices.Equal(got, tc.names)):
			t.Errorf("ParseCiphers(%q) = %q, %v; want the list back", tc.names, got, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("ParseCiphers(%q) = %q, %v; want an error containing %q", tc.names, got, err, tc.want)
		}
	}
}

// TestDefaultCiphersFollowTheCPU: the default offers chacha20-poly1305
// only where there is no AES hardware, and then first.
func TestDefaultCiphersFollowTheCPU(t *testing.T) {
	if got := bastion.DefaultCiphersFor(true); !slices.Equal(got, []string{aes128GCM, aes256GCM}) {
		t.Errorf("with AES instructions: %q, want AES-GCM alone", got)
	}
	if got := bastion.DefaultCiphersFor(false); !slices.Equal(got, []string{chacha20, aes128GCM, aes256GCM, "aes128-ctr", "aes192-ctr", "aes256-ctr"}) {
		t.Errorf("without AES instructions: %q, want chacha20-poly1305 first", got)
	}
	got := bastion.DefaultCiphers()
	got[0] = "changed"
	if bastion.DefaultCiphers()[0] == "changed" {
		t.Error("DefaultCiphers returns the list it uses, not a copy")
	}
}

// defaultClientCipher is what an OpenSSH client at its defaults
// negotiates with the default list on this machine.
func defaultClientCipher() string {
	if slices.Contains(bastion.DefaultCiphers(), chacha20) {
		return chacha20
	}
	return aes128GCM
}

var kexCipher = regexp.MustCompile(`kex: server->client cipher: (\S+)`)

// negotiated lists the ciphers an ssh -v run reports, one per hop.
func negotiated(stderr string) []string {
	var out []string
	for _, m := range kexCipher.FindAllStringSubmatch(stderr, -1) {
		out = append(out, m[1])
	}
	return out
}

// TestDefaultClientNegotiatesAESGCM: a stock OpenSSH client, through -J
// and as login@vm@bastion, gets AES-GCM on every hop the bastion serves
// (chacha20-poly1305 where the CPU has no AES instructions).
func TestDefaultClientNegotiatesAESGCM(t *testing.T) {
	f := newFixture(t)
	want := defaultClientCipher()
	res := f.jump(nil, "-v", "true")
	if res.Exit != 0 {
		t.Fatalf("ssh -J: %v", res)
	}
	if got := negotiated(res.Stderr); !slices.Equal(got, []string{want, want}) {
		t.Errorf("ssh -v -J bastion: hops negotiated %q, want %s on both (outer and inner)", got, want)
	}
	res = f.ssh(nil, "-v", f.login+"@web1@bastion", "true")
	if res.Exit != 0 {
		t.Fatalf("ssh login@web1@bastion: %v", res)
	}
	if got := negotiated(res.Stderr); !slices.Equal(got, []string{want}) {
		t.Errorf("ssh -v login@web1@bastion: negotiated %q, want %s", got, want)
	}
}

// TestForcedChaCha20 is a client that asks for chacha20-poly1305 alone: a
// clear refusal under the default list where the CPU has AES instructions,
// on either hop, and a login once server.ciphers offers it.
func TestForcedChaCha20(t *testing.T) {
	if slices.Contains(bastion.DefaultCiphers(), chacha20) {
		t.Skip("no AES instructions here: the default offers chacha20-poly1305")
	}
	var logs testenv.LockedBuffer
	f := newFixture(t, func(s *bastion.Server) { s.Logger = teeLogger(t, &logs) })
	force := []string{"-c", chacha20}
	// The inner hop: -c reaches the main ssh, not ProxyJump's own.
	res := f.jump(nil, append(force, "true")...)
	if res.Exit != 255 || !strings.Contains(res.Stderr, "no matching cipher found") {
		t.Errorf("ssh -c chacha20 -J bastion: %v, want exit 255 and no matching cipher found", res)
	}
	// The front door.
	res = f.ssh(nil, append(force, f.login+"@web1@bastion", "true")...)
	if res.Exit != 255 || !strings.Contains(res.Stderr, "no matching cipher found. Their offer: aes128-gcm@openssh.com,aes256-gcm@openssh.com") {
		t.Errorf("ssh -c chacha20 login@web1@bastion: %v, want exit 255 and the offer named", res)
	}
	// The client gives up on the server's offer; the bastion finds out
	// when it reads the client's, which may be after the client exited.
	refusal := regexp.MustCompile(`msg="handshake failed: no common algorithm" .*client_offered=chacha20-poly1305@openssh.com`)
	for deadline := time.Now().Add(10 * time.Second); !refusal.MatchString(logs.String()); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the bastion's log does not say why the front door refused the client:\n%s", logs.String())
		}
	}

	f = newFixture(t, func(s *bastion.Server) { s.Ciphers = []string{aes128GCM, chacha20} })
	res = f.jump(nil, append(force, "-v", "true")...)
	if got := negotiated(res.Stderr); res.Exit != 0 || len(got) != 2 || got[1] != chacha20 {
		t.Errorf("ssh -c chacha20 -J bastion with chacha20 offered: %v, hops %q", res, got)
	}
	res = f.ssh(nil, append(force, "-v", f.login+"@web1@bastion", "true")...)
	if got := negotiated(res.Stderr); res.Exit != 0 || !slices.Equal(got, []string{chacha20}) {
		t.Errorf("ssh -c chacha20 login@web1@bastion with chacha20 offered: %v, negotiated %q", res, got)
	}
}

// TestUpstreamCipherIsTheBastionsPreference reads the cipher of the
// bastion's own connection to the VM from a VM sshd logging at DEBUG1: the
// first of the bastion's list, whatever the client negotiated.
func TestUpstreamCipherIsTheBastionsPreference(t *testing.T) {
	for _, tc := range []struct {
		ciphers []string
		want    string
	}{
		{nil, bastion.DefaultCiphers()[0]},
		{[]string{aes256GCM, aes128GCM}, aes256GCM},
		{[]string{chacha20, aes128GCM}, chacha20},
		{[]string{"aes192-ctr"}, "aes192-ctr"},
	} {
		f := newFixture(t, func(s *bastion.Server) { s.Ciphers = tc.ciphers })
		vm := f.debugVM(t, "web2")
		// The client offers every cipher the bastion might: the client's
		// own hops must not decide.
		res := f.ssh(nil, "-o", "Ciphers="+strings.Join(gossh.SupportedAlgorithms().Ciphers, ","), f.login+"@web2@bastion", "true")
		if res.Exit != 0 {
			t.Fatalf("ciphers %q: %v", tc.ciphers, res)
		}
		log, _ := os.ReadFile(vm.Log)
		m := regexp.MustCompile(`kex: client->server cipher: (\S+)`).FindAllStringSubmatch(string(log), -1)
		if len(m) != 1 || m[0][1] != tc.want {
			t.Errorf("server.ciphers %q: the VM's sshd saw %q, want one connection with %s", tc.ciphers, m, tc.want)
		}
	}
}

// TestUpstreamReachesAnOldSSHD: by default the bastion, as a client, asks
// for its own list first and then the other secure ciphers, so a VM whose
// sshd has no AES-GCM (OpenSSH before 6.2) is still reached; a list the
// operator set is kept to, and such a VM is then refused.
func TestUpstreamReachesAnOldSSHD(t *testing.T) {
	if got := bastion.UpstreamCiphers(nil); !slices.Equal(got[:len(bastion.DefaultCiphers())], bastion.DefaultCiphers()) || !slices.Contains(got, "aes128-ctr") {
		t.Fatalf("UpstreamCiphers(nil) = %q: want the default first, then the others", got)
	}
	for _, tc := range []struct {
		ciphers []string
		ok      bool
	}{{nil, true}, {[]string{aes128GCM}, false}} {
		f := newFixture(t, func(s *bastion.Server) { s.Ciphers = tc.ciphers })
		vm := f.debugVM(t, "web2", "Ciphers aes128-ctr\n")
		res := f.ssh(nil, f.login+"@web2@bastion", "true")
		log, _ := os.ReadFile(vm.Log)
		if tc.ok && (res.Exit != 0 || !strings.Contains(string(log), "kex: client->server cipher: aes128-ctr")) {
			t.Errorf("default ciphers to an sshd with aes128-ctr only: %v\n%s", res, log)
		}
		if !tc.ok && (res.Exit == 0 || !strings.Contains(res.Stderr, "web2")) {
			t.Errorf("server.ciphers %q to an sshd with aes128-ctr only: %v, want a refusal", tc.ciphers, res)
		}
	}
}

// debugVM starts a second VM sshd, logging at DEBUG1, as the VM name,
// with extra lines of sshd_config.
func (f *fixture) debugVM(t *testing.T, name string, extra ...string) *testenv.SSHD {
	t.Helper()
	pemBytes, err := os.ReadFile(f.upstreamKeyPath)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := gossh.ParsePrivateKey(pemBytes)
	if err != nil {
		t.Fatal(err)
	}
	vm, err := testenv.StartSSHDWith(testenv.SSHDOptions{Dir: filepath.Join(t.TempDir(), name), Authorized: []gossh.PublicKey{signer.PublicKey()},
		Config: testenv.TestConfig + "LogLevel DEBUG1\n" + strings.Join(extra, "")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Stop() })
	f.fleet.Set(name, keys.Upstream{Addr: vm.Addr, HostKeys: []gossh.PublicKey{vm.HostKey}, Signer: signer})
	return vm
}

// teeLogger logs as testLogger does and to w as well.
func teeLogger(t *testing.T, w *testenv.LockedBuffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(io.MultiWriter(testWriter{t}, w), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

package policy

import (
	"errors"
	"strings"
	"testing"
)

func TestCanonicalHostReadsWhatTheVMReads(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		// IPv4 as inet_aton reads it (checked against glibc 2.36's
		// getaddrinfo with AI_NUMERICHOST).
		{"127.0.0.1", "127.0.0.1"}, {"2130706433", "127.0.0.1"}, {"0x7f000001", "127.0.0.1"}, {"0X7F000001", "127.0.0.1"},
		{"0177.0.0.1", "127.0.0.1"}, {"0177.0.0.01", "127.0.0.1"}, {"127.1", "127.0.0.1"}, {"127.0.1", "127.0.0.1"},
		{"0x7f.1", "127.0.0.1"}, {"0x7f.0x0.0.0x1", "127.0.0.1"}, {"000000000000000000000177.1", "127.0.0.1"},
		{"10.0.772", "10.0.3.4"}, {"1.0xffffff", "1.255.255.255"}, {"1.2.65535", "1.2.255.255"}, {"4294967295", "255.255.255.255"},
		{"037777777777", "255.255.255.255"}, {"0", "0.0.0.0"}, {"00", "0.0.0.0"}, {"0x0", "0.0.0.0"}, {"0.0.0.0", "0.0.0.0"},
		// IPv6, with or without brackets and zones; v4-mapped as IPv4.
		{"::1", "::1"}, {"[::1]", "::1"}, {"0:0:0:0:0:0:0:1", "::1"}, {"::1%lo", "::1"}, {"[fe80::1%eth0]", "fe80::1"},
		{"2001:DB8::A", "2001:db8::a"}, {"::", "::"}, {"::ffff:127.0.0.1", "127.0.0.1"}, {"[::ffff:7f00:1]", "127.0.0.1"},
		// Names: lower case, one trailing dot less.
		{"LOCALHOST", "localhost"}, {"localhost.", "localhost"}, {"Web.Localhost", "web.localhost"}, {"db-1.example.", "db-1.example"},
		{"_srv.example", "_srv.example"}, {"0x", "0x"}, {"0xg", "0xg"}, {"10.0.attacker.example", "10.0.attacker.example"},
		{"1e100", "1e100"}, {"foo.0x1f", "foo.0x1f"}, {"00x1", "00x1"}, {"1.0x1000000", "1.0x1000000"},
	} {
		h, err := CanonicalHost(tc.in)
		if err != nil || h.String() != tc.want {
			t.Errorf("CanonicalHost(%q) = %q, %v; want %q", tc.in, h, err, tc.want)
		}
	}
}

func TestCanonicalHostRefusesWhatIsNoHost(t *testing.T) {
	for _, in := range []string{
		"", " ", "a b", "localhost ", "\tlocalhost", "a\x00", "a\nb", "é.example", "a..b", ".", "..", ".a",
		strings.Repeat("a", 64), strings.Repeat("a.", 127) + "aa", "[127.0.0.1]", "[::1", "::1]", "[[::1]]", "x[::1]",
		"::1%", "::1%a%b", "::1%a:b", "%lo", "lo%", "1:2", "::g", "1.2.3.4:80",
		// Not addresses to inet_aton, and no names either: the VM would
		// ask DNS about them.
		"10.0.0.256", "1.2.3.4.5", "08", "08.0.0.1", "0x.1", "4294967296", "127.0.0.1.", "0x7f000001.", "a.1",
	} {
		if h, err := CanonicalHost(in); err == nil || !errors.Is(err, ErrBadHost) {
			t.Errorf("CanonicalHost(%q) = %q, %v; want ErrBadHost", in, h, err)
		}
	}
	if h, err := CanonicalHost(strings.Repeat("a.", 126) + "a."); err != nil || len(h.String()) != 253 {
		t.Errorf("a name of 253 bytes and a dot: %q, %v", h, err)
	}
}

func TestCanonicalBindReadsEmptyAndStarAsEveryAddress(t *testing.T) {
	for _, in := range []string{"", "*"} {
		if h, err := CanonicalBind(in); err != nil || !h.All || h.String() != "*" {
			t.Errorf("CanonicalBind(%q) = %+v, %v", in, h, err)
		}
	}
	if h, err := CanonicalBind("0"); err != nil || h.String() != "0.0.0.0" {
		t.Errorf("CanonicalBind(0) = %+v, %v", h, err)
	}
	if _, err := CanonicalHost("*"); err == nil {
		t.Error("a destination of * was accepted")
	}
}

func TestLoopbackIsEveryFormOfTheVMItself(t *testing.T) {
	for _, in := range []string{"127.0.0.1", "127.255.0.9", "0", "::", "::1", "::ffff:127.0.0.2", "localhost", "LOCALHOST.", "a.b.localhost"} {
		if h, err := CanonicalHost(in); err != nil || !h.Loopback() {
			t.Errorf("%q: %+v, %v", in, h, err)
		}
	}
	for _, in := range []string{"128.0.0.1", "10.0.0.1", "::2", "localhost.example", "notlocalhost", "xlocalhost"} {
		if h, err := CanonicalHost(in); err != nil || h.Loopback() {
			t.Errorf("%q: %+v, %v", in, h, err)
		}
	}
}

func FuzzCanonicalHost(f *testing.F) {
	for _, seed := range []string{"127.0.0.1", "2130706433", "0x7f.1", "0177.0.0.01", "[::ffff:127.0.0.1]", "fe80::1%ETH0", "LocalHost.", "a..b", ""} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, in string) {
		for _, canon := range []func(string) (Host, error){CanonicalHost, CanonicalBind} {
			h, err := canon(in)
			if err != nil {
				if !errors.Is(err, ErrBadHost) || h != (Host{}) {
					t.Fatalf("%q: %+v, %v", in, h, err)
				}
				continue
			}
			s := h.String()
			if s == "" || s != strings.ToLower(s) || strings.HasSuffix(s, ".") {
				t.Fatalf("%q: canonical form %q", in, s)
			}
			again, err := canon(s)
			if err != nil || again.String() != s || again.Addr != h.Addr || again.All != h.All || again.Loopback() != h.Loopback() {
				t.Fatalf("%q: canonical %q reads as %+v, %v", in, s, again, err)
			}
			if h.Addr.IsValid() && (h.Addr.Is4In6() || h.Addr.Zone() != "") {
				t.Fatalf("%q: address %v is mapped or zoned", in, h.Addr)
			}
		}
	})
}

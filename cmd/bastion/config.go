package main

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/BurntSushi/toml"
	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/bastion/dispense"
	"github.com/bastionvm/bastion/bastion/trust"
	"github.com/bastionvm/bastion/internal/tomlpos"
	"github.com/bastionvm/bastion/keys"
	"github.com/bastionvm/bastion/policy"
)

// Config is bastion.toml. bastion.toml.example documents every key.
type Config struct {
	Server   ServerConfig    `toml:"server"`
	Accounts []AccountConfig `toml:"account"`
	// Rules are compiled and checked by policy.Parse; they are declared
	// here so that strict decoding knows the table.
	Rules []toml.Primitive `toml:"rule"`

	Hypervisors []HypervisorConfig `toml:"hypervisor"`
	Trust       TrustConfig        `toml:"trust"`
	Templates   []TemplateConfig   `toml:"template"`
	UserCAs     []UserCAConfig     `toml:"user_ca"`

	policy       *policy.Policy // compiled from Rules or PolicyFile
	accountLines []int          // where each [[account]] starts, for messages
	caLines      []int          // where each [[user_ca]] starts
}

// UserCAConfig is one [[user_ca]]: a certificate authority whose user
// certificates log people in.
type UserCAConfig struct {
	Key        string            `toml:"key"`        // the CA's public key, as OpenSSH writes it
	Principals map[string]string `toml:"principals"` // principal = "account"; if absent, a principal is an account name
}

// HypervisorConfig is one [[hypervisor]]: a libvirt connection URI.
type HypervisorConfig struct {
	URI string `toml:"uri"`
}

// TrustConfig is the [trust] table.
type TrustConfig struct {
	TTL          Duration `toml:"ttl"`
	Modes        []string `toml:"modes"`
	SSHPort      int      `toml:"ssh_port"`
	CheckTimeout Duration `toml:"check_timeout"`
	MaxChecks    int      `toml:"max_checks"`
	Instance     string   `toml:"instance"`
}

// ServerConfig is the [server] table.
type ServerConfig struct {
	Listen         string   `toml:"listen"`
	StateDir       string   `toml:"state_dir"`
	Hostnames      []string `toml:"hostnames"`
	GracePeriod    Duration `toml:"grace_period"`
	KeepAlive      Duration `toml:"keepalive"`
	ConnectTimeout Duration `toml:"connect_timeout"`
	EnvAllow       []string `toml:"env_allow"`
	Ciphers        []string `toml:"ciphers"` // SSH cipher names, for every hop; absent means bastion.DefaultCiphers()
	Audit          string   `toml:"audit"`   // "stdout", "off", or a file path
	AuditRequired  bool     `toml:"audit_required"`

	Recordings        string `toml:"recordings"` // directory of session recordings; none if empty
	RecordingMaxBytes int64  `toml:"recording_max_bytes"`
	OpsListen         string `toml:"ops_listen"` // /metrics, /healthz, /readyz; off if empty
	PolicyFile        string `toml:"policy_file"`
	RevokedKeys       string `toml:"revoked_keys"` // an OpenSSH KRL (ssh-keygen -k); relative to this file's directory
	LogLevel          string `toml:"log_level"`

	MaxChannels         int      `toml:"max_channels"`
	MaxPending          int      `toml:"max_pending"`
	UpstreamHandshakes  int      `toml:"upstream_handshakes"`
	UpstreamMaxSessions int      `toml:"upstream_max_sessions"` // sessions one shared upstream connection carries; 1: none shared
	UpstreamLinger      Duration `toml:"upstream_linger"`       // how long a shared upstream connection outlives its last link; 0: not at all

	LoginGraceTime       Duration    `toml:"login_grace_time"`
	MaxStartups          MaxStartups `toml:"max_startups"`
	PerSourceMaxStartups int         `toml:"per_source_max_startups"`

	// Replicas behind a load balancer.
	ProxyProtocol []string `toml:"proxy_protocol"` // the balancers' CIDR ranges; PROXY headers required from them, others refused
	Replica       string   `toml:"replica"`        // this replica's name in every audit event; default the host name

	balancers []netip.Prefix // ProxyProtocol, parsed
	ciphers   []string       // Ciphers, checked; nil when absent
}

// MaxStartups is server.max_startups, "start:rate:full" as in sshd_config.
type MaxStartups struct{ bastion.MaxStartups }

func (m *MaxStartups) UnmarshalText(text []byte) error {
	v, err := bastion.ParseMaxStartups(string(text))
	if err != nil {
		return err
	}
	m.MaxStartups = v
	return nil
}

// AccountConfig is one [[account]].
type AccountConfig struct {
	Name   string   `toml:"name"`
	Groups []string `toml:"groups"`
	Keys   []string `toml:"keys"` // authorized_keys lines
}

// Duration is a time.Duration written as a string ("30s", "10m").
type Duration struct{ time.Duration }

func (d *Duration) UnmarshalText(text []byte) error {
	v, err := time.ParseDuration(string(text))
	if err != nil {
		return fmt.Errorf("not a duration (like \"30s\" or \"10m\"): %q", text)
	}
	d.Duration = v
	return nil
}

// defaults are the values of keys the file leaves out.
func defaults() Config {
	return Config{Trust: TrustConfig{
		TTL:          Duration{10 * time.Minute},
		Modes:        []string{"ob-ib", "ib-ob"},
		SSHPort:      22,
		CheckTimeout: Duration{90 * time.Second},
		MaxChecks:    16,
	}, Server: ServerConfig{
		Listen:      "127.0.0.1:2222",
		StateDir:    "/var/lib/bastion",
		GracePeriod: Duration{30 * time.Second},
		KeepAlive:   Duration{30 * time.Second},
		Audit:       "stdout",
		LogLevel:    "info",

		LoginGraceTime:       Duration{120 * time.Second},
		MaxStartups:          MaxStartups{bastion.DefaultMaxStartups},
		PerSourceMaxStartups: 10,
		MaxChannels:          100,
		MaxPending:           64,
		UpstreamHandshakes:   8,
		UpstreamMaxSessions:  10,
		UpstreamLinger:       Duration{bastion.DefaultUpstreamLinger},
		RecordingMaxBytes:    16 << 20,
	}}
}

// LoadConfig reads and strictly decodes path: an unknown key, a wrong type
// or an invalid value is an error naming the file, and the line and key
// where it can be known.
func LoadConfig(path string) (*Config, error) {
	data, err := readTrusted(path)
	if err != nil {
		return nil, err
	}
	return ParseConfig(path, data)
}

// readTrusted reads a file that says who may do what, after checking, as
// sshd's StrictModes does, that nobody but its owner could have changed
// it: a regular file, owned by root or by the user running the bastion,
// not writable by group or others.
func readTrusted(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !info.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file", path)
	}
	if perm := info.Mode().Perm(); perm&0o022 != 0 {
		return nil, fmt.Errorf("%s: mode %04o lets others change it (chmod go-w %s)", path, perm, path)
	}
	if st, ok := info.Sys().(*syscall.Stat_t); ok && st.Uid != 0 && int(st.Uid) != os.Getuid() {
		return nil, fmt.Errorf("%s: owned by uid %d, neither root nor the bastion's user", path, st.Uid)
	}
	return io.ReadAll(io.LimitReader(f, 16<<20))
}

// ParseConfig decodes data, read from the file called name.
func ParseConfig(name string, data []byte) (*Config, error) {
	c := defaults()
	md, err := toml.Decode(string(data), &c)
	if err != nil {
		return nil, tomlpos.Error(name, err)
	}
	// The keys of [[rule]] tables are policy.Parse's to check.
	if err := tomlpos.Undecoded(name, data, md, func(table string) bool { return table != "rule" }); err != nil {
		return nil, err
	}
	for i := range c.Accounts {
		c.accountLines = append(c.accountLines, tomlpos.TableLine(data, "account", i))
	}
	for i := range c.UserCAs {
		c.caLines = append(c.caLines, tomlpos.TableLine(data, "user_ca", i))
	}
	if md.IsDefined("server", "ciphers") {
		if c.Server.ciphers, err = bastion.ParseCiphers(c.Server.Ciphers); err != nil {
			return nil, fmt.Errorf("%s:%d: server.ciphers: %w", name, tomlpos.KeyLine(data, "server.ciphers"), err)
		}
	}
	if n := c.Server.UpstreamMaxSessions; n < 1 || n > maxUpstreamSessions {
		return nil, fmt.Errorf("%s:%d: server.upstream_max_sessions: %d is not from 1 (no connection shared) to %d",
			name, tomlpos.KeyLine(data, "server.upstream_max_sessions"), n, maxUpstreamSessions)
	}
	if d := c.Server.UpstreamLinger.Duration; d < 0 || d > maxUpstreamLinger {
		return nil, fmt.Errorf("%s:%d: server.upstream_linger: %v is not from 0s (closed with its last session) to %v",
			name, tomlpos.KeyLine(data, "server.upstream_linger"), d, maxUpstreamLinger)
	}
	for _, h := range c.Server.Hostnames {
		if h == "" || strings.ContainsAny(h, " \t,") {
			return nil, fmt.Errorf("%s:%d: server.hostnames: %q is not a host name or address (a principal of the front door's certificate: not empty, no space or comma)",
				name, tomlpos.KeyLine(data, "server.hostnames"), h)
		}
	}
	if p := c.Server.RevokedKeys; p != "" && !filepath.IsAbs(p) {
		c.Server.RevokedKeys = filepath.Join(filepath.Dir(name), p)
	}
	if err := c.validate(); err != nil {
		var le *lineError
		if errors.As(err, &le) {
			return nil, fmt.Errorf("%s:%d: %w", name, le.line, le.err)
		}
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if c.policy, err = c.loadPolicy(name, data); err != nil {
		return nil, err
	}
	return &c, nil
}

// loadPolicy compiles the rules of the main file, or of policy_file
// (relative to the main file's directory).
func (c *Config) loadPolicy(name string, data []byte) (*policy.Policy, error) {
	if c.Server.PolicyFile == "" {
		return policy.Parse(name, data, false)
	}
	if len(c.Rules) > 0 {
		return nil, fmt.Errorf("%s:%d: [[rule]] tables and server.policy_file both given; keep the rules in one place",
			name, tomlpos.TableLine(data, "rule", 0))
	}
	path := c.Server.PolicyFile
	if !filepath.IsAbs(path) {
		path = filepath.Join(filepath.Dir(name), path)
	}
	c.Server.PolicyFile = path
	pdata, err := readTrusted(path)
	if err != nil {
		return nil, fmt.Errorf("%s: server.policy_file: %w", name, err)
	}
	return policy.Parse(path, pdata, true)
}

// maxUpstreamSessions bounds server.upstream_max_sessions: well above
// any sshd's MaxSessions a bastion would meet, and short of a typo's.
const maxUpstreamSessions = 1000

// maxUpstreamLinger bounds server.upstream_linger: an idle connection to a
// VM longer than this serves no script or IDE better than a new one.
const maxUpstreamLinger = 10 * time.Minute

func (c *Config) validate() error {
	if c.Server.Listen == "" {
		return errors.New("server.listen is empty")
	}
	if c.Server.StateDir == "" {
		return errors.New("server.state_dir is empty")
	}
	switch c.Server.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("server.log_level: %q is not one of debug, info, warn, error", c.Server.LogLevel)
	}
	if c.Server.AuditRequired && c.Server.Audit == "off" {
		return errors.New(`server.audit_required is true but server.audit is "off": there is no trail to require`)
	}
	if c.Server.RecordingMaxBytes < 4096 {
		return fmt.Errorf("server.recording_max_bytes: %d is less than 4096", c.Server.RecordingMaxBytes)
	}
	if c.Server.Recordings != "" && !filepath.IsAbs(c.Server.Recordings) {
		return fmt.Errorf("server.recordings: %q is not an absolute path", c.Server.Recordings)
	}
	if c.Server.LoginGraceTime.Duration < 0 {
		return fmt.Errorf("server.login_grace_time: %v is negative (\"0s\" means no limit)", c.Server.LoginGraceTime.Duration)
	}
	for _, n := range []struct {
		key string
		v   int
	}{{"server.max_channels", c.Server.MaxChannels}, {"server.max_pending", c.Server.MaxPending},
		{"server.upstream_handshakes", c.Server.UpstreamHandshakes}, {"trust.max_checks", c.Trust.MaxChecks}} {
		if n.v < 1 {
			return fmt.Errorf("%s: %d is not at least 1", n.key, n.v)
		}
	}
	if c.Server.PerSourceMaxStartups < 0 {
		return fmt.Errorf("server.per_source_max_startups: %d is negative (0 means no cap per source)", c.Server.PerSourceMaxStartups)
	}
	var err error
	if c.Server.balancers, err = bastion.ParseBalancers(c.Server.ProxyProtocol); err != nil {
		return fmt.Errorf("server.proxy_protocol: %w", err)
	}
	if c.Server.Replica == "" {
		c.Server.Replica, _ = os.Hostname()
	}
	if strings.ContainsFunc(c.Server.Replica, func(r rune) bool { return r < ' ' || r == 0x7f }) || len(c.Server.Replica) > 253 {
		return fmt.Errorf("server.replica: %q is not a plain name", c.Server.Replica)
	}
	for i, h := range c.Hypervisors {
		if h.URI == "" {
			return fmt.Errorf("hypervisor #%d: uri is empty", i+1)
		}
	}
	if c.Trust.TTL.Duration < time.Minute {
		return fmt.Errorf("trust.ttl: %v is shorter than a minute", c.Trust.TTL.Duration)
	}
	if len(c.Trust.Modes) == 0 {
		return errors.New("trust.modes: at least one of \"ob-ib\", \"ib-ob\" is required")
	}
	for _, m := range c.Trust.Modes {
		if m != string(trust.OBIB) && m != string(trust.IBOB) {
			return fmt.Errorf("trust.modes: %q is not \"ob-ib\" or \"ib-ob\"", m)
		}
	}
	if c.Trust.SSHPort < 1 || c.Trust.SSHPort > 65535 {
		return fmt.Errorf("trust.ssh_port: %d is not a port", c.Trust.SSHPort)
	}
	if _, err := c.templates(); err != nil {
		return err
	}
	_, err = c.accounts()
	return err
}

// keyError explains a key that does not parse. A DSA key is refused by
// name: x/crypto no longer reads them (OpenSSH stopped accepting them in
// 7.0 and removed them in 9.8), and its parser's own words would only say
// that no key was found.
func keyError(line string, err error) error {
	if slices.Contains(strings.Fields(line), "ssh-dss") {
		return errors.New("ssh-dss (DSA) keys are not accepted: use an ed25519, ECDSA or RSA key")
	}
	return err
}

// accounts parses the [[account]] tables.
func (c *Config) accounts() (*bastion.AccountSet, error) {
	var accounts []bastion.Account
	for i, a := range c.Accounts {
		acc := bastion.Account{Name: a.Name, Groups: a.Groups}
		for j, line := range a.Keys {
			fail := func(err error) (*bastion.AccountSet, error) {
				err = fmt.Errorf("account %s: keys[%d]: %w", accountName(a.Name, i), j, err)
				if i < len(c.accountLines) {
					err = &lineError{line: c.accountLines[i], err: err}
				}
				return nil, err
			}
			key, _, options, rest, err := gossh.ParseAuthorizedKey([]byte(line))
			if err != nil {
				return fail(keyError(line, err))
			}
			if len(strings.TrimSpace(string(rest))) > 0 {
				return fail(errors.New("one key per entry"))
			}
			opts, err := bastion.ParseKeyOptions(options)
			if err != nil {
				return fail(err)
			}
			acc.Keys = append(acc.Keys, key)
			if len(options) > 0 {
				if acc.KeyOptions == nil {
					acc.KeyOptions = make(map[string]bastion.KeyOptions)
				}
				acc.KeyOptions[gossh.FingerprintSHA256(key)] = opts
			}
		}
		accounts = append(accounts, acc)
	}
	set, err := bastion.NewAccountSet(accounts)
	if err != nil {
		return nil, err
	}
	names := make(map[string]bool)
	for _, a := range accounts {
		names[a.Name] = true
	}
	var cas []bastion.UserCA
	for i, u := range c.UserCAs {
		fail := func(err error) (*bastion.AccountSet, error) {
			err = fmt.Errorf("user_ca #%d: %w", i+1, err)
			if i < len(c.caLines) {
				err = &lineError{line: c.caLines[i], err: err}
			}
			return nil, err
		}
		key, _, _, _, err := gossh.ParseAuthorizedKey([]byte(u.Key))
		if err != nil {
			return fail(fmt.Errorf("key: %w (the CA's public key, as in its .pub file)", keyError(u.Key, err)))
		}
		if _, isCert := key.(*gossh.Certificate); isCert {
			return fail(errors.New("key: a certificate, not the CA's public key"))
		}
		for principal, account := range u.Principals {
			if !names[account] {
				return fail(fmt.Errorf("principals: %q maps to %q, which is not an [[account]]", principal, account))
			}
		}
		cas = append(cas, bastion.UserCA{Key: key, Principals: u.Principals})
	}
	var krl *keys.KRL
	if path := c.Server.RevokedKeys; path != "" {
		data, err := readTrusted(path)
		if err != nil {
			return nil, fmt.Errorf("server.revoked_keys: %w", err)
		}
		if krl, err = keys.ParseKRL(data); err != nil {
			return nil, fmt.Errorf("server.revoked_keys: %s: %w", path, err)
		}
	}
	set.SetCertificates(cas, krl)
	return set, nil
}

// lineError is an error at a line of the configuration file.
type lineError struct {
	line int
	err  error
}

func (e *lineError) Error() string { return fmt.Sprintf("%d: %v", e.line, e.err) }
func (e *lineError) Unwrap() error { return e.err }

func accountName(name string, i int) string {
	if name == "" {
		return "#" + strconv.Itoa(i+1)
	}
	return strconv.Quote(name)
}

// TemplateConfig is one [[template]].
type TemplateConfig struct {
	Name       string            `toml:"name"`
	Hypervisor string            `toml:"hypervisor"`
	Image      string            `toml:"image"`
	Pool       string            `toml:"pool"`
	DiskSize   Size              `toml:"disk_size"`
	MinFree    Size              `toml:"min_free"`
	Kernel     string            `toml:"kernel"`
	Initrd     string            `toml:"initrd"`
	Cmdline    string            `toml:"cmdline"`
	MemoryMiB  int               `toml:"memory_mib"`
	VCPUs      int               `toml:"vcpus"`
	Network    string            `toml:"network"`
	DomainType string            `toml:"domain_type"`
	Logins     []string          `toml:"logins"`
	Labels     map[string]string `toml:"labels"`
	Wait       Duration          `toml:"wait"`
}

// Size is a byte count written as "10GiB", "512MiB" or a plain number.
type Size struct{ Bytes uint64 }

func (s *Size) UnmarshalText(text []byte) error {
	t := strings.TrimSpace(string(text))
	mult := uint64(1)
	for _, u := range []struct {
		suffix string
		mult   uint64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"B", 1}} {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSpace(strings.TrimSuffix(t, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseUint(t, 10, 64)
	if err != nil {
		return fmt.Errorf("not a size (like \"10GiB\" or \"512MiB\"): %q", text)
	}
	s.Bytes = n * mult
	return nil
}

// templates checks the [[template]] tables and fills in defaults.
func (c *Config) templates() (map[string]dispense.Template, error) {
	out := make(map[string]dispense.Template)
	for i, tc := range c.Templates {
		name := tc.Name
		fail := func(format string, args ...any) (map[string]dispense.Template, error) {
			return nil, fmt.Errorf("template %s: %s", accountName(name, i), fmt.Sprintf(format, args...))
		}
		if name == "" {
			return fail("has no name")
		}
		if _, ok := out[name]; ok {
			return fail("is defined twice")
		}
		t := dispense.Template{Name: name, Hypervisor: tc.Hypervisor, Image: tc.Image, Pool: tc.Pool, DiskSize: tc.DiskSize.Bytes,
			MinFree: tc.MinFree.Bytes, Kernel: tc.Kernel, Initrd: tc.Initrd, Cmdline: tc.Cmdline, MemoryMiB: tc.MemoryMiB,
			VCPUs: tc.VCPUs, Network: tc.Network, DomainType: tc.DomainType, Logins: tc.Logins, Labels: tc.Labels, Wait: tc.Wait.Duration}
		if t.Hypervisor == "" {
			if len(c.Hypervisors) == 0 {
				return fail("names no hypervisor, and there is no [[hypervisor]]")
			}
			t.Hypervisor = c.Hypervisors[0].URI
		}
		switch {
		case t.Image == "":
			return fail("image is empty")
		case t.Pool == "":
			return fail("pool is empty (a libvirt storage pool for the overlays)")
		case t.Network == "":
			return fail("network is empty")
		case len(t.Logins) == 0:
			return fail("logins is empty: name the logins to trust at dispense")
		case t.DomainType != "" && t.DomainType != "qemu" && t.DomainType != "kvm":
			return fail("domain_type %q is not qemu or kvm", t.DomainType)
		}
		if t.DiskSize == 0 {
			t.DiskSize = 10 << 30
		}
		if t.MinFree == 0 {
			t.MinFree = 1 << 30
		}
		if t.MemoryMiB == 0 {
			t.MemoryMiB = 512
		}
		out[name] = t
	}
	return out, nil
}

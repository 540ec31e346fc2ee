package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/BurntSushi/toml"
	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/bastion"
	"github.com/bastionvm/bastion/internal/tomlpos"
	"github.com/bastionvm/bastion/policy"
	"github.com/bastionvm/bastion/bastion/trust"
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

	policy *policy.Policy // compiled from Rules or PolicyFile
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
	Audit          string   `toml:"audit"` // "stdout", "off", or a file path
	PolicyFile     string   `toml:"policy_file"`
	LogLevel       string   `toml:"log_level"`
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
	}, Server: ServerConfig{
		Listen:      "127.0.0.1:2222",
		StateDir:    "/var/lib/bastion",
		GracePeriod: Duration{30 * time.Second},
		KeepAlive:   Duration{30 * time.Second},
		Audit:       "stdout",
		LogLevel:    "info",
	}}
}

// LoadConfig reads and strictly decodes path: an unknown key, a wrong type
// or an invalid value is an error naming the file, and the line and key
// where it can be known.
func LoadConfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseConfig(path, data)
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
	if err := c.validate(); err != nil {
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
	pdata, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s: server.policy_file: %w", name, err)
	}
	return policy.Parse(path, pdata, true)
}

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
	_, err := c.accounts()
	return err
}

// accounts parses the [[account]] tables.
func (c *Config) accounts() (*bastion.AccountSet, error) {
	var accounts []bastion.Account
	for i, a := range c.Accounts {
		acc := bastion.Account{Name: a.Name, Groups: a.Groups}
		for j, line := range a.Keys {
			key, _, _, _, err := gossh.ParseAuthorizedKey([]byte(line))
			if err != nil {
				return nil, fmt.Errorf("account %s: keys[%d]: %v", accountName(a.Name, i), j, err)
			}
			acc.Keys = append(acc.Keys, key)
		}
		accounts = append(accounts, acc)
	}
	return bastion.NewAccountSet(accounts)
}

func accountName(name string, i int) string {
	if name == "" {
		return "#" + strconv.Itoa(i+1)
	}
	return strconv.Quote(name)
}

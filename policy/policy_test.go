package policy

import (
	"errors"
	"testing"
)

func TestDecide(t *testing.T) {
	p := &Policy{Rules: []Rule{
		{Name: "dev-web", Groups: []string{"dev"}, VMs: []string{"web*"}, Logins: []string{"dev"}},
		{Name: "alice-db", Accounts: []string{"alice"}, VMs: []string{"db?"}, Logins: []string{"*"}, Channels: []Channel{Shell, LocalForward}},
	}}
	for _, tc := range []struct {
		name string
		req  Request
		rule string // "" means denied
	}{
		{"group, glob, login", Request{Account: "carol", Groups: []string{"dev"}, VM: "web1", Login: "dev", Channel: Shell}, "dev-web"},
		{"default channels include sftp", Request{Account: "carol", Groups: []string{"dev"}, VM: "web1", Login: "dev", Channel: SFTP}, "dev-web"},
		{"default channels exclude forwards", Request{Account: "carol", Groups: []string{"dev"}, VM: "web1", Login: "dev", Channel: LocalForward}, ""},
		{"wrong login", Request{Account: "carol", Groups: []string{"dev"}, VM: "web1", Login: "root", Channel: Shell}, ""},
		{"vm outside glob", Request{Account: "carol", Groups: []string{"dev"}, VM: "db1", Login: "dev", Channel: Shell}, ""},
		{"no group", Request{Account: "carol", VM: "web1", Login: "dev", Channel: Shell}, ""},
		{"account rule, any login", Request{Account: "alice", VM: "db1", Login: "postgres", Channel: LocalForward}, "alice-db"},
		{"account rule, channel not listed", Request{Account: "alice", VM: "db1", Login: "postgres", Channel: Exec}, ""},
		{"connect with any login", Request{Account: "carol", Groups: []string{"dev"}, VM: "web9", Channel: Connect}, "dev-web"},
		{"connect elsewhere", Request{Account: "carol", Groups: []string{"dev"}, VM: "db1", Channel: Connect}, ""},
	} {
		d := p.Decide(tc.req)
		if d.Allow != (tc.rule != "") || d.Rule != tc.rule {
			t.Errorf("%s: got %+v, want rule %q", tc.name, d, tc.rule)
		}
		if !d.Allow && d.Reason == "" {
			t.Errorf("%s: a deny without a reason", tc.name)
		}
	}
	if d := (&Policy{}).Decide(Request{Account: "alice", VM: "web1", Login: "root", Channel: Shell}); d.Allow {
		t.Error("an empty policy allowed a request")
	}
}

func TestValidate(t *testing.T) {
	for _, r := range []Rule{
		{Name: "no subject", VMs: []string{"*"}, Logins: []string{"root"}},
		{Name: "no vms", Accounts: []string{"a"}, Logins: []string{"root"}},
		{Name: "no logins", Accounts: []string{"a"}, VMs: []string{"*"}},
		{Name: "bad glob", Accounts: []string{"a"}, VMs: []string{"[x"}, Logins: []string{"root"}},
		{Name: "bad channel", Accounts: []string{"a"}, VMs: []string{"*"}, Logins: []string{"root"}, Channels: []Channel{"telnet"}},
	} {
		err := (&Policy{Rules: []Rule{r}}).Validate()
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: got %v, want ErrInvalid", r.Name, err)
		}
	}
}

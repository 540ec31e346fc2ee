package main

import (
	"flag"
	"fmt"
	"io"
	"strings"
)

// command is one of bastion's subcommands, as `bastion help` and each
// command's --help describe it.
type command struct {
	name    string // one word, or a group and a word: "keys known-hosts"
	args    string // what follows the name in the synopsis
	summary string
	about   string // more, for --help; may be empty
	example string
	flags   func(fs *flag.FlagSet) // the flags beyond --config, for --help of commands run elsewhere
}

// commands in the order `bastion help` lists them.
var commands = []command{
	{name: "serve", args: "--config FILE", summary: "run the bastion",
		about:   "Listens for SSH as [server] listen says; SIGHUP reloads accounts and policy, SIGTERM drains (open sessions go on, new ones are refused) and exits when they end.",
		example: "bastion serve --config /etc/bastion/bastion.toml"},
	{name: "config check", args: "--config FILE", summary: "validate the configuration",
		about:   "Reads the whole configuration, its policy file included, and names the file, line and key of the first problem.",
		example: "bastion config check --config /etc/bastion/bastion.toml"},
	{name: "doctor", args: "--config FILE [VM...]", summary: "check the configuration, the hypervisors and the VMs, and say how to fix what is wrong",
		about:   "Checks the configuration, the state directory, the listen address, the audit and recording destinations, each hypervisor, and each VM (those named, or every running one): its guest agent, the address the hypervisor confirms, the host keys read through the agent, its sshd proving one of them, and the serving bastion's trust. Changes nothing, here or in a guest. Exits 1 when it finds a problem.",
		example: "bastion doctor --config /etc/bastion/bastion.toml\n  bastion doctor --config bastion.toml web1 db1"},
	{name: "keys known-hosts", args: "--config FILE", summary: "print the known_hosts line users add once",
		about:   "The @cert-authority line for the bastion's host CA, scoped to the bastion's names and the VMs the policy names. Makes the state directory's keys if there are none.",
		example: "bastion keys known-hosts --config bastion.toml >> ~/.ssh/known_hosts"},
	{name: "trust ls", args: "--config FILE", summary: "each VM's trust: state, expiry, pinned host key",
		about:   "Read from the serving bastion's state directory.",
		example: "bastion trust ls --config bastion.toml"},
	{name: "sessions ls", args: "--config FILE [--account A] [--vm V] [--since T] [--until T]", summary: "the session channels in the audit file",
		example: "bastion sessions ls --config bastion.toml --vm web1 --since 24h"},
	{name: "sessions play", args: "--config FILE [--speed N] [--idle-limit D] ID", summary: "play a session's recording in this terminal",
		about:   "Refuses a recording whose SHA-256 is not the one the audit trail sealed. The files also play in `asciinema play`.",
		example: "bastion sessions play --config bastion.toml --speed 4 --idle-limit 2s 4307217e2c208b23-2"},
	{name: "policy check", args: "[--config FILE] [FILE]", summary: "validate a policy file, or the configuration's policy",
		about:   "FILE may be a policy file (rules only) or a whole configuration, whose policy is checked. Without FILE, the policy of --config.",
		example: "bastion policy check --config bastion.toml\n  bastion policy check /etc/bastion/policy.toml"},
	{name: "policy test", args: "--config FILE --account A --vm V --login L --channel C [flags]",
		summary: "print the decision and the deciding rule",
		about:   "Asks the configuration's policy what it would decide for one request, without a VM or a login: the flags describe the request.",
		example: "bastion policy test --config bastion.toml --account alice --vm web1 --login root --channel exec --command 'uptime'"},
	{name: "vm dispense", args: "--config FILE --template T VM", summary: "make a VM from a template, verified and reachable",
		about:   "Also over SSH, as the policy allows: ssh you@bastion vm dispense --template T VM.",
		example: "bastion vm dispense --config bastion.toml --template debian scratch-1",
		flags:   func(fs *flag.FlagSet) { fs.String("template", "", "the [[template]] to make the VM from") }},
	{name: "vm ls", args: "--config FILE", summary: "the VMs the bastion can reach, with their trust",
		example: "bastion vm ls --config bastion.toml"},
	{name: "vm destroy", args: "--config FILE [--force] VM", summary: "remove a dispensed VM and its disk",
		example: "bastion vm destroy --config bastion.toml scratch-1",
		flags:   func(fs *flag.FlagSet) { fs.Bool("force", false, "remove a VM the bastion did not dispense") }},
	{name: "completion", args: "bash", summary: "print a shell completion script",
		about:   "For bash; zsh takes it too after `autoload -U bashcompinit && bashcompinit`.",
		example: "bastion completion bash > /etc/bash_completion.d/bastion"},
	{name: "help", args: "[COMMAND]", summary: "this list, or one command's help",
		example: "bastion help sessions play"},
}

// groups are the first words of two-word commands.
func isGroup(word string) bool {
	for _, c := range commands {
		if g, _, ok := strings.Cut(c.name, " "); ok && g == word {
			return true
		}
	}
	return false
}

func lookup(name string) (command, bool) {
	for _, c := range commands {
		if c.name == name {
			return c, true
		}
	}
	return command{}, false
}

// printUsage lists the commands: those of group, or all.
func printUsage(w io.Writer, group string) {
	fmt.Fprintln(w, "usage:")
	for _, c := range commands {
		if group != "" && !strings.HasPrefix(c.name, group+" ") {
			continue
		}
		line := "  bastion " + c.name + " " + c.args
		if len(line) > 42 {
			fmt.Fprintf(w, "%s\n  %-42s %s\n", line, "", c.summary)
		} else {
			fmt.Fprintf(w, "%-44s %s\n", line, c.summary)
		}
	}
	if group == "" {
		fmt.Fprintln(w, "\nbastion COMMAND --help shows a command's flags and an example.")
	}
}

// printHelp is a command's --help: what it does, its flags, an example.
func printHelp(w io.Writer, c command, fs *flag.FlagSet) {
	fmt.Fprintf(w, "usage: bastion %s %s\n\n%s.\n", c.name, c.args, capitalize(c.summary))
	if c.about != "" {
		fmt.Fprintf(w, "%s\n", c.about)
	}
	if fs != nil {
		n := 0
		fs.VisitAll(func(*flag.Flag) { n++ })
		if n > 0 {
			fmt.Fprintln(w, "\nflags:")
			fs.SetOutput(w)
			fs.PrintDefaults()
		}
	}
	fmt.Fprintf(w, "\nexample:\n  %s\n", c.example)
}

func capitalize(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}

// wantsHelp reports whether args ask for help anywhere before a "--".
func wantsHelp(args []string) bool {
	for _, a := range args {
		switch a {
		case "--":
			return false
		case "-h", "-help", "--help":
			return true
		}
	}
	return false
}

// help answers `bastion help [WORDS]`.
func help(words []string, stdout io.Writer) error {
	name := strings.Join(words, " ")
	switch {
	case name == "":
		printUsage(stdout, "")
		return nil
	case isGroup(name):
		printUsage(stdout, name)
		return nil
	}
	c, ok := lookup(name)
	if !ok {
		return fmt.Errorf("help: no command %q (bastion help lists them)", name)
	}
	fs, _ := newFlags(c.name, io.Discard)
	printHelp(stdout, c, fs)
	return nil
}

// completionScript is `bastion completion bash`: commands, their flags,
// and file names for --config.
func completionScript(w io.Writer) {
	var top []string
	subs := map[string][]string{}
	var order []string
	for _, c := range commands {
		g, sub, ok := strings.Cut(c.name, " ")
		if !ok {
			top = append(top, c.name)
			continue
		}
		if _, seen := subs[g]; !seen {
			top = append(top, g)
			order = append(order, g)
		}
		subs[g] = append(subs[g], sub)
	}
	fmt.Fprintf(w, `# bash completion for bastion (bastion completion bash)
_bastion() {
	local cur prev
	cur="${COMP_WORDS[COMP_CWORD]}"
	prev="${COMP_WORDS[COMP_CWORD-1]}"
	case "$prev" in
	--config|--policy-file) COMPREPLY=($(compgen -f -- "$cur")); return ;;
	esac
	if [ "$COMP_CWORD" -eq 1 ]; then
		COMPREPLY=($(compgen -W %q -- "$cur"))
		return
	fi
	local cmd="${COMP_WORDS[1]}"
	case "$cmd" in
`, strings.Join(top, " "))
	for _, g := range order {
		fmt.Fprintf(w, "\t%s) if [ \"$COMP_CWORD\" -eq 2 ]; then COMPREPLY=($(compgen -W %q -- \"$cur\")); return; fi; cmd=\"$cmd ${COMP_WORDS[2]}\" ;;\n",
			g, strings.Join(subs[g], " "))
	}
	fmt.Fprint(w, "\tesac\n\tcase \"$cmd\" in\n")
	for _, c := range commands {
		fs, _ := newFlags(c.name, io.Discard)
		var names []string
		fs.VisitAll(func(f *flag.Flag) { names = append(names, "--"+f.Name) })
		names = append(names, "--help")
		switch c.name {
		case "completion":
			names = []string{"bash"}
		case "help":
			names = top
		}
		fmt.Fprintf(w, "\t%q) COMPREPLY=($(compgen -W %q -- \"$cur\")) ;;\n", c.name, strings.Join(names, " "))
	}
	fmt.Fprint(w, "\tesac\n}\ncomplete -o default -F _bastion bastion\n")
}

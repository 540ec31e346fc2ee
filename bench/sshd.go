package main

import (
	"bufio"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/bastionvm/bastion/internal/testenv"
	gossh "golang.org/x/crypto/ssh"
)

// newKey returns a fresh ed25519 signer and its private key in OpenSSH's
// PEM format.
func newKey() (gossh.Signer, []byte, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	signer, err := gossh.NewSignerFromKey(priv)
	if err != nil {
		return nil, nil, err
	}
	block, err := gossh.MarshalPrivateKey(priv, "")
	if err != nil {
		return nil, nil, err
	}
	return signer, pem.EncodeToMemory(block), nil
}

// sshd is an OpenSSH server on 127.0.0.1, started under a reaper process
// of this harness (see reaperMain) so that the CPU of every process it
// forks can be accounted for, including the ones sshd itself never waits
// for.
type sshd struct {
	name     string
	addr     string
	hostKey  gossh.PublicKey
	dir      string
	reaper   *exec.Cmd
	listener int // pid of `sshd -D`
	exited   chan error
}

// startSSHD starts sshd with extra configuration lines, letting the current
// user in with any of authorized.
// With public, its authorized_keys can be read by any user (sshd reads
// it as the user logging in).
func startSSHD(name, dir, extra string, public bool, authorized ...gossh.PublicKey) (*sshd, error) {
	mode, keysMode := os.FileMode(0o700), os.FileMode(0o600)
	if public {
		mode, keysMode = 0o711, 0o644
	}
	if err := os.MkdirAll(dir, mode); err != nil {
		return nil, err
	}
	if err := os.Chmod(dir, mode); err != nil {
		return nil, err
	}
	if os.Geteuid() == 0 {
		// The privilege separation directory sshd insists on.
		if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
			return nil, err
		}
	}
	signer, hostPEM, err := newKey()
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "host_ed25519"), hostPEM, 0o600); err != nil {
		return nil, err
	}
	var auth []byte
	for _, k := range authorized {
		auth = append(auth, gossh.MarshalAuthorizedKey(k)...)
	}
	if err := os.WriteFile(filepath.Join(dir, "authorized_keys"), auth, keysMode); err != nil {
		return nil, err
	}
	if err := os.Chmod(filepath.Join(dir, "authorized_keys"), keysMode); err != nil {
		return nil, err
	}
	// Sessions start with a home of their own: Debian's bash reads
	// ~/.bashrc even for commands run by sshd, and the dot files of
	// whoever runs the benchmark (root's pyenv hook here, which can wait a
	// minute for a lock) must not run in every session.
	home := filepath.Join(dir, "home")
	if err := os.MkdirAll(home, 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(home, ".bashrc"), nil, 0o644); err != nil {
		return nil, err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	sshdPath := "/usr/sbin/sshd"
	if _, err := os.Stat(sshdPath); err != nil {
		if sshdPath, err = exec.LookPath("sshd"); err != nil {
			return nil, fmt.Errorf("sshd is not installed: %w", err)
		}
	}
	for attempt := 0; ; attempt++ {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		// extra comes first: for most keywords, sshd keeps the first value.
		config := fmt.Sprintf(`%sListenAddress %s
HostKey %s/host_ed25519
AuthorizedKeysFile %s/authorized_keys
PidFile none
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
X11Forwarding no
PrintMotd no
PrintLastLog no
UseDNS no
MaxStartups 2000
SetEnv HOME=%s
LogLevel ERROR
`, extra, addr, dir, dir, home)
		cfgPath := filepath.Join(dir, "sshd_config")
		if err := os.WriteFile(cfgPath, []byte(config), 0o600); err != nil {
			return nil, err
		}
		logf, err := os.OpenFile(filepath.Join(dir, "sshd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			return nil, err
		}
		cmd := exec.Command(self, "-mode", "reaper", "--", sshdPath, "-D", "-e", "-f", cfgPath)
		cmd.Stderr = logf
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			return nil, err
		}
		if err := cmd.Start(); err != nil {
			return nil, fmt.Errorf("start reaper for %s: %w", name, err)
		}
		ownChild(cmd.Process.Pid)
		logf.Close()
		s := &sshd{name: name, addr: addr, hostKey: signer.PublicKey(), dir: dir, reaper: cmd, exited: make(chan error, 1)}
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		if _, err := fmt.Sscanf(line, "pid %d", &s.listener); err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			return nil, fmt.Errorf("reaper for %s: no pid (%q)", name, line)
		}
		go func() { s.exited <- cmd.Wait() }()
		if err := testenv.WaitBanner(addr, s.exited, 10*time.Second); err != nil {
			log, _ := os.ReadFile(filepath.Join(dir, "sshd.log"))
			s.stop()
			if attempt < 3 && strings.Contains(string(log), "Address already in use") {
				continue
			}
			return nil, fmt.Errorf("%s did not start: %v\n%s", name, err, log)
		}
		return s, nil
	}
}

// stop ends sshd and whatever is left below it, and its reaper.
func (s *sshd) stop() {
	if s.reaper == nil || s.reaper.Process == nil {
		return
	}
	// Kill by pid: the listener first (so it forks nothing more), then
	// what remains of the processes it forked.
	syscall.Kill(s.listener, syscall.SIGTERM)
	for _, p := range descendants(s.reaper.Process.Pid, allStats()) {
		if p.pid != s.reaper.Process.Pid {
			syscall.Kill(p.pid, syscall.SIGKILL)
		}
	}
	select {
	case <-s.exited:
	case <-time.After(5 * time.Second):
		s.reaper.Process.Kill()
		<-s.exited
	}
	s.reaper = nil
}

// cpuTicks returns the CPU, in ticks, of everything this sshd ran since it
// started: the listener's own time and the time of the children it reaped
// (its cutime and cstime), the reaper's cutime and cstime (orphans that
// the reaper adopted and reaped), and any process still alive below. The
// second result is the number of processes still alive below the listener.
func (s *sshd) cpuTicks() (ticks, listenerOnly int64, alive int) {
	all := allStats()
	reaper := all[s.reaper.Process.Pid]
	ticks = reaper.cutime + reaper.cstime
	for _, p := range descendants(reaper.pid, all) {
		switch p.pid {
		case reaper.pid:
		case s.listener:
			ticks += p.total()
			listenerOnly = p.total()
		default:
			ticks += p.total()
			alive++
		}
	}
	return ticks, listenerOnly, alive
}

// waitQuiet waits until nothing but the listener is left below the reaper:
// every per-connection process has exited and been reaped.
func (s *sshd) waitQuiet(limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		if len(descendants(s.reaper.Process.Pid, allStats())) <= 2 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: per-connection processes still running after %v", s.name, limit)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// mem sums PSS and RSS over the listener and every process below it.
func (s *sshd) mem() (memInfo, int) {
	return treeMem(s.listener)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// reaperMain is the harness re-executed as `-mode reaper -- program args...`.
// It makes itself a child subreaper, starts the program, prints its pid,
// and reaps every process that ends up its child until none is left.
//
// Why: OpenSSH's per-connection processes are not all waited for by their
// parents. After authentication the privileged monitor forks the user's
// child, which does the forwarding; when the client disconnects that child
// exits through cleanup_exit() without telling the monitor, and the
// monitor, seeing its socket close, exits as well without wait()ing for
// it. The child is then re-parented: to init normally, and its CPU never
// reaches the listener's cutime. With this process as a subreaper above
// sshd, orphans come here instead, and their CPU lands in this process's
// cutime and cstime, where the harness reads it.
func reaperMain(args []string) {
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "reaper: no program")
		os.Exit(2)
	}
	// Pdeathsig follows the thread that started the child: keep it.
	runtime.LockOSThread()
	if err := setSubreaper(); err != nil {
		fmt.Fprintln(os.Stderr, "reaper: PR_SET_CHILD_SUBREAPER:", err)
		os.Exit(1)
	}
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, "reaper:", err)
		os.Exit(1)
	}
	p, err := os.StartProcess(args[0], args, &os.ProcAttr{
		Files: []*os.File{devnull, devnull, os.Stderr},
		Sys:   &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "reaper:", err)
		os.Exit(1)
	}
	fmt.Printf("pid %d\n", p.Pid)
	os.Stdout.Close()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s := <-sigs
		syscall.Kill(p.Pid, s.(syscall.Signal))
	}()
	status := 0
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, 0, nil)
		if err == syscall.EINTR {
			continue
		}
		if err != nil { // ECHILD: nothing left
			os.Exit(status)
		}
		if pid == p.Pid && ws.Exited() {
			status = ws.ExitStatus()
		}
	}
}

package main

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/bastionvm/bastion/internal/testenv"
)

// sshd is an OpenSSH server on 127.0.0.1 started by testenv, under a
// reaper process of this harness (see reaperMain) so that the CPU of every
// process it forks can be accounted for, including the ones sshd itself
// never waits for.
type sshd struct {
	*testenv.SSHD
	name     string
	listener int // pid of `sshd -D`
	stopped  bool
}

// sshdConfig is what every sshd of the harness has on top of testenv's
// common settings: no message of the day or last login to write, no DNS
// lookups, and room for as many unauthenticated connections at once as the
// idle-session rows open.
const sshdConfig = `PrintMotd no
PrintLastLog no
UseDNS no
MaxStartups 2000
`

// startSSHD starts sshd in dir with extra configuration lines (which come
// first: for most keywords, sshd keeps the first value), letting the
// current user in with any of authorized. With public, other users may log
// in too (see testenv.SSHDOptions.OtherUsers).
func startSSHD(name, dir, extra string, public bool, authorized ...gossh.PublicKey) (*sshd, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	pidFile := filepath.Join(dir, "sshd.pid")
	s, err := testenv.StartSSHDWith(testenv.SSHDOptions{
		Dir:        dir,
		Authorized: authorized,
		OtherUsers: public,
		// sshd -D writes its pid once it listens, before it accepts: the
		// listener's pid, which the reaper it runs under does not know.
		Config: extra + "PidFile " + pidFile + "\n" + sshdConfig,
		Command: func(sshdPath string, args []string) *exec.Cmd {
			cmd := exec.Command(self, append([]string{"-mode", "reaper", "--", sshdPath}, args...)...)
			cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
			return cmd
		},
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	ownChild(s.Pid())
	b := &sshd{SSHD: s, name: name}
	pid, err := os.ReadFile(pidFile)
	if err == nil {
		_, err = fmt.Sscan(string(pid), &b.listener)
	}
	if err != nil {
		s.Stop()
		return nil, fmt.Errorf("%s: no pid of its listener: %v", name, err)
	}
	return b, nil
}

// stop ends sshd and whatever is left below it, and its reaper.
func (s *sshd) stop() {
	if s.stopped {
		return
	}
	s.stopped = true
	// Kill by pid: the listener first (so it forks nothing more), then
	// what remains of the processes it forked.
	reaper := s.Pid()
	syscall.Kill(s.listener, syscall.SIGTERM)
	for _, p := range descendants(reaper, allStats()) {
		if p.pid != reaper {
			syscall.Kill(p.pid, syscall.SIGKILL)
		}
	}
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
	}
	s.Stop()
}

// cpuTicks returns the CPU, in ticks, of everything this sshd ran since it
// started: the listener's own time and the time of the children it reaped
// (its cutime and cstime), the reaper's cutime and cstime (orphans that
// the reaper adopted and reaped), and any process still alive below. The
// second result is the number of processes still alive below the listener.
func (s *sshd) cpuTicks() (ticks, listenerOnly int64, alive int) {
	all := allStats()
	reaper := all[s.Pid()]
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
		if len(descendants(s.Pid(), allStats())) <= 2 {
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

// reaperMain is the harness re-executed as `-mode reaper -- program args...`.
// It makes itself a child subreaper, starts the program, and reaps every process that ends up its child until none is left.
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

package testenv

import (
	"fmt"
	"os"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// Pty is a pseudo-terminal pair: the test holds Master, a program under
// test gets Slave as its controlling terminal.
type Pty struct {
	Master *os.File
	Slave  *os.File
}

// OpenPty opens a pseudo-terminal of rows × cols.
func OpenPty(rows, cols int) (*Pty, error) {
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		return nil, err
	}
	fd := int(master.Fd())
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		master.Close()
		return nil, fmt.Errorf("unlock pty: %w", err)
	}
	n, err := unix.IoctlGetInt(fd, unix.TIOCGPTN)
	if err != nil {
		master.Close()
		return nil, fmt.Errorf("pty number: %w", err)
	}
	slave, err := os.OpenFile("/dev/pts/"+strconv.Itoa(n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		master.Close()
		return nil, err
	}
	p := &Pty{Master: master, Slave: slave}
	if err := p.Resize(rows, cols); err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

// Resize sets the terminal's size; the kernel signals SIGWINCH to the
// foreground process group of the slave.
func (p *Pty) Resize(rows, cols int) error {
	return unix.IoctlSetWinsize(int(p.Master.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: uint16(rows), Col: uint16(cols)})
}

// Attr makes the slave the controlling terminal of a command started with
// it as stdin, stdout and stderr.
func (p *Pty) Attr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
}

func (p *Pty) Close() {
	p.Master.Close()
	p.Slave.Close()
}

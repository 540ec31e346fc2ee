package bastion

import (
	"io"
	"os"

	"github.com/pkg/sftp"
)

// readOnlySFTP serves the downstream sftp client from a pkg/sftp request
// server whose handlers read through an sftp client of the VM's own sftp
// server and refuse everything that would change a file. The VM decides
// what the login may read; the bastion decides that nothing is written.
//
// up carries the VM's sftp subsystem, already started; down is the
// client's channel. Serve returns when the client ends the session.
// refused, if set, hears of each change refused: the request's method
// (Put, Rename, Remove, Mkdir, ...) and path.
func readOnlySFTP(up io.ReadWriteCloser, down io.ReadWriteCloser, refused func(method, path string)) error {
	client, err := sftp.NewClientPipe(up, up)
	if err != nil {
		return err
	}
	defer client.Close()
	var opts []sftp.RequestServerOption
	if home, err := client.Getwd(); err == nil {
		opts = append(opts, sftp.WithStartDirectory(home))
	}
	fs := readOnlyFS{client, refused}
	server := sftp.NewRequestServer(down, sftp.Handlers{FileGet: fs, FilePut: fs, FileCmd: fs, FileList: fs}, opts...)
	defer server.Close()
	if err := server.Serve(); err != io.EOF {
		return err
	}
	return nil
}

// readOnlyFS is the VM's file system through its sftp server, read-only.
type readOnlyFS struct {
	c       *sftp.Client
	refused func(method, path string)
}

// refuse reports r as refused and answers it.
func (fs readOnlyFS) refuse(r *sftp.Request) error {
	if fs.refused != nil {
		fs.refused(r.Method, r.Filepath)
	}
	return sftp.ErrSSHFxPermissionDenied
}

func (fs readOnlyFS) Fileread(r *sftp.Request) (io.ReaderAt, error) {
	return fs.c.Open(r.Filepath)
}

func (fs readOnlyFS) Filewrite(r *sftp.Request) (io.WriterAt, error) {
	return nil, fs.refuse(r)
}

func (fs readOnlyFS) Filecmd(r *sftp.Request) error {
	return fs.refuse(r)
}

func (fs readOnlyFS) Filelist(r *sftp.Request) (sftp.ListerAt, error) {
	switch r.Method {
	case "List":
		infos, err := fs.c.ReadDir(r.Filepath)
		return listing(infos), err
	case "Stat":
		info, err := fs.c.Stat(r.Filepath)
		return listing{info}, err
	}
	return nil, sftp.ErrSSHFxOpUnsupported
}

func (fs readOnlyFS) Lstat(r *sftp.Request) (sftp.ListerAt, error) {
	info, err := fs.c.Lstat(r.Filepath)
	return listing{info}, err
}

func (fs readOnlyFS) RealPath(p string) (string, error) { return fs.c.RealPath(p) }

func (fs readOnlyFS) Readlink(p string) (string, error) { return fs.c.ReadLink(p) }

// listing is a directory listing, or one file's, as sftp.ListerAt.
type listing []os.FileInfo

func (l listing) ListAt(out []os.FileInfo, offset int64) (int, error) {
	if offset >= int64(len(l)) {
		return 0, io.EOF
	}
	n := copy(out, l[offset:])
	if int(offset)+n == len(l) {
		return n, io.EOF
	}
	return n, nil
}

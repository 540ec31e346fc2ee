package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// smallTree writes the tree of the small-file rows: files of 4 KiB of
// random bytes in ten directories.
func (h *harness) smallTree() (string, error) {
	root := filepath.Join(h.dir, "small")
	for i := range h.opts.smallFiles {
		dir := filepath.Join(root, fmt.Sprintf("d%d", i%10))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return "", err
		}
		if err := writeRandom(filepath.Join(dir, fmt.Sprintf("f%04d", i)), 4096); err != nil {
			return "", err
		}
	}
	return root, nil
}

func writeRandom(path string, size int) error {
	f, err := os.Open("/dev/urandom")
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, size)
	if _, err := f.Read(buf); err != nil {
		return err
	}
	return os.WriteFile(path, buf, 0o644)
}

// rowSmallFiles: the small-file tree put and got with sftp -r, and copied
// both ways with scp -r (OpenSSH 9's scp speaks sftp), by every route:
// files per second of the client's wall time, connection setup included.
// Each run writes to a fresh directory, removed after it.
func (h *harness) rowSmallFiles() error {
	tree, err := h.smallTree()
	if err != nil {
		return err
	}
	n := h.opts.smallFiles
	dest := func(tag, via string, run int) string {
		return filepath.Join(h.dir, fmt.Sprintf("small-%s-%s-%d", tag, strings.ReplaceAll(via, "@", "-"), run))
	}
	// remote is the ssh destination of via for scp: user@host.
	remote := func(via string) (opts []string, target string) {
		args := h.sshArgs(via, "")
		return args[:len(args)-1], args[len(args)-1]
	}
	for _, kind := range []struct {
		tag, name, program string
		args               func(via string, run int) []string
	}{
		{"sftp-put", "sftp put -r", "sftp", func(via string, run int) []string {
			return h.sftpBatch(via, fmt.Sprintf("put -r %s %s\n", tree, dest("sftp-put", via, run)))
		}},
		{"sftp-get", "sftp get -r", "sftp", func(via string, run int) []string {
			return h.sftpBatch(via, fmt.Sprintf("get -r %s %s\n", tree, dest("sftp-get", via, run)))
		}},
		{"scp-up", "scp -r, upload", "scp", func(via string, run int) []string {
			opts, target := remote(via)
			return append(append([]string{"-q", "-r"}, opts...), tree, target+":"+dest("scp-up", via, run))
		}},
		{"scp-down", "scp -r, download", "scp", func(via string, run int) []string {
			opts, target := remote(via)
			return append(append([]string{"-q", "-r"}, opts...), target+":"+tree, dest("scp-down", via, run))
		}},
	} {
		r := h.newRow("files", fmt.Sprintf("%s, %d files of 4 KiB", kind.name, n), "files/s", true)
		for i := 0; i < h.opts.runs; i++ {
			for _, via := range order(i, routes) {
				res, err := h.runClient(via, kind.program, kind.args(via, i), "", "", "")
				if err != nil {
					return err
				}
				copied := countFiles(dest(kind.tag, via, i))
				os.RemoveAll(dest(kind.tag, via, i))
				if copied != n {
					return fmt.Errorf("%s by %s: %d files arrived, not %d", kind.name, via, copied, n)
				}
				rate := float64(n) / res.wall.Seconds()
				h.record(r, via, i, rate, fmt.Sprintf("wall_s=%.3f cpu_ticks=%d", res.wall.Seconds(), res.cpu), res.others)
				h.logf("  %s run %d %s: %.0f files/s", kind.name, i+1, via, rate)
			}
		}
		r.pair()
		h.logf("%s", r.summary())
	}
	return nil
}

// sftpBatch is the argument list of sftp by via running the batch of
// commands given.
func (h *harness) sftpBatch(via, commands string) []string {
	batch := filepath.Join(h.dir, "sftp-batch-"+strings.ReplaceAll(via, "@", "-"))
	os.WriteFile(batch, []byte(commands), 0o600)
	args := h.sshArgs(via, "")
	dest := args[len(args)-1]
	return append(append(args[:len(args)-1:len(args)-1], "-q", "-b", batch), dest)
}

// countFiles counts the regular files under dir.
func countFiles(dir string) int {
	n := 0
	filepath.WalkDir(dir, func(_ string, d os.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			n++
		}
		return nil
	})
	return n
}

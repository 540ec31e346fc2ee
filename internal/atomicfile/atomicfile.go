// Package atomicfile replaces files whole: a reader, or the next start
// after a crash or a full disk, sees the old content or the new, never part
// of either.
package atomicfile

import (
	"os"
	"path/filepath"
)

// Write writes data to a temporary file with mode perm in path's
// directory, syncs it and renames it over path. On any error path is left
// as it was and the temporary file is removed.
func Write(path string, data []byte, perm os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

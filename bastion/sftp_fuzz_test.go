package bastion

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/pkg/sftp"
)

// sftpPacket frames one SFTP packet: type, then fields, each a uint32 or a
// string.
func sftpPacket(typ byte, fields ...any) []byte {
	var body bytes.Buffer
	body.WriteByte(typ)
	for _, f := range fields {
		switch v := f.(type) {
		case uint32:
			binary.Write(&body, binary.BigEndian, v)
		case string:
			binary.Write(&body, binary.BigEndian, uint32(len(v)))
			body.WriteString(v)
		}
	}
	out := binary.BigEndian.AppendUint32(nil, uint32(body.Len()))
	return append(out, body.Bytes()...)
}

// FuzzReadOnlySFTP feeds arbitrary client bytes to the read-only sftp
// request server, with a real pkg/sftp server over a directory behind it:
// it must return once the client's stream ends, and the directory must be
// as it was, whatever was asked.
func FuzzReadOnlySFTP(f *testing.F) {
	const (
		fxpInit, fxpOpen, fxpClose, fxpWrite, fxpRemove, fxpMkdir, fxpRename, fxpSymlink = 1, 3, 4, 6, 13, 14, 18, 20
		openWrite, openCreat, openTrunc                                                  = 0x02, 0x08, 0x10
	)
	initPkt := sftpPacket(fxpInit, uint32(3))
	seed := func(pkts ...[]byte) []byte { return bytes.Join(append([][]byte{initPkt}, pkts...), nil) }
	f.Add(seed(sftpPacket(fxpOpen, uint32(1), "kept", uint32(openWrite|openCreat|openTrunc), uint32(0)),
		sftpPacket(fxpWrite, uint32(2), "0", uint32(0), uint32(0), "x"), sftpPacket(fxpClose, uint32(3), "0")))
	f.Add(seed(sftpPacket(fxpRemove, uint32(1), "kept")))
	f.Add(seed(sftpPacket(fxpMkdir, uint32(1), "new", uint32(0))))
	f.Add(seed(sftpPacket(fxpRename, uint32(1), "kept", "moved")))
	f.Add(seed(sftpPacket(fxpSymlink, uint32(1), "kept", "link")))
	f.Add(seed(sftpPacket(fxpOpen, uint32(1), "kept", uint32(1), uint32(0))))
	f.Add([]byte{0, 0, 0, 5, fxpInit, 0, 0, 0})
	f.Fuzz(func(t *testing.T, stream []byte) {
		dir := t.TempDir()
		kept := filepath.Join(dir, "kept")
		if err := os.WriteFile(kept, []byte("the VM's file"), 0o600); err != nil {
			t.Fatal(err)
		}
		upBastion, upVM := net.Pipe()
		vm, err := sftp.NewServer(upVM, sftp.WithServerWorkingDirectory(dir))
		if err != nil {
			t.Fatal(err)
		}
		go vm.Serve()
		defer vm.Close()
		downBastion, downClient := net.Pipe()
		served := make(chan struct{})
		go func() {
			defer close(served)
			readOnlySFTP(upBastion, downBastion, nil)
			downBastion.Close()
		}()
		go io.Copy(io.Discard, downClient) // the replies
		downClient.SetWriteDeadline(time.Now().Add(10 * time.Second))
		downClient.Write(stream)
		downClient.Close()
		select {
		case <-served:
		case <-time.After(30 * time.Second):
			t.Fatal("the request server did not return after the client's stream ended")
		}
		upBastion.Close()
		entries, _ := os.ReadDir(dir)
		data, _ := os.ReadFile(kept)
		if len(entries) != 1 || string(data) != "the VM's file" {
			t.Fatalf("the read-only server changed the VM's files: %d entries, kept %q", len(entries), data)
		}
	})
}

module github.com/bastionvm/bastion

go 1.26.8

require (
	github.com/BurntSushi/toml v1.6.0
	github.com/gliderlabs/ssh v0.3.8
	github.com/pkg/sftp v1.13.12
	golang.org/x/crypto v0.58.0
	golang.org/x/sys v0.49.0
	libvirt.org/go/libvirt v1.12007.0
)

require (
	github.com/anmitsu/go-shlex v0.0.0-20200514113438-38f4b401e2be // indirect
	github.com/kr/fs v0.1.0 // indirect
)

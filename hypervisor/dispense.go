package hypervisor

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"strings"

	"libvirt.org/go/libvirt"

	"github.com/bastionvm/bastion/vm"
)

// Errors of dispensing.
var (
	ErrNoSuchPool = errors.New("no such storage pool")
	ErrNoImage    = errors.New("base image missing")
	ErrDiskFull   = errors.New("not enough free space in the storage pool")
)

// CreateOverlay creates a qcow2 volume called name in the storage pool
// poolName on uri, backed by the qcow2 image at backing, of capacity bytes.
// The pool must have at least minFree bytes available. It returns the
// volume's path.
func (p *Pool) CreateOverlay(ctx context.Context, uri, poolName, name, backing string, capacity, minFree uint64) (string, error) {
	return call(ctx, func() (string, error) {
		c, err := p.conn(uri)
		if err != nil {
			return "", err
		}
		pool, err := c.LookupStoragePoolByName(poolName)
		if err != nil {
			return "", fmt.Errorf("%w: %s on %s", ErrNoSuchPool, poolName, uri)
		}
		defer pool.Free()
		pool.Refresh(0)
		info, err := pool.GetInfo()
		if err != nil {
			return "", classify(err)
		}
		if info.Available < minFree {
			return "", fmt.Errorf("%w: %s has %d MiB available, %d MiB needed", ErrDiskFull, poolName, info.Available>>20, minFree>>20)
		}
		var v struct {
			XMLName  xml.Name `xml:"volume"`
			Name     string   `xml:"name"`
			Capacity struct {
				Unit  string `xml:"unit,attr"`
				Value uint64 `xml:",chardata"`
			} `xml:"capacity"`
			Format  formatXML `xml:"target>format"`
			Backing struct {
				Path   string    `xml:"path"`
				Format formatXML `xml:"format"`
			} `xml:"backingStore"`
		}
		v.Name = name
		v.Capacity.Unit, v.Capacity.Value = "bytes", capacity
		v.Format.Type = "qcow2"
		v.Backing.Path, v.Backing.Format.Type = backing, "qcow2"
		spec, err := xml.Marshal(v)
		if err != nil {
			return "", err
		}
		vol, err := pool.StorageVolCreateXML(string(spec), 0)
		if err != nil {
			msg := libvirtMessage(err)
			switch {
			case strings.Contains(msg, "backing") || strings.Contains(msg, "No such file"):
				return "", fmt.Errorf("%w: %s: %s", ErrNoImage, backing, msg)
			case strings.Contains(msg, "No space left"):
				return "", fmt.Errorf("%w: %s", ErrDiskFull, msg)
			}
			return "", classify(err)
		}
		defer vol.Free()
		return vol.GetPath()
	})
}

type formatXML struct {
	Type string `xml:"type,attr"`
}

// DeleteVolume deletes the volume at path on uri; one already gone is no
// error.
func (p *Pool) DeleteVolume(ctx context.Context, uri, path string) error {
	_, err := call(ctx, func() (struct{}, error) {
		c, err := p.conn(uri)
		if err != nil {
			return struct{}{}, err
		}
		vol, err := c.LookupStorageVolByPath(path)
		if err != nil {
			var lerr libvirt.Error
			if errors.As(err, &lerr) && lerr.Code == libvirt.ERR_NO_STORAGE_VOL {
				return struct{}{}, nil
			}
			return struct{}{}, classify(err)
		}
		defer vol.Free()
		return struct{}{}, classify(vol.Delete(0))
	})
	return err
}

// DefineAndStart defines a domain from its XML on uri and starts it. A
// domain that defines but does not start is undefined again.
func (p *Pool) DefineAndStart(ctx context.Context, uri, domainXML string) (vm.Domain, error) {
	return call(ctx, func() (vm.Domain, error) {
		c, err := p.conn(uri)
		if err != nil {
			return vm.Domain{}, err
		}
		dom, err := c.DomainDefineXML(domainXML)
		if err != nil {
			return vm.Domain{}, fmt.Errorf("define: %s", libvirtMessage(err))
		}
		defer dom.Free()
		if err := dom.Create(); err != nil {
			dom.UndefineFlags(libvirt.DOMAIN_UNDEFINE_NVRAM)
			return vm.Domain{}, fmt.Errorf("start: %s", libvirtMessage(err))
		}
		return describe(uri, dom)
	})
}

// Remove stops d if it runs and undefines it. Its disks stay.
func (p *Pool) Remove(ctx context.Context, d vm.Domain) error {
	_, err := call(ctx, func() (struct{}, error) {
		dom, err := p.domain(d)
		if err != nil {
			return struct{}{}, err
		}
		defer dom.Free()
		if active, _ := dom.IsActive(); active {
			if err := dom.Destroy(); err != nil {
				return struct{}{}, fmt.Errorf("stop %s: %s", d.Name, libvirtMessage(err))
			}
		}
		if err := dom.UndefineFlags(libvirt.DOMAIN_UNDEFINE_NVRAM | libvirt.DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.DOMAIN_UNDEFINE_SNAPSHOTS_METADATA); err != nil {
			return struct{}{}, fmt.Errorf("undefine %s: %s", d.Name, libvirtMessage(err))
		}
		return struct{}{}, nil
	})
	return err
}

// Disks lists the paths of d's file-backed disks.
func (p *Pool) Disks(ctx context.Context, d vm.Domain) ([]string, error) {
	return call(ctx, func() ([]string, error) {
		dom, err := p.domain(d)
		if err != nil {
			return nil, err
		}
		defer dom.Free()
		desc, err := dom.GetXMLDesc(0)
		if err != nil {
			return nil, classify(err)
		}
		var x struct {
			Disks []struct {
				Device string `xml:"device,attr"`
				Source struct {
					File string `xml:"file,attr"`
				} `xml:"source"`
			} `xml:"devices>disk"`
		}
		if err := xml.Unmarshal([]byte(desc), &x); err != nil {
			return nil, err
		}
		var out []string
		for _, disk := range x.Disks {
			if disk.Device == "disk" && disk.Source.File != "" {
				out = append(out, disk.Source.File)
			}
		}
		return out, nil
	})
}

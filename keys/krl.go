package keys

import (
	"bytes"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"

	gossh "golang.org/x/crypto/ssh"
)

// KRL is an OpenSSH key revocation list, as `ssh-keygen -k` writes it
// (the format is OpenSSH's PROTOCOL.krl): keys revoked outright or by
// hash, and certificates revoked by serial number or key id under their
// CA. Its signature sections, if any, are not checked: the file is the
// operator's, read from a path only they may write.
type KRL struct {
	Version uint64
	Comment string

	keys   map[string]bool // public key blobs
	sha1   map[string]bool
	sha256 map[string]bool
	certs  []krlCerts
}

// krlCerts are the certificate revocations under one CA (any CA if ca is
// empty).
type krlCerts struct {
	ca      string // the CA key's blob, or "" for any CA
	serials []serialRange
	bitmaps []serialBitmap
	keyIDs  map[string]bool
}

type serialRange struct{ lo, hi uint64 }

type serialBitmap struct {
	offset uint64
	bits   *big.Int
}

const (
	krlMagic         = "SSHKRL\n\x00"
	krlFormatVersion = 1

	krlCertificates = 1
	krlExplicitKey  = 2
	krlSHA1         = 3
	krlSignature    = 4
	krlSHA256       = 5

	krlSerialList   = 0x20
	krlSerialRange  = 0x21
	krlSerialBitmap = 0x22
	krlKeyID        = 0x23
	krlExtension    = 0x24
)

// maxKRLBitmap bounds one serial bitmap section, so that a corrupt file
// cannot ask for a huge allocation: OpenSSH writes bitmaps only where they
// are smaller than the list they replace.
const maxKRLBitmap = 8 << 20

// ParseKRL reads a binary KRL. A section or subsection OpenSSH does not
// define, or a file cut short, is an error: a revocation list that is only
// partly understood must not be taken as whole.
func ParseKRL(data []byte) (*KRL, error) {
	r := &reader{b: data}
	if !bytes.HasPrefix(data, []byte(krlMagic)) {
		return nil, errors.New("not an OpenSSH KRL (no SSHKRL magic; ssh-keygen -k writes them)")
	}
	r.b = r.b[len(krlMagic):]
	k := &KRL{keys: map[string]bool{}, sha1: map[string]bool{}, sha256: map[string]bool{}}
	format := r.uint32()
	if r.err == nil && format != krlFormatVersion {
		return nil, fmt.Errorf("KRL format version %d; this bastion reads version %d", format, krlFormatVersion)
	}
	k.Version = r.uint64()
	r.uint64() // generated
	r.uint64() // flags
	r.str()    // reserved
	k.Comment = string(r.str())
	if r.err != nil {
		return nil, fmt.Errorf("KRL header: %w", r.err)
	}
	signed := false
	for len(r.b) > 0 {
		typ := r.byte()
		body := r.str()
		if r.err != nil {
			return nil, fmt.Errorf("KRL section: %w", r.err)
		}
		if signed && typ != krlSignature {
			return nil, errors.New("KRL: a section after its signature")
		}
		s := &reader{b: body}
		switch typ {
		case krlCertificates:
			c, err := parseKRLCerts(s)
			if err != nil {
				return nil, err
			}
			k.certs = append(k.certs, c)
		case krlExplicitKey, krlSHA1, krlSHA256:
			into, size := k.keys, 0
			switch typ {
			case krlSHA1:
				into, size = k.sha1, sha1.Size
			case krlSHA256:
				into, size = k.sha256, sha256.Size
			}
			for len(s.b) > 0 {
				v := s.str()
				if s.err != nil {
					return nil, fmt.Errorf("KRL key section: %w", s.err)
				}
				if size != 0 && len(v) != size {
					return nil, fmt.Errorf("KRL: a %d-byte hash in a section of %d-byte hashes", len(v), size)
				}
				into[string(v)] = true
			}
		case krlSignature:
			signed = true
		default:
			return nil, fmt.Errorf("KRL: unknown section type %d", typ)
		}
	}
	return k, nil
}

func parseKRLCerts(s *reader) (krlCerts, error) {
	c := krlCerts{ca: string(s.str()), keyIDs: map[string]bool{}}
	s.str() // reserved
	if s.err != nil {
		return c, fmt.Errorf("KRL certificate section: %w", s.err)
	}
	if c.ca != "" {
		if _, err := gossh.ParsePublicKey([]byte(c.ca)); err != nil {
			return c, fmt.Errorf("KRL certificate section: the CA key: %w", err)
		}
	}
	for len(s.b) > 0 {
		typ := s.byte()
		body := s.str()
		if s.err != nil {
			return c, fmt.Errorf("KRL certificate subsection: %w", s.err)
		}
		sub := &reader{b: body}
		switch typ {
		case krlSerialList:
			for len(sub.b) > 0 {
				n := sub.uint64()
				c.serials = append(c.serials, serialRange{n, n})
			}
		case krlSerialRange:
			lo, hi := sub.uint64(), sub.uint64()
			if sub.err == nil && lo > hi {
				return c, fmt.Errorf("KRL: serial range %d-%d runs backwards", lo, hi)
			}
			c.serials = append(c.serials, serialRange{lo, hi})
		case krlSerialBitmap:
			offset := sub.uint64()
			bits := sub.str()
			if len(bits) > maxKRLBitmap {
				return c, fmt.Errorf("KRL: a serial bitmap of %d bytes", len(bits))
			}
			if len(bits) > 0 && bits[0]&0x80 != 0 {
				return c, errors.New("KRL: a negative serial bitmap")
			}
			c.bitmaps = append(c.bitmaps, serialBitmap{offset, new(big.Int).SetBytes(bits)})
		case krlKeyID:
			for len(sub.b) > 0 {
				id := sub.str()
				if sub.err == nil {
					c.keyIDs[string(id)] = true
				}
			}
		case krlExtension:
			// Reserved by OpenSSH: name, critical flag, contents. A
			// critical one is a meaning this reader does not know.
			sub.str()
			critical := sub.byte()
			if sub.err == nil && critical != 0 {
				return c, errors.New("KRL: a critical extension this bastion does not know")
			}
			sub.b = nil
		default:
			return c, fmt.Errorf("KRL: unknown certificate subsection type %#x", typ)
		}
		if sub.err != nil {
			return c, fmt.Errorf("KRL certificate subsection %#x: %w", typ, sub.err)
		}
		if len(sub.b) > 0 {
			return c, fmt.Errorf("KRL certificate subsection %#x: %d bytes left over", typ, len(sub.b))
		}
	}
	return c, nil
}

// Revoked reports why key is revoked, or "" if it is not. A certificate
// is revoked by its serial or key id under its CA, by its own key, or by
// its CA's key; a plain key by itself, by SHA-1 or by SHA-256 hash.
func (k *KRL) Revoked(key gossh.PublicKey) string {
	if k == nil {
		return ""
	}
	if cert, ok := key.(*gossh.Certificate); ok {
		if why := k.Revoked(cert.SignatureKey); why != "" {
			return "its CA's key is revoked"
		}
		if why := k.Revoked(cert.Key); why != "" {
			return why
		}
		ca := string(cert.SignatureKey.Marshal())
		for _, c := range k.certs {
			if c.ca != "" && c.ca != ca {
				continue
			}
			if c.keyIDs[cert.KeyId] {
				return fmt.Sprintf("certificate key id %q is revoked", cert.KeyId)
			}
			if c.ca == "" {
				continue // serials mean something only under one CA
			}
			for _, r := range c.serials {
				if cert.Serial >= r.lo && cert.Serial <= r.hi {
					return fmt.Sprintf("certificate serial %d is revoked", cert.Serial)
				}
			}
			for _, b := range c.bitmaps {
				if cert.Serial >= b.offset && cert.Serial-b.offset < uint64(b.bits.BitLen()) && b.bits.Bit(int(cert.Serial-b.offset)) == 1 {
					return fmt.Sprintf("certificate serial %d is revoked", cert.Serial)
				}
			}
		}
		return ""
	}
	blob := key.Marshal()
	h1, h256 := sha1.Sum(blob), sha256.Sum256(blob)
	if k.keys[string(blob)] || k.sha1[string(h1[:])] || k.sha256[string(h256[:])] {
		return "key " + gossh.FingerprintSHA256(key) + " is revoked"
	}
	return ""
}

// reader reads SSH wire encoding, keeping its first error.
type reader struct {
	b   []byte
	err error
}

var errShort = errors.New("cut short")

func (r *reader) take(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || len(r.b) < n {
		r.err, r.b = errShort, nil
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) byte() byte {
	if v := r.take(1); v != nil {
		return v[0]
	}
	return 0
}

func (r *reader) uint32() uint32 {
	if v := r.take(4); v != nil {
		return binary.BigEndian.Uint32(v)
	}
	return 0
}

func (r *reader) uint64() uint64 {
	if v := r.take(8); v != nil {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

func (r *reader) str() []byte {
	n := r.uint32()
	if r.err != nil {
		return nil
	}
	if uint64(n) > uint64(len(r.b)) {
		r.err, r.b = errShort, nil
		return nil
	}
	return r.take(int(n))
}

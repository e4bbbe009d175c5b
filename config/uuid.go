package config

import (
	"crypto/sha1"
	"encoding/hex"
	"fmt"
)

// bdevNamespace is the fixed namespace of name-based bdev UUIDs. It must never
// change: guests (and udev's /dev/disk/by-id links) identify disks by it.
var bdevNamespace = [16]byte{
	0x5f, 0x0e, 0x6b, 0x1c, 0x93, 0x2d, 0x4a, 0x57,
	0xb8, 0x61, 0x0c, 0x3e, 0x7a, 0xd4, 0x29, 0x8f,
}

// BdevUUID is the UUID a bdev called name gets when the configuration gives
// none: the RFC 9562 version 5 (SHA-1, name-based) UUID of name in a fixed
// project namespace, so a disk keeps its identity across restarts.
func BdevUUID(name string) [16]byte {
	h := sha1.New()
	h.Write(bdevNamespace[:])
	h.Write([]byte(name))
	var u [16]byte
	copy(u[:], h.Sum(nil))
	u[6] = u[6]&0x0f | 0x50 // version 5
	u[8] = u[8]&0x3f | 0x80 // RFC 9562 variant
	return u
}

// FormatUUID writes u in the canonical 8-4-4-4-12 lower-case hex form.
func FormatUUID(u [16]byte) string {
	var b [36]byte
	hex.Encode(b[0:8], u[0:4])
	b[8] = '-'
	hex.Encode(b[9:13], u[4:6])
	b[13] = '-'
	hex.Encode(b[14:18], u[6:8])
	b[18] = '-'
	hex.Encode(b[19:23], u[8:10])
	b[23] = '-'
	hex.Encode(b[24:36], u[10:16])
	return string(b[:])
}

// ParseUUID accepts only the canonical 8-4-4-4-12 hex form (either case).
func ParseUUID(s string) ([16]byte, error) {
	var u [16]byte
	if len(s) != 36 || s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-' {
		return u, fmt.Errorf("%q is not a UUID in the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", s)
	}
	digits := s[0:8] + s[9:13] + s[14:18] + s[19:23] + s[24:36]
	if _, err := hex.Decode(u[:], []byte(digits)); err != nil {
		return u, fmt.Errorf("%q is not a UUID in the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", s)
	}
	return u, nil
}

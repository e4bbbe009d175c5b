package scsi

import (
	"encoding/binary"
	"testing"
)

// Goal: READ CAPACITY reports the geometry exactly, saturating (10) on big
// devices, with LBPME/LBPRZ in (16). Method: decode the parameter data.

func rc16CDB(alloc uint32) []byte {
	b := make([]byte, 16)
	b[0], b[1] = opServiceActionIn16, saReadCapacity16
	binary.BigEndian.PutUint32(b[10:14], alloc)
	return b
}

func TestReadCapacity(t *testing.T) {
	for _, bs := range blockSizes {
		for _, tc := range []struct {
			blocks uint64
			last10 uint32
		}{
			{1000, 999},
			{1 << 32, 0xFFFFFFFF},
			{1<<32 + 1, 0xFFFFFFFF},
			{1 << 40, 0xFFFFFFFF},
		} {
			l := NewLUN(0, testInfo(bs, tc.blocks))
			d := exec(t, l, 8, opReadCapacity10, 0, 0, 0, 0, 0, 0, 0, 0, 0)
			if len(d) != 8 || binary.BigEndian.Uint32(d[0:4]) != tc.last10 || binary.BigEndian.Uint32(d[4:8]) != bs {
				t.Fatalf("RC10 blocks %d: % x", tc.blocks, d)
			}
			d = exec(t, l, 32, rc16CDB(32)...)
			if len(d) != 32 || binary.BigEndian.Uint64(d[0:8]) != tc.blocks-1 || binary.BigEndian.Uint32(d[8:12]) != bs {
				t.Fatalf("RC16 blocks %d: % x", tc.blocks, d)
			}
			if d[13] != 0 || d[14] != 0xC0 {
				t.Fatalf("RC16 exponent %#x provisioning %#x", d[13], d[14])
			}
		}
	}
}

func TestReadCapacity16Provisioning(t *testing.T) {
	for _, tc := range []struct {
		unmap, zeroes bool
		want          byte
	}{{false, false, 0}, {false, true, 0}, {true, false, 0x80}, {true, true, 0xC0}} {
		info := testInfo(512, 1000)
		info.Unmap, info.UnmapZeroes = tc.unmap, tc.zeroes
		d := exec(t, NewLUN(0, info), 32, rc16CDB(32)...)
		if d[14] != tc.want {
			t.Fatalf("unmap %v zeroes %v: byte 14 %#x", tc.unmap, tc.zeroes, d[14])
		}
	}
	// Truncated to the allocation length.
	d := exec(t, newTestLUN(512), 32, rc16CDB(12)...)
	if len(d) != 12 {
		t.Fatalf("alloc 12: %d bytes", len(d))
	}
}

func TestReadCapacity10PMI(t *testing.T) {
	l := newTestLUN(512)
	c := newCmd(DirIn, 8, 0)
	expectCheck(t, c, run(l, c, opReadCapacity10, 0, 0, 0, 0, 5, 0, 0, 0, 0), keyIllegalRequest, ascInvalidFieldInCDB)
	// PMI with an LBA is accepted (obsolete; we answer with the last LBA).
	exec(t, l, 8, opReadCapacity10, 0, 0, 0, 0, 5, 0, 0, 1, 0)
}

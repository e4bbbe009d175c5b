package scsi

import (
	"encoding/binary"
	"math"
)

// lastLBA returns the address of the last block (0 for an empty device, whose
// every access fails the range check anyway).
func (l *LUN) lastLBA() uint64 {
	if l.numBlocks == 0 {
		return 0
	}
	return l.numBlocks - 1
}

// runReadCapacity10 implements READ CAPACITY(10) (SBC-3 5.15). A device of
// 2^32 blocks or more reports 0xFFFFFFFF, which sends the initiator to
// READ CAPACITY(16).
func runReadCapacity10(l *LUN, c *Cmd) Action {
	cdb := &c.CDB
	pmi := cdb[8]&0x01 != 0
	lba := binary.BigEndian.Uint32(cdb[2:6])
	if !pmi && lba != 0 { // SBC-3 5.15.1: LOGICAL BLOCK ADDRESS must be zero when PMI is zero
		return c.invalidField()
	}
	b := c.Buf[:8]
	last := min(l.lastLBA(), math.MaxUint32)
	binary.BigEndian.PutUint32(b[0:4], uint32(last)) // RETURNED LOGICAL BLOCK ADDRESS
	binary.BigEndian.PutUint32(b[4:8], l.blockSize)  // LOGICAL BLOCK LENGTH IN BYTES
	return c.sendData(8, 8)                          // no allocation length: always 8 bytes
}

// readCapacity16Len is the length of READ CAPACITY(16) parameter data.
const readCapacity16Len = 32

// runReadCapacity16 implements READ CAPACITY(16) (SBC-3 5.16).
func runReadCapacity16(l *LUN, c *Cmd) Action {
	alloc := binary.BigEndian.Uint32(c.CDB[10:14])
	b := c.Buf[:readCapacity16Len]
	clear(b)
	binary.BigEndian.PutUint64(b[0:8], l.lastLBA())  // RETURNED LOGICAL BLOCK ADDRESS
	binary.BigEndian.PutUint32(b[8:12], l.blockSize) // LOGICAL BLOCK LENGTH IN BYTES
	// b[12]: no protection. b[13]: LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT 0.
	if l.info.Unmap {
		b[14] |= 0x80 // LBPME: logical block provisioning management enabled
		if l.info.UnmapZeroes {
			b[14] |= 0x40 // LBPRZ: unmapped blocks read as zeroes
		}
	}
	return c.sendData(readCapacity16Len, alloc)
}

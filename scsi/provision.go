package scsi

import (
	"encoding/binary"

	"vhost-target/bdev"
)

// maxUnmapDescs is the MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT: one UNMAP
// becomes one OpUnmap, which carries at most bdev.MaxRanges ranges inline.
const maxUnmapDescs = bdev.MaxRanges

const (
	unmapHeaderLen = 8  // UNMAP parameter list header (SBC-3 5.28.2)
	unmapDescLen   = 16 // UNMAP block descriptor
	// maxUnmapListLen is the longest UNMAP parameter list we accept.
	maxUnmapListLen = unmapHeaderLen + maxUnmapDescs*unmapDescLen
)

// runUnmap implements UNMAP (SBC-3 5.28). Zero-length descriptors are
// skipped; an UNMAP with nothing left to do is GOOD without I/O.
func runUnmap(l *LUN, c *Cmd) Action {
	cdb := &c.CDB
	if cdb[1]&0x01 != 0 { // ANCHOR: we have no anchored state
		return c.invalidField()
	}
	listLen := uint32(binary.BigEndian.Uint16(cdb[7:9]))
	if listLen == 0 { // SBC-3: no data transferred, not an error
		return c.good()
	}
	if listLen < unmapHeaderLen {
		return c.illegalRequest(ascParamListLength)
	}
	if c.DataLen < listLen || c.Dir != DirOut {
		return c.invalidField() // the buffer cannot hold what the CDB announces
	}
	// The header says how many descriptors follow; more than we advertise is
	// an invalid field, and only the advertised maximum is ever gathered.
	hdr, ok := c.gather(unmapHeaderLen)
	if !ok {
		return c.invalidField()
	}
	dataLen := uint32(binary.BigEndian.Uint16(hdr[0:2]))   // UNMAP DATA LENGTH: bytes after byte 1
	descBytes := uint32(binary.BigEndian.Uint16(hdr[2:4])) // UNMAP BLOCK DESCRIPTOR DATA LENGTH
	if descBytes%unmapDescLen != 0 || descBytes > listLen-unmapHeaderLen || dataLen < descBytes+unmapHeaderLen-2 {
		return c.illegalRequest(ascParamListLength)
	}
	if descBytes/unmapDescLen > maxUnmapDescs {
		return c.illegalRequest(ascInvalidFieldInParamList)
	}
	b, ok := c.gather(unmapHeaderLen + descBytes)
	if !ok {
		return c.invalidField()
	}
	var total uint64 // at most 32 * (2^32-1): cannot overflow
	nr := 0
	for off := uint32(unmapHeaderLen); off < unmapHeaderLen+descBytes; off += unmapDescLen {
		lba := binary.BigEndian.Uint64(b[off : off+8])
		blocks := uint64(binary.BigEndian.Uint32(b[off+8 : off+12]))
		if blocks == 0 { // SBC-3 5.28.2: not an error, nothing to unmap
			continue
		}
		if !l.checkRange(lba, blocks) {
			return c.illegalRequest(ascLBAOutOfRange)
		}
		total += blocks
		c.IO.Ranges[nr] = bdev.Range{Offset: lba << l.blockShift, Len: blocks << l.blockShift}
		nr++
	}
	if total > maxUnmapBlocks {
		return c.illegalRequest(ascInvalidFieldInParamList)
	}
	if nr == 0 {
		return c.good()
	}
	c.IO.Op = bdev.OpUnmap
	c.IO.NRanges = nr
	return c.submit(listLen)
}

func runWriteSame10(l *LUN, c *Cmd) Action {
	cdb := &c.CDB
	if cdb[1]&0x06 != 0 { // PBDATA, LBDATA: obsolete block-address patterns
		return c.invalidField()
	}
	return l.writeSame(c, uint64(binary.BigEndian.Uint32(cdb[2:6])), uint64(binary.BigEndian.Uint16(cdb[7:9])), false)
}

func runWriteSame16(l *LUN, c *Cmd) Action {
	cdb := &c.CDB
	if cdb[1]&0x06 != 0 { // bits 2-1 reserved (obsolete)
		return c.invalidField()
	}
	return l.writeSame(c, binary.BigEndian.Uint64(cdb[2:10]), uint64(binary.BigEndian.Uint32(cdb[10:14])),
		cdb[1]&0x01 != 0)
}

// writeSame implements WRITE SAME(10/16) (SBC-3 5.41, 5.42):
//
//   - UNMAP=1 with a zero block on a LUN that unmaps to zeroes → OpUnmap
//     (the blocks then read back as the pattern, as SBC requires);
//   - otherwise a zero block (or NDOB, no data-out buffer) → OpWriteZeroes;
//   - otherwise → OpWriteSame with the block copied into the Cmd.
//
// NUMBER OF LOGICAL BLOCKS zero ("to the end") is refused: the Block Limits
// page says WSNZ=1. ANCHOR is refused: we keep no anchored state.
func (l *LUN) writeSame(c *Cmd, lba, blocks uint64, ndob bool) Action {
	cdb := &c.CDB
	if cdb[1]&0xE0 != 0 || cdb[1]&0x10 != 0 { // WRPROTECT, ANCHOR
		return c.invalidField()
	}
	unmap := cdb[1]&0x08 != 0
	if blocks == 0 {
		return c.invalidField()
	}
	if !l.checkRange(lba, blocks) {
		return c.illegalRequest(ascLBAOutOfRange)
	}
	if blocks > uint64(l.maxWriteSameBlocks) {
		return c.invalidField()
	}
	zero, xfer := true, uint32(0)
	if !ndob {
		bs := l.blockSize
		if c.Dir != DirOut || c.DataLen < bs {
			return c.invalidField()
		}
		block, ok := c.gather(bs)
		if !ok {
			return c.invalidField()
		}
		// Copy the block out of Buf (which may be shared) and out of guest
		// memory (which the guest may rewrite): the decision below and the
		// data written are taken from the same bytes.
		copy(c.pattern[:bs], block)
		zero = allZero(c.pattern[:bs])
		xfer = bs
	}
	c.IO.Offset = lba << l.blockShift
	c.IO.Len = blocks << l.blockShift
	switch {
	case zero && unmap && l.info.Unmap && l.info.UnmapZeroes:
		c.IO.Op = bdev.OpUnmap
		c.IO.Ranges[0] = bdev.Range{Offset: c.IO.Offset, Len: c.IO.Len}
		c.IO.NRanges = 1
	case zero:
		c.IO.Op = bdev.OpWriteZeroes
	default:
		c.IO.Op = bdev.OpWriteSame
		c.patternIov[0] = c.pattern[:l.blockSize]
		c.IO.Iov = c.patternIov[:]
	}
	return c.submit(xfer)
}

// allZero reports whether b holds only zero bytes.
func allZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

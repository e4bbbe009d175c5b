package scsi

import (
	"encoding/binary"

	"vhost-target/bdev"
)

// The READ and WRITE commands only decode their CDB (SBC-3 5.8-5.12,
// 5.32-5.36) and call readWrite, which holds every check.

func runRead6(l *LUN, c *Cmd) Action {
	lba, blocks := decodeRW6(&c.CDB)
	return l.readWrite(c, bdev.OpRead, lba, blocks)
}

func runWrite6(l *LUN, c *Cmd) Action {
	lba, blocks := decodeRW6(&c.CDB)
	return l.readWrite(c, bdev.OpWrite, lba, blocks)
}

// decodeRW6 decodes READ(6)/WRITE(6): a 21-bit LBA and an 8-bit TRANSFER
// LENGTH in which 0 means 256 blocks (SBC-3 5.10).
func decodeRW6(cdb *[32]byte) (lba uint64, blocks uint32) {
	lba = uint64(cdb[1]&0x1F)<<16 | uint64(cdb[2])<<8 | uint64(cdb[3])
	blocks = uint32(cdb[4])
	if blocks == 0 {
		blocks = 256
	}
	return lba, blocks
}

func runRead10(l *LUN, c *Cmd) Action {
	return l.readWriteFlags(c, bdev.OpRead,
		uint64(binary.BigEndian.Uint32(c.CDB[2:6])), uint32(binary.BigEndian.Uint16(c.CDB[7:9])))
}

func runWrite10(l *LUN, c *Cmd) Action {
	return l.readWriteFlags(c, bdev.OpWrite,
		uint64(binary.BigEndian.Uint32(c.CDB[2:6])), uint32(binary.BigEndian.Uint16(c.CDB[7:9])))
}

func runRead12(l *LUN, c *Cmd) Action {
	return l.readWriteFlags(c, bdev.OpRead,
		uint64(binary.BigEndian.Uint32(c.CDB[2:6])), binary.BigEndian.Uint32(c.CDB[6:10]))
}

func runWrite12(l *LUN, c *Cmd) Action {
	return l.readWriteFlags(c, bdev.OpWrite,
		uint64(binary.BigEndian.Uint32(c.CDB[2:6])), binary.BigEndian.Uint32(c.CDB[6:10]))
}

func runRead16(l *LUN, c *Cmd) Action {
	return l.readWriteFlags(c, bdev.OpRead,
		binary.BigEndian.Uint64(c.CDB[2:10]), binary.BigEndian.Uint32(c.CDB[10:14]))
}

func runWrite16(l *LUN, c *Cmd) Action {
	return l.readWriteFlags(c, bdev.OpWrite,
		binary.BigEndian.Uint64(c.CDB[2:10]), binary.BigEndian.Uint32(c.CDB[10:14]))
}

// readWriteFlags checks byte 1 of READ/WRITE(10/12/16). RDPROTECT/WRPROTECT
// (bits 7-5) must be zero: the LUN has no protection information (SBC-3
// 5.11). DPO and FUA are accepted and ignored; FUA is safe to ignore only
// because MODE SENSE reports DPOFUA=0, so Linux never sets it and issues
// SYNCHRONIZE CACHE instead.
func (l *LUN) readWriteFlags(c *Cmd, op bdev.Op, lba uint64, blocks uint32) Action {
	if c.CDB[1]&0xE0 != 0 {
		return c.invalidField()
	}
	return l.readWrite(c, op, lba, blocks)
}

// checkRange reports whether blocks blocks at lba lie inside the device.
// Written as lba >= n || n-lba < blocks, it cannot overflow for any lba.
// A zero-length range must still start inside the device.
func (l *LUN) checkRange(lba, blocks uint64) bool {
	return !(lba >= l.numBlocks || l.numBlocks-lba < blocks)
}

// readWrite is where every READ and WRITE ends up (SPDK's
// bdev_scsi_readwrite). Order: range, zero length, size limit, direction,
// buffer size.
//
// Buffer sizing: a buffer smaller than the transfer is refused with INVALID
// FIELD IN CDB (a partial transfer would hand the bdev a length that is not a
// whole number of blocks); a larger buffer moves the blocks and reports the
// excess in Resid.
func (l *LUN) readWrite(c *Cmd, op bdev.Op, lba uint64, blocks uint32) Action {
	if !l.checkRange(lba, uint64(blocks)) {
		return c.illegalRequest(ascLBAOutOfRange)
	}
	if blocks == 0 { // SBC-3: a TRANSFER LENGTH of zero is not an error
		return c.good()
	}
	if blocks > l.maxTransferBlocks { // advertised in the Block Limits page
		return c.invalidField()
	}
	want := DirIn
	if op == bdev.OpWrite {
		want = DirOut
	}
	if c.Dir != want {
		return c.invalidField()
	}
	// Cannot overflow: blocks <= maxTransferBlocks, so n <= MaxTransferBytes.
	n := blocks << l.blockShift
	if c.DataLen < n {
		return c.invalidField()
	}
	iov, ok := c.dataPrefix(n)
	if !ok {
		return c.invalidField()
	}
	c.IO.Op = op
	c.IO.Offset = lba << l.blockShift // cannot overflow: lba < numBlocks, clamped in NewLUN
	c.IO.Len = uint64(n)
	c.IO.Iov = iov
	return c.submit(n)
}

// submit marks c as waiting for its IO, which moves xfer data bytes.
func (c *Cmd) submit(xfer uint32) Action {
	c.xfer = xfer
	c.pending = true
	return ActionIO
}

func runSyncCache10(l *LUN, c *Cmd) Action {
	return l.syncCache(c, uint64(binary.BigEndian.Uint32(c.CDB[2:6])), uint64(binary.BigEndian.Uint16(c.CDB[7:9])))
}

func runSyncCache16(l *LUN, c *Cmd) Action {
	return l.syncCache(c, binary.BigEndian.Uint64(c.CDB[2:10]), uint64(binary.BigEndian.Uint32(c.CDB[10:14])))
}

// syncCache implements SYNCHRONIZE CACHE(10/16) (SBC-3 5.22) as a bdev
// flush of the whole device; the range is checked (NUMBER OF LOGICAL BLOCKS
// zero means "to the last block") and reported in IO.Offset/Len. IMMED is
// accepted: we answer when the flush is done, which is always allowed.
func (l *LUN) syncCache(c *Cmd, lba, blocks uint64) Action {
	if lba >= l.numBlocks {
		return c.illegalRequest(ascLBAOutOfRange)
	}
	if blocks == 0 {
		blocks = l.numBlocks - lba
	}
	if !l.checkRange(lba, blocks) {
		return c.illegalRequest(ascLBAOutOfRange)
	}
	c.IO.Op = bdev.OpFlush
	c.IO.Offset = lba << l.blockShift
	c.IO.Len = blocks << l.blockShift
	return c.submit(0)
}

func runVerify10(l *LUN, c *Cmd) Action {
	return l.verify(c, uint64(binary.BigEndian.Uint32(c.CDB[2:6])), uint64(binary.BigEndian.Uint16(c.CDB[7:9])))
}

func runVerify16(l *LUN, c *Cmd) Action {
	return l.verify(c, binary.BigEndian.Uint64(c.CDB[2:10]), uint64(binary.BigEndian.Uint32(c.CDB[10:14])))
}

// verify implements VERIFY(10/16) (SBC-3 5.25) with BYTCHK=0: the medium
// check is a range check, since a bdev either reads a block or fails it and
// we keep no checksums. BYTCHK≠0 (compare with data-out) is refused with
// INVALID FIELD IN CDB rather than emulated with a read, as no initiator we
// serve depends on it; VRPROTECT must be zero (no protection information).
func (l *LUN) verify(c *Cmd, lba, blocks uint64) Action {
	if c.CDB[1]&0xE0 != 0 || c.CDB[1]&0x06 != 0 {
		return c.invalidField()
	}
	if !l.checkRange(lba, blocks) {
		return c.illegalRequest(ascLBAOutOfRange)
	}
	return c.good()
}

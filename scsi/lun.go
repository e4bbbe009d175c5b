package scsi

import (
	"encoding/hex"
	"math"
	"math/bits"

	"vhost-target/bdev"
)

const (
	// maxUnmapBlocks is the MAXIMUM UNMAP LBA COUNT of the Block Limits VPD
	// page: the most blocks one UNMAP may deallocate (SPDK's 4 Mi LBAs).
	maxUnmapBlocks = 1 << 22
	// maxWriteSameBytes bounds one WRITE SAME, so a write-zeroes emulated by
	// writing stays well inside the initiator's command timeout.
	maxWriteSameBytes = 256 << 20
)

// LUN is one logical unit: a direct-access block device over a bdev. It holds
// only the bdev's geometry, so it is immutable and may be used by any number
// of goroutines at once.
type LUN struct {
	id   uint16
	info *bdev.Info

	blockSize  uint32
	blockShift uint
	// numBlocks is Info.NumBlocks, clamped so numBlocks<<blockShift fits in
	// a uint64: every byte offset computed from a checked LBA is exact.
	numBlocks          uint64
	maxTransferBlocks  uint32
	maxWriteSameBlocks uint32

	// serial is the Unit Serial Number: the UUID in lower-case hex.
	serial [32]byte
	// self lets a LUN executed outside a Target answer REPORT LUNS.
	self [1]*LUN
}

// NewLUN builds a LUN over a bdev's Info. id is the LUN number (0..16383).
// Only Info is needed: the LUN never touches the bdev itself.
//
// NewLUN panics if info is nil or its BlockSize is not a power of two from
// 512 to 4096: bdevs validate their geometry when they are opened, so this
// is a programming error, not a configuration one.
func NewLUN(id uint16, info *bdev.Info) *LUN {
	if info == nil {
		panic("scsi: NewLUN with nil Info")
	}
	bs := info.BlockSize
	if bs < 512 || bs > maxPatternBytes || bs&(bs-1) != 0 {
		panic("scsi: NewLUN: block size must be a power of two from 512 to 4096")
	}
	l := &LUN{id: id, info: info, blockSize: bs}
	l.blockShift = uint(bits.TrailingZeros32(bs))
	l.numBlocks = min(info.NumBlocks, math.MaxUint64>>l.blockShift)
	l.maxTransferBlocks = MaxTransferBytes >> l.blockShift
	l.maxWriteSameBlocks = maxWriteSameBytes >> l.blockShift
	hex.Encode(l.serial[:], info.UUID[:])
	l.self[0] = l
	return l
}

// ID returns the LUN number.
func (l *LUN) ID() uint16 { return l.id }

// Info returns the bdev Info the LUN was built over.
func (l *LUN) Info() *bdev.Info { return l.info }

// supports reports whether command e exists on this LUN: UNMAP exists only
// when the bdev can deallocate, so that an initiator probing with it, or
// with REPORT SUPPORTED OPERATION CODES, learns the same answer.
func (l *LUN) supports(e *command) bool {
	return e.flags&flagUnmap == 0 || l.info.Unmap
}

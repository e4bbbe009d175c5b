package virtq

import (
	"errors"
	"fmt"
)

// Errors of New: the front-end gave a ring we refuse to start.
var (
	// ErrQueueSize: the queue size is 0, not a power of two, or above MaxSize (virtio 1.2 §2.7).
	ErrQueueSize = errors.New("virtq: invalid queue size")
	// ErrDescAlign: the descriptor table is not 16-byte aligned (virtio 1.2 §2.7, alignment table).
	ErrDescAlign = errors.New("virtq: descriptor table misaligned")
	// ErrAvailAlign: the available ring is not 4-byte aligned. The spec only asks for 2; we need 4 to read
	// {flags, idx} with one 32-bit atomic load, and every known driver (Linux, Windows, SPDK, QEMU's layout)
	// places it right after the 16-aligned descriptor table.
	ErrAvailAlign = errors.New("virtq: available ring not 4-byte aligned")
	// ErrUsedAlign: the used ring is not 4-byte aligned (virtio 1.2 §2.7).
	ErrUsedAlign = errors.New("virtq: used ring misaligned")
	// ErrRingUnmapped: a ring does not lie inside one guest memory region.
	ErrRingUnmapped = errors.New("virtq: ring outside guest memory")
	// ErrHostAlign: a ring's host address is not 4-byte aligned even though its UVA is (region mmap_offset and
	// UVA disagree modulo 4), so atomic access is impossible.
	ErrHostAlign = errors.New("virtq: ring host address misaligned")
	// ErrInflightRegion: the inflight region given for the ring (SET_INFLIGHT_FD) is too small for its size or
	// not 8-byte aligned.
	ErrInflightRegion = errors.New("virtq: inflight region too small or misaligned")
)

// Errors that mean the ring itself is broken: Pop returns them (not wrapped in ChainError) and keeps returning
// them; the caller stops the queue and marks the device broken (SET_VRING_ERR).
var (
	// ErrAvailAhead: the driver's avail index is more than the queue size ahead of the next index we process,
	// or moved backwards; processing it would hand out stale heads forever (rust-vmm AvailIter::new).
	ErrAvailAhead = errors.New("virtq: avail index ahead of queue")
	// ErrHeadIndex: the avail ring names a head descriptor ≥ queue size (QEMU "Guest says index %u is available").
	ErrHeadIndex = errors.New("virtq: avail ring head index out of range")
)

// Errors of one malformed chain, returned inside *ChainError: the caller completes that head with length 0.
var (
	// ErrDescIndex: a next field points at or past the end of the descriptor (or indirect) table.
	ErrDescIndex = errors.New("virtq: descriptor index out of range")
	// ErrChainLoop: a chain has more descriptors than its table holds, so it loops (virtio 1.2 §2.7.5.2).
	ErrChainLoop = errors.New("virtq: descriptor chain loops")
	// ErrIndirectNotNegotiated: VIRTQ_DESC_F_INDIRECT without VIRTIO_RING_F_INDIRECT_DESC.
	ErrIndirectNotNegotiated = errors.New("virtq: indirect descriptor not negotiated")
	// ErrIndirectLen: an indirect table length is 0, not a multiple of 16, or above MaxSize descriptors.
	ErrIndirectLen = errors.New("virtq: bad indirect table length")
	// ErrNestedIndirect: an indirect table contains an indirect descriptor (virtio 1.2 §2.7.5.3.1).
	ErrNestedIndirect = errors.New("virtq: indirect descriptor inside an indirect table")
	// ErrIndirectNext: a descriptor has both INDIRECT and NEXT (virtio 1.2 §2.7.5.3.1 "MUST NOT set both").
	ErrIndirectNext = errors.New("virtq: indirect descriptor with next flag")
	// ErrIndirectUnmapped: an indirect table does not lie inside one guest memory region (QEMU: "Cannot map
	// indirect buffer").
	ErrIndirectUnmapped = errors.New("virtq: indirect table outside guest memory")
	// ErrReadAfterWrite: a device-readable descriptor follows a device-writable one (virtio 1.2 §2.7.4,
	// "Message Framing": the driver places device-writable elements after device-readable ones).
	ErrReadAfterWrite = errors.New("virtq: readable descriptor after writable one")
	// ErrZeroLength: a data descriptor has length 0. QEMU rejects these ("zero sized buffers are not allowed")
	// and no driver that works with QEMU sends them, so we do too, which keeps every segment non-empty.
	ErrZeroLength = errors.New("virtq: zero-length descriptor")
	// ErrBufferUnmapped: a descriptor's buffer is not entirely in guest memory, or addr+len overflows.
	ErrBufferUnmapped = errors.New("virtq: descriptor buffer outside guest memory")
	// ErrChainBytes: the chain's total length exceeds 2^32-1 (virtio 1.2 §2.7.5.2).
	ErrChainBytes = errors.New("virtq: descriptor chain longer than 4 GiB")
	// ErrTooManySegments: the chain needs more than MaxSegments host segments.
	ErrTooManySegments = errors.New("virtq: descriptor chain has too many segments")
)

// ChainError reports one malformed chain. The head has been consumed: complete it with length 0.
type ChainError struct {
	Head     uint16 // chain head, to complete with Push(Head, 0)
	Desc     uint16 // index of the offending descriptor in its table
	Indirect bool   // Desc indexes the indirect table
	Addr     uint64 // the offending descriptor's addr field
	Len      uint32 // and its len field
	Err      error  // one of the chain errors above
	Cause    error  // the guestmem error behind ErrBufferUnmapped/ErrIndirectUnmapped, else nil
}

func (e *ChainError) Error() string {
	where := "desc"
	if e.Indirect {
		where = "indirect desc"
	}
	s := fmt.Sprintf("virtq: chain %d, %s %d (addr %#x len %#x): %v", e.Head, where, e.Desc, e.Addr, e.Len, e.Err)
	if e.Cause != nil {
		s += ": " + e.Cause.Error()
	}
	return s
}

// Unwrap lets errors.Is match both the chain error and the guestmem cause.
func (e *ChainError) Unwrap() []error {
	if e.Cause == nil {
		return []error{e.Err}
	}
	return []error{e.Err, e.Cause}
}

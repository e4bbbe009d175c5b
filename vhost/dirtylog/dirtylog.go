// Package dirtylog is the vhost-user dirty page log (VHOST_F_LOG_ALL with
// protocol feature LOG_SHMFD): a bitmap the front-end shares with us, one
// bit per 4 KiB page of guest-physical address space. While a VM migrates,
// the back-end sets the bit of every page it writes (data read from a bdev
// into guest buffers, response headers, used rings), after the write, and
// QEMU copies those pages to the destination again.
//
// A Log has no state but the mapping: Mark is safe from any goroutine and
// allocates nothing. The bitmap's layout is QEMU's (hw/virtio/vhost.c,
// vhost_dev_sync_region): page p is bit p%8 of byte p/8, which QEMU reads
// as little-endian 64-bit words and clears with an atomic exchange.
package dirtylog

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// PageSize is the guest memory covered by one bit (VHOST_LOG_PAGE).
const PageSize = 4096

// MaxBytes bounds a log: 1 GiB of bitmap covers 32 TiB of guest memory.
const MaxBytes = 1 << 30

// Errors from Map, wrapped with the values that failed.
var (
	ErrSize   = errors.New("dirtylog: log size")
	ErrOffset = errors.New("dirtylog: log offset")
	ErrFile   = errors.New("dirtylog: log fd")
)

// Log is a mapped dirty page bitmap.
type Log struct {
	mapping []byte   // what Map mapped; nil for FromBytes
	words   []uint32 // the bitmap as 32-bit words (its length is a multiple of 4 bytes)
	pages   uint64   // pages the bitmap covers
}

// Map maps size bytes at offset of fd (SET_LOG_BASE). The fd must be a
// regular file (QEMU's is a sealed memfd) that holds offset+size bytes, so
// that a mark cannot SIGBUS the reactor that makes it; the log's start must
// be 8-byte aligned (QEMU's words) and its size a multiple of 8. Map does
// not keep fd.
func Map(fd int, size, offset uint64) (*Log, error) {
	switch {
	case size == 0 || size%8 != 0 || size > MaxBytes:
		return nil, fmt.Errorf("%w: %d bytes (a multiple of 8, at most %d)", ErrSize, size, MaxBytes)
	case offset%8 != 0 || offset > math.MaxInt-size:
		return nil, fmt.Errorf("%w: %#x", ErrOffset, offset)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("%w: fstat: %w", ErrFile, err)
	}
	end := offset + size
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Size < 0 || uint64(st.Size) < end {
		return nil, fmt.Errorf("%w: not a file of at least %d bytes (mode %#o, %d bytes)", ErrFile, end, st.Mode, st.Size)
	}
	m, err := unix.Mmap(fd, 0, int(end), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("%w: mmap %d bytes: %w", ErrFile, end, err)
	}
	l := FromBytes(m[offset:end:end])
	l.mapping = m
	return l, nil
}

// FromBytes uses b as the bitmap (tests, and callers that own the memory).
// b must be 4-byte aligned; its length is rounded down to a multiple of 4.
func FromBytes(b []byte) *Log {
	n := len(b) / 4
	if n == 0 {
		return &Log{}
	}
	if uintptr(unsafe.Pointer(&b[0]))%4 != 0 {
		panic("dirtylog: bitmap not 4-byte aligned")
	}
	return &Log{words: unsafe.Slice((*uint32)(unsafe.Pointer(&b[0])), n), pages: uint64(n) * 32}
}

// Pages returns how many pages of guest-physical memory the log covers.
func (l *Log) Pages() uint64 { return l.pages }

// Mark sets the bits of every page that [gpa, gpa+n) touches. Call it after
// the write: the atomic OR also orders the write before it, so a front-end
// that clears the bit and then copies the page sees the data. Pages beyond
// the log are not marked (the front-end sizes the log to its memory; a
// guest address beyond it was refused by the memory table already).
func (l *Log) Mark(gpa, n uint64) {
	if n == 0 {
		return
	}
	first := gpa / PageSize
	last := first + (gpa%PageSize+n-1)/PageSize // no overflow: gpa%PageSize+n-1 < 2^64 for n ≤ 2^63
	if n > math.MaxInt64 || last >= l.pages {
		last = l.pages - 1 // also covers l.pages == 0: the loop below does not run
		if l.pages == 0 {
			return
		}
	}
	for p := first; p <= last; p++ {
		atomic.OrUint32(&l.words[p/32], bit(p))
	}
}

// Marked reports whether page p's bit is set (tests, diagnostics).
func (l *Log) Marked(p uint64) bool {
	return p < l.pages && atomic.LoadUint32(&l.words[p/32])&bit(p) != 0
}

// bit is page p's bit in its 32-bit word: bit p%8 of byte p/8, whatever the
// host's byte order.
func bit(p uint64) uint32 {
	var b [4]byte
	b[(p/8)%4] = 1 << (p % 8)
	return binary.NativeEndian.Uint32(b[:])
}

// Close unmaps a mapped log. Marks must have stopped.
func (l *Log) Close() error {
	if l == nil || l.mapping == nil {
		return nil
	}
	err := unix.Munmap(l.mapping)
	l.mapping, l.words, l.pages = nil, nil, 0
	return err
}

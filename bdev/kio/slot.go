package kio

import (
	"unsafe"

	"golang.org/x/sys/unix"

	"vhost-target/bdev"
)

// Kind is the kind of one kernel operation.
type Kind uint8

const (
	KindNone      Kind = iota
	KindRead           // preadv(Iovecs[:NIov], Off)
	KindWrite          // pwritev(Iovecs[:NIov], Off)
	KindSync           // fdatasync
	KindPunch          // fallocate(PUNCH_HOLE|KEEP_SIZE, Off, Len)
	KindZeroRange      // fallocate(ZERO_RANGE|KEEP_SIZE, Off, Len)
	KindDiscard        // ioctl(BLKDISCARD, {Off, Len})
	KindZeroOut        // ioctl(BLKZEROOUT, {Off, Len})
)

// Limits of one slot.
const (
	// MaxIovecs bounds the segments of an IO sent straight to the kernel
	// (IOV_MAX is 1024; vhost chains have at most 130 segments). An IO with
	// more goes through a bounce buffer.
	MaxIovecs = 256
	// BounceBytes is the size of one bounce buffer. A larger unaligned IO
	// (or a WRITE SAME or zero-write) is done in BounceBytes steps.
	BounceBytes = 256 << 10
	// RetryMax bounds the retries of an operation the kernel answers with
	// EAGAIN, ENOMEM or EINTR; after that the IO fails with bdev.ErrBusy, so
	// the initiator retries it instead of waiting forever.
	RetryMax = 10000
)

// Op is the kernel operation a slot wants done next.
type Op struct {
	Kind Kind
	Off  uint64
	Len  uint64 // bytes: for read/write the sum of Iovecs[:NIov]
	NIov int
}

// Slot is one IO in flight on a kernel-backed bdev: the state machine that
// turns the IO into a sequence of kernel operations. An engine calls Next for
// the operation to run, runs it, and gives the result to Advance until
// Advance says the IO is done. Slots are preallocated per channel.
type Slot struct {
	IO    *bdev.IO
	Index int // position in the channel's slot array (io_uring user_data, iocb aio_data)
	K     Op  // the operation prepared by Next

	// Iovecs are read by the kernel when K is submitted; they point into guest
	// memory or the bounce buffer, never into the Go heap.
	Iovecs [MaxIovecs]unix.Iovec

	// Done receives the slot when a pool worker has finished it.
	Done Completions

	b       *Backing
	bounce  []byte // nil for IOs done straight into guest memory
	direct  bool   // read/write straight into guest memory
	filled  bool   // write same: the bounce buffer holds the pattern
	zeroFB  bool   // write zeroes by writing zero buffers
	done    uint64 // bytes of the IO completed
	rng     int    // unmap: next range
	seg     int    // guest iov cursor: segment index ...
	segOff  int    // ... and offset inside it (bytes done so far)
	retries int
}

// Completions is where pool workers hand finished slots back to the channel
// that owns them. reactor.Ring[*Slot] implements it.
type Completions interface {
	Push(s *Slot) bool
}

// Check validates io against the backing store before it takes a slot
// (bdev.Check against the size served now: one atomic load, so an IO
// checked after a Resize sees the new size).
func Check(b *Backing, io *bdev.IO) (now bool) {
	return bdev.Check(io, b.BlockSize, b.size.Load(), b.ReadOnly)
}

// NeedsBounce reports whether io (checked by Check) needs a bounce buffer:
// WRITE SAME always (the pattern is repeated into it), reads and writes whose
// guest buffers miss the direct-I/O alignment or have too many segments.
func NeedsBounce(b *Backing, io *bdev.IO) bool {
	switch io.Op {
	case bdev.OpWriteSame:
		return true
	case bdev.OpRead, bdev.OpWrite:
	default:
		return false
	}
	memMask, lenMask := uintptr(b.MemAlign-1), uint64(b.OffsetAlign-1)
	left := io.Len
	n := 0
	for _, v := range io.Iov {
		if left == 0 {
			break
		}
		l := uint64(len(v))
		if l == 0 {
			continue
		}
		if l > left {
			l = left
		}
		if l&lenMask != 0 || uintptr(unsafe.Pointer(&v[0]))&memMask != 0 {
			return true
		}
		left -= l
		n++
	}
	return n > MaxIovecs
}

// Begin starts io (checked by Check) on the slot. bounce is a BounceBytes
// buffer, or nil when NeedsBounce said no.
func (s *Slot) Begin(b *Backing, io *bdev.IO, bounce []byte) {
	s.IO, s.b, s.bounce = io, b, bounce
	s.direct = bounce == nil
	s.filled, s.zeroFB = false, b.noZeroRange.Load()
	s.done, s.rng, s.seg, s.segOff, s.retries = 0, 0, 0, 0, 0
	s.K = Op{}
}

// Bounce returns the slot's bounce buffer (nil if none) and forgets it.
func (s *Slot) TakeBounce() []byte {
	b := s.bounce
	s.bounce = nil
	return b
}

// Next prepares s.K, the next kernel operation of the IO. For writes through
// a bounce buffer it copies the guest data in; it may be called again for the
// same step (a retry) with the same result.
func (s *Slot) Next() {
	io, b := s.IO, s.b
	switch io.Op {
	case bdev.OpRead, bdev.OpWrite:
		kind := KindRead
		if io.Op == bdev.OpWrite {
			kind = KindWrite
		}
		if s.direct {
			s.K = Op{Kind: kind, Off: io.Offset + s.done, Len: io.Len - s.done, NIov: s.guestIovecs()}
			return
		}
		n := min(io.Len-s.done, uint64(len(s.bounce)))
		if kind == KindWrite {
			s.peek(s.bounce[:n])
		}
		s.single(kind, io.Offset+s.done, s.bounce[:n])
	case bdev.OpFlush:
		s.K = Op{Kind: KindSync}
	case bdev.OpUnmap:
		for s.rng < io.NRanges && io.Ranges[s.rng].Len == 0 {
			s.rng++
		}
		r := io.Ranges[s.rng] // Advance finishes the IO before rng passes the last non-empty range
		kind := KindPunch
		if b.BlockDev {
			kind = KindDiscard
		}
		s.K = Op{Kind: kind, Off: r.Offset, Len: r.Len}
	case bdev.OpWriteZeroes:
		switch {
		case b.BlockDev:
			s.K = Op{Kind: KindZeroOut, Off: io.Offset, Len: io.Len}
		case !s.zeroFB:
			s.K = Op{Kind: KindZeroRange, Off: io.Offset, Len: io.Len}
		default:
			n := min(io.Len-s.done, uint64(len(b.zeroes)))
			s.single(KindWrite, io.Offset+s.done, b.zeroes[:n])
		}
	case bdev.OpWriteSame:
		bs := int(b.BlockSize)
		if !s.filled {
			pattern := io.Iov[0][:bs]
			for off := 0; off+bs <= len(s.bounce); off += bs {
				copy(s.bounce[off:off+bs], pattern)
			}
			s.filled = true
		}
		n := min(io.Len-s.done, uint64(len(s.bounce)/bs*bs))
		s.single(KindWrite, io.Offset+s.done, s.bounce[:n])
	}
}

func (s *Slot) single(kind Kind, off uint64, buf []byte) {
	s.Iovecs[0] = unix.Iovec{Base: &buf[0], Len: uint64(len(buf))}
	s.K = Op{Kind: kind, Off: off, Len: uint64(len(buf)), NIov: 1}
}

// guestIovecs points Iovecs at the guest buffers from the cursor on, up to
// io.Len, and returns how many it filled.
func (s *Slot) guestIovecs() int {
	left := s.IO.Len - s.done
	n := 0
	seg, off := s.seg, s.segOff
	for left > 0 && seg < len(s.IO.Iov) {
		v := s.IO.Iov[seg][off:]
		seg, off = seg+1, 0
		if len(v) == 0 {
			continue
		}
		if uint64(len(v)) > left {
			v = v[:left]
		}
		s.Iovecs[n] = unix.Iovec{Base: &v[0], Len: uint64(len(v))}
		n++
		left -= uint64(len(v))
	}
	return n
}

// peek copies guest bytes from the cursor into dst without moving the cursor.
func (s *Slot) peek(dst []byte) {
	seg, off := s.seg, s.segOff
	for len(dst) > 0 {
		c := copy(dst, s.IO.Iov[seg][off:])
		dst = dst[c:]
		seg, off = seg+1, 0
	}
}

// scatter copies src to the guest buffers at the cursor.
func (s *Slot) scatter(src []byte) {
	seg, off := s.seg, s.segOff
	for len(src) > 0 {
		c := copy(s.IO.Iov[seg][off:], src)
		src = src[c:]
		seg, off = seg+1, 0
	}
}

// skip moves the cursor n bytes on.
func (s *Slot) skip(n uint64) {
	for n > 0 {
		rest := uint64(len(s.IO.Iov[s.seg]) - s.segOff)
		if n < rest {
			s.segOff += int(n)
			return
		}
		n -= rest
		s.seg, s.segOff = s.seg+1, 0
	}
}

// Advance takes the result of s.K: res bytes (or 0) when errno is 0, else
// the error. It returns true when the IO is finished (s.IO.Err holds the
// result); false when the engine must call Next and run the next operation
// (or the same one again, after EAGAIN).
func (s *Slot) Advance(res int64, errno unix.Errno) bool {
	io, b := s.IO, s.b
	if errno != 0 {
		switch errno {
		case unix.EAGAIN, unix.ENOMEM, unix.EINTR:
			s.retries++
			if s.retries > RetryMax {
				io.Err = bdev.ErrBusy
				return true
			}
			return false
		case unix.EOPNOTSUPP, unix.EINVAL:
			if s.K.Kind == KindZeroRange {
				// The filesystem cannot zero ranges: write zero buffers from now on.
				b.noZeroRange.Store(true)
				s.zeroFB = true
				return false
			}
		}
		io.Err = MapErrno(s.K.Kind, errno)
		return true
	}
	s.retries = 0
	switch s.K.Kind {
	case KindRead, KindWrite:
		if res <= 0 || uint64(res) > s.K.Len {
			// End of file: the file was truncated under us (or the kernel
			// answered nonsense). The data is not there: a medium error.
			io.Err = bdev.ErrIO
			return true
		}
		if io.Op == bdev.OpRead || io.Op == bdev.OpWrite {
			if !s.direct && io.Op == bdev.OpRead {
				s.scatter(s.bounce[:res])
			}
			s.skip(uint64(res))
		}
		s.done += uint64(res)
		return s.done == io.Len
	case KindSync:
		return true
	case KindPunch, KindDiscard:
		s.rng++
		for s.rng < io.NRanges && io.Ranges[s.rng].Len == 0 {
			s.rng++
		}
		return s.rng == io.NRanges
	case KindZeroRange, KindZeroOut:
		return true
	}
	io.Err = bdev.ErrIO
	return true
}

// MapErrno turns a kernel error into the bdev error SCSI understands. Errnos
// without a bdev meaning are returned as themselves (a unix.Errno boxes
// without allocating) and become HARDWARE ERROR.
func MapErrno(kind Kind, e unix.Errno) error {
	switch e {
	case unix.EIO, unix.ENXIO, unix.ENODEV, unix.ESTALE, unix.EBADF, unix.EINVAL:
		// EINVAL: an unaligned offset after a truncated file's short read.
		return bdev.ErrIO
	case unix.ENOSPC, unix.EDQUOT:
		return bdev.ErrNoSpace
	case unix.EROFS, unix.EPERM:
		return bdev.ErrReadOnly
	case unix.EFBIG:
		return bdev.ErrRange
	case unix.EOPNOTSUPP:
		if kind == KindPunch || kind == KindDiscard {
			return bdev.ErrNotSup
		}
		return bdev.ErrIO
	}
	return e
}

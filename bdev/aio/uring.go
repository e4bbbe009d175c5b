package aio

import (
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"vhost-target/bdev/kio"
)

// io_uring ABI (include/uapi/linux/io_uring.h). x/sys/unix has only the
// syscall numbers, so the structures are declared here; the assertions
// below fail the build if a size is wrong.
type uringParams struct {
	sqEntries    uint32
	cqEntries    uint32
	flags        uint32
	sqThreadCPU  uint32
	sqThreadIdle uint32
	features     uint32
	wqFD         uint32
	resv         [3]uint32
	sqOff        sqringOffsets
	cqOff        cqringOffsets
}

type sqringOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type cqringOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

type uringSQE struct {
	opcode      uint8
	flags       uint8
	ioprio      uint16
	fd          int32
	off         uint64
	addr        uint64
	len         uint32
	opFlags     uint32 // rw_flags, fsync_flags, ...
	userData    uint64
	bufIndex    uint16
	personality uint16
	spliceFDIn  int32
	addr3       uint64
	pad2        uint64
}

type uringCQE struct {
	userData uint64
	res      int32
	flags    uint32
}

type uringProbe struct {
	lastOp uint8
	opsLen uint8
	resv   uint16
	resv2  [3]uint32
	ops    [256]uringProbeOp
}

type uringProbeOp struct {
	op    uint8
	resv  uint8
	flags uint16
	resv2 uint32
}

var (
	_ = [1]struct{}{}[unsafe.Sizeof(uringParams{})-120]
	_ = [1]struct{}{}[unsafe.Sizeof(uringSQE{})-64]
	_ = [1]struct{}{}[unsafe.Sizeof(uringCQE{})-16]
	_ = [1]struct{}{}[unsafe.Sizeof(uringProbeOp{})-8]
)

const (
	opReadv     = 1
	opWritev    = 2
	opFsync     = 3
	opFallocate = 17
	opRead      = 22 // 5.6+
	opWrite     = 23 // 5.6+

	sqeFixedFile = 1 << 0 // IOSQE_FIXED_FILE: fd is an index into the registered files

	fsyncDatasync = 1

	setupCoopTaskrun = 1 << 8
	setupTaskrunFlag = 1 << 9

	sqNeedWakeup = 1 << 0
	sqCQOverflow = 1 << 1
	sqTaskrun    = 1 << 2

	enterGetEvents = 1

	offSQRing = 0
	offCQRing = 0x8000000
	offSQEs   = 0x10000000

	registerFiles   = 2
	registerEventFD = 4
	registerProbe   = 8
	probeSupported  = 1
)

// uringSetup is io_uring_setup(2); tests replace it to simulate a kernel
// (or seccomp profile) that refuses io_uring.
var uringSetup = func(entries uint32, p *uringParams) (int, error) {
	fd, _, e := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(p)), 0)
	if e != 0 {
		return -1, e
	}
	return int(fd), nil
}

// uring is one io_uring instance: the engine of one channel, used only by
// the channel's reactor. Head and tail words shared with the kernel are
// read and written atomically.
type uring struct {
	fd                 int
	sqMem, cqMem, sqeM []byte
	sqHead, sqTail     *uint32
	sqFlags            *uint32
	sqMask             uint32
	sqArray            []uint32
	sqes               []uringSQE
	cqHead, cqTail     *uint32
	cqMask             uint32
	cqes               []uringCQE
	tail               uint32 // our SQ tail, published on flush
	pending            uint32 // SQEs queued and not yet taken by the kernel
	taskrun            bool   // completions need io_uring_enter(GETEVENTS) when sqTaskrun is set
	fallocate          bool   // IORING_OP_FALLOCATE is supported (5.6+)
	plainRW            bool   // IORING_OP_READ and IORING_OP_WRITE are supported (5.6+)
	fixedFD            int    // the fd registered as fixed file 0, or -1
	eventFD            int
}

func newURing(entries uint32) (*uring, error) {
	var p uringParams
	p.flags = setupCoopTaskrun | setupTaskrunFlag
	fd, err := uringSetup(entries, &p)
	if err == unix.EINVAL {
		// Before 5.19: no cooperative task running; completions then
		// interrupt the submitting thread instead.
		p = uringParams{}
		fd, err = uringSetup(entries, &p)
	}
	if err != nil {
		return nil, fmt.Errorf("io_uring_setup: %w", err)
	}
	u := &uring{fd: fd, taskrun: p.flags&setupTaskrunFlag != 0, fixedFD: -1, eventFD: -1}
	if err := u.mapRings(&p); err != nil {
		u.close()
		return nil, err
	}
	var pr uringProbe
	if u.probe(&pr) {
		u.fallocate = pr.supports(opFallocate)
		u.plainRW = pr.supports(opRead) && pr.supports(opWrite)
	}
	return u, nil
}

// registerFile makes fd the ring's fixed file 0, so that SQEs on it name
// the index (IOSQE_FIXED_FILE) and the kernel takes no file reference per
// request: fdget/fdput are atomic operations on the file's count in a
// multi-threaded process such as this one. On failure (a kernel or
// seccomp profile refusing IORING_REGISTER_FILES) SQEs carry fd as before.
func (u *uring) registerFile(fd int) {
	fds := [1]int32{int32(fd)}
	_, _, e := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(u.fd), registerFiles,
		uintptr(unsafe.Pointer(&fds[0])), 1, 0, 0)
	if e == 0 {
		u.fixedFD = fd
	}
}

func (u *uring) mapRings(p *uringParams) error {
	var err error
	sqSize := int(p.sqOff.array + p.sqEntries*4)
	cqSize := int(p.cqOff.cqes + p.cqEntries*uint32(unsafe.Sizeof(uringCQE{})))
	// The SQ and CQ offsets map the same rings object (IORING_FEAT_SINGLE_MMAP
	// only says one mapping would do); two mappings are simplest.
	if u.sqMem, err = unix.Mmap(u.fd, offSQRing, sqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("io_uring: map SQ ring: %w", err)
	}
	if u.cqMem, err = unix.Mmap(u.fd, offCQRing, cqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("io_uring: map CQ ring: %w", err)
	}
	sqeSize := int(p.sqEntries) * int(unsafe.Sizeof(uringSQE{}))
	if u.sqeM, err = unix.Mmap(u.fd, offSQEs, sqeSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("io_uring: map SQEs: %w", err)
	}
	word := func(m []byte, off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&m[off])) }
	u.sqHead, u.sqTail, u.sqFlags = word(u.sqMem, p.sqOff.head), word(u.sqMem, p.sqOff.tail), word(u.sqMem, p.sqOff.flags)
	u.sqMask = *word(u.sqMem, p.sqOff.ringMask)
	u.sqArray = unsafe.Slice(word(u.sqMem, p.sqOff.array), p.sqEntries)
	u.sqes = unsafe.Slice((*uringSQE)(unsafe.Pointer(&u.sqeM[0])), p.sqEntries)
	u.cqHead, u.cqTail = word(u.cqMem, p.cqOff.head), word(u.cqMem, p.cqOff.tail)
	u.cqMask = *word(u.cqMem, p.cqOff.ringMask)
	u.cqes = unsafe.Slice((*uringCQE)(unsafe.Pointer(&u.cqMem[p.cqOff.cqes])), p.cqEntries)
	u.tail = atomic.LoadUint32(u.sqTail)
	return nil
}

// probe fills pr with the opcodes the kernel supports (IORING_REGISTER_PROBE,
// 5.6+; a kernel without it has no opcode newer than 5.5 either, and probe
// returns false).
func (u *uring) probe(pr *uringProbe) bool {
	_, _, e := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(u.fd), registerProbe,
		uintptr(unsafe.Pointer(pr)), uintptr(len(pr.ops)), 0, 0)
	return e == 0
}

// supports reports whether the probed kernel supports opcode.
func (pr *uringProbe) supports(opcode uint8) bool {
	return opcode <= pr.lastOp && pr.ops[opcode].flags&probeSupported != 0
}

// supports reports whether the ring can run k itself.
func (u *uring) supports(k kio.Kind) bool {
	switch k {
	case kio.KindRead, kio.KindWrite, kio.KindSync:
		return true
	case kio.KindPunch, kio.KindZeroRange:
		return u.fallocate
	}
	return false
}

// queue writes an SQE for s.K. The caller never has more slots in flight
// than SQ entries, so there is always room.
func (u *uring) queue(fd int, s *kio.Slot) {
	if u.tail-atomic.LoadUint32(u.sqHead) > u.sqMask {
		panic("aio: io_uring submission queue overflow")
	}
	idx := u.tail & u.sqMask
	sqe := &u.sqes[idx]
	*sqe = uringSQE{fd: int32(fd), userData: uint64(s.Index)}
	if fd == u.fixedFD {
		sqe.fd, sqe.flags = 0, sqeFixedFile
	}
	k := &s.K
	switch k.Kind {
	case kio.KindRead, kio.KindWrite:
		sqe.off = k.Off
		if k.NIov == 1 && u.plainRW {
			// One segment (a 4 KiB guest read is): IORING_OP_READ/WRITE
			// take the buffer itself, so the kernel copies and checks no
			// iovec array per request.
			sqe.opcode = opRead
			if k.Kind == kio.KindWrite {
				sqe.opcode = opWrite
			}
			sqe.addr = uint64(uintptr(unsafe.Pointer(s.Iovecs[0].Base)))
			sqe.len = uint32(s.Iovecs[0].Len) // ≤ kio.BounceBytes or a guest buffer ≤ 4 MiB
			break
		}
		sqe.opcode = opReadv
		if k.Kind == kio.KindWrite {
			sqe.opcode = opWritev
		}
		sqe.addr = uint64(uintptr(unsafe.Pointer(&s.Iovecs[0])))
		sqe.len = uint32(k.NIov)
	case kio.KindSync:
		sqe.opcode = opFsync
		sqe.opFlags = fsyncDatasync
	case kio.KindPunch, kio.KindZeroRange:
		sqe.opcode = opFallocate
		sqe.off = k.Off
		sqe.addr = k.Len // fallocate's len travels in addr, its mode in len
		sqe.len = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
		if k.Kind == kio.KindZeroRange {
			sqe.len = unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE
		}
	}
	u.sqArray[idx] = idx
	u.tail++
	u.pending++
}

// flush hands queued SQEs to the kernel with one io_uring_enter, which also
// runs deferred completion work when the kernel asks for it. It returns an
// error only for a ring the kernel no longer accepts.
func (u *uring) flush() error {
	flags := atomic.LoadUint32(u.sqFlags)
	need := u.taskrun && flags&sqTaskrun != 0 || flags&sqCQOverflow != 0
	if u.pending == 0 && !need {
		return nil
	}
	atomic.StoreUint32(u.sqTail, u.tail)
	var enter uintptr
	if need {
		enter = enterGetEvents
	}
	n, _, e := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(u.fd), uintptr(u.pending), 0, enter, 0, 0)
	switch e {
	case 0:
		u.pending -= uint32(n)
	case unix.EAGAIN, unix.EBUSY, unix.EINTR:
		// Out of kernel resources: the SQEs stay queued for the next Poll.
	default:
		return e
	}
	return nil
}

// reap copies up to len(out) completions and returns how many.
func (u *uring) reap(out []completion) int {
	head := atomic.LoadUint32(u.cqHead)
	tail := atomic.LoadUint32(u.cqTail)
	n := 0
	for head != tail && n < len(out) {
		c := &u.cqes[head&u.cqMask]
		out[n] = completion{index: c.userData, res: int64(c.res)}
		n++
		head++
	}
	atomic.StoreUint32(u.cqHead, head)
	return n
}

// setEventFD makes the kernel signal fd on every completion.
func (u *uring) setEventFD(fd int) error {
	efd := int32(fd)
	_, _, e := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(u.fd), registerEventFD,
		uintptr(unsafe.Pointer(&efd)), 1, 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

func (u *uring) close() {
	for _, m := range [][]byte{u.sqeM, u.cqMem, u.sqMem} {
		if m != nil {
			unix.Munmap(m)
		}
	}
	u.sqeM, u.cqMem, u.sqMem = nil, nil, nil
	if u.fd >= 0 {
		unix.Close(u.fd)
		u.fd = -1
	}
}

package aio

import (
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"vhost-target/bdev/kio"
)

// Linux native AIO ABI (include/uapi/linux/aio_abi.h), little-endian layout.
type iocb struct {
	data      uint64 // aio_data: the slot index
	key       uint32
	rwFlags   int32
	opcode    uint16
	reqPrio   int16
	fildes    uint32
	buf       uint64
	nbytes    uint64
	offset    int64
	reserved2 uint64
	flags     uint32
	resFD     uint32
}

type ioEvent struct {
	data uint64
	obj  uint64
	res  int64
	res2 int64
}

// aioRing is the header of the completion ring the kernel maps at the
// context's address (fs/aio.c struct aio_ring); io_events follow it.
type aioRing struct {
	id, nr, head, tail uint32
	magic              uint32
	compatFeatures     uint32
	incompatFeatures   uint32
	headerLength       uint32
}

var (
	_ = [1]struct{}{}[unsafe.Sizeof(iocb{})-64]
	_ = [1]struct{}{}[unsafe.Sizeof(ioEvent{})-32]
	_ = [1]struct{}{}[unsafe.Sizeof(aioRing{})-32]
)

const (
	iocbCmdFdsync  = 3
	iocbCmdPreadv  = 7
	iocbCmdPwritev = 8
	iocbFlagResFD  = 1
	aioRingMagic   = 0xa10a10a1
)

// libaio is one Linux AIO context: the engine of one channel. Completions
// are read from the user-space ring the kernel maps at the context address
// (as fio's userspace_reap does), with io_getevents(min_nr 0, timeout 0) as
// the fallback when the ring's layout is not the one known here. Once the
// channel has an eventfd, every iocb carries IOCB_FLAG_RESFD so that the
// eventfd counts completions.
type libaio struct {
	ctx     uintptr
	ring    *aioRing
	events  []ioEvent // the ring's io_events, when ring != nil
	iocbs   []iocb    // one per slot
	batch   []*iocb   // queued, not yet submitted (capacity = slots)
	evbuf   []ioEvent // io_getevents buffer
	zero    unix.Timespec
	eventFD int
}

func newLibaio(slots int) (*libaio, error) {
	a := &libaio{iocbs: make([]iocb, slots), batch: make([]*iocb, 0, slots), evbuf: make([]ioEvent, slots), eventFD: -1}
	_, _, e := unix.Syscall(unix.SYS_IO_SETUP, uintptr(slots), uintptr(unsafe.Pointer(&a.ctx)), 0)
	if e != 0 {
		if e == unix.EAGAIN {
			return nil, fmt.Errorf("io_setup(%d): %w (raise fs.aio-max-nr)", slots, e)
		}
		return nil, fmt.Errorf("io_setup(%d): %w", slots, e)
	}
	// The context id is the address of the mapped ring.
	r := *(**aioRing)(unsafe.Pointer(&a.ctx))
	if r.magic == aioRingMagic && r.incompatFeatures == 0 && r.headerLength == uint32(unsafe.Sizeof(aioRing{})) && r.nr > 0 {
		a.ring = r
		a.events = unsafe.Slice((*ioEvent)(unsafe.Add(unsafe.Pointer(r), unsafe.Sizeof(aioRing{}))), r.nr)
	}
	return a, nil
}

func (a *libaio) supports(k kio.Kind) bool {
	return k == kio.KindRead || k == kio.KindWrite || k == kio.KindSync
}

func (a *libaio) queue(fd int, s *kio.Slot) {
	cb := &a.iocbs[s.Index]
	*cb = iocb{data: uint64(s.Index), fildes: uint32(fd)}
	if a.eventFD >= 0 {
		cb.flags, cb.resFD = iocbFlagResFD, uint32(a.eventFD)
	}
	k := &s.K
	switch k.Kind {
	case kio.KindRead, kio.KindWrite:
		cb.opcode = iocbCmdPreadv
		if k.Kind == kio.KindWrite {
			cb.opcode = iocbCmdPwritev
		}
		cb.buf = uint64(uintptr(unsafe.Pointer(&s.Iovecs[0])))
		cb.nbytes = uint64(k.NIov)
		cb.offset = int64(k.Off)
	case kio.KindSync:
		cb.opcode = iocbCmdFdsync
	}
	a.batch = append(a.batch, cb) // capacity = slots; one iocb per slot at most
}

// flush submits the queued iocbs. An iocb the kernel refuses outright is
// returned in failed (with its errno) for the caller to complete or reroute;
// on EAGAIN the rest stay queued for the next Poll.
func (a *libaio) flush(failed []completion) (int, error) {
	nf := 0
	for len(a.batch) > 0 {
		n, _, e := unix.Syscall(unix.SYS_IO_SUBMIT, a.ctx, uintptr(len(a.batch)), uintptr(unsafe.Pointer(&a.batch[0])))
		switch {
		case e == unix.EAGAIN || e == unix.EINTR:
			return nf, nil
		case e == unix.EBADF || e == unix.EFAULT:
			return nf, e
		case e != 0:
			// The first iocb was refused.
			failed[nf] = completion{index: a.batch[0].data, res: -int64(e)}
			nf++
			n = 1
		case n == 0:
			return nf, nil // cannot happen: the kernel reports why nothing was taken
		}
		k := copy(a.batch, a.batch[n:])
		clear(a.batch[k:])
		a.batch = a.batch[:k]
	}
	return nf, nil
}

func (a *libaio) pending() bool { return len(a.batch) > 0 }

// reap copies up to len(out) completions without blocking.
func (a *libaio) reap(out []completion) int {
	if a.ring == nil {
		n, _, e := unix.Syscall6(unix.SYS_IO_GETEVENTS, a.ctx, 0, uintptr(min(len(out), len(a.evbuf))),
			uintptr(unsafe.Pointer(&a.evbuf[0])), uintptr(unsafe.Pointer(&a.zero)), 0)
		if e != 0 {
			return 0
		}
		for i := 0; i < int(n); i++ {
			out[i] = completion{index: a.evbuf[i].data, res: a.evbuf[i].res}
		}
		return int(n)
	}
	nr := a.ring.nr
	head := atomic.LoadUint32(&a.ring.head)
	tail := atomic.LoadUint32(&a.ring.tail)
	n := 0
	for head != tail && n < len(out) {
		ev := &a.events[head%nr]
		out[n] = completion{index: ev.data, res: ev.res}
		n++
		head = (head + 1) % nr
	}
	atomic.StoreUint32(&a.ring.head, head)
	return n
}

func (a *libaio) close() {
	if a.ctx != 0 {
		unix.Syscall(unix.SYS_IO_DESTROY, a.ctx, 0, 0)
		a.ctx, a.ring, a.events = 0, nil, nil
	}
}

package kio

import (
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Run does one kernel operation synchronously, blocking the calling thread:
// only pool workers (never a reactor) call it.
func Run(fd int, k *Op, iov *unix.Iovec) (int64, unix.Errno) {
	var r uintptr
	var e unix.Errno
	switch k.Kind {
	case KindRead:
		r, _, e = unix.Syscall6(unix.SYS_PREADV, uintptr(fd), uintptr(unsafe.Pointer(iov)), uintptr(k.NIov),
			uintptr(k.Off), uintptr(k.Off>>32), 0)
	case KindWrite:
		r, _, e = unix.Syscall6(unix.SYS_PWRITEV, uintptr(fd), uintptr(unsafe.Pointer(iov)), uintptr(k.NIov),
			uintptr(k.Off), uintptr(k.Off>>32), 0)
	case KindSync:
		_, _, e = unix.Syscall(unix.SYS_FDATASYNC, uintptr(fd), 0, 0)
	case KindPunch:
		_, _, e = unix.Syscall6(unix.SYS_FALLOCATE, uintptr(fd), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE,
			uintptr(k.Off), uintptr(k.Len), 0, 0)
	case KindZeroRange:
		_, _, e = unix.Syscall6(unix.SYS_FALLOCATE, uintptr(fd), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE,
			uintptr(k.Off), uintptr(k.Len), 0, 0)
	case KindDiscard, KindZeroOut:
		req := uintptr(unix.BLKDISCARD)
		if k.Kind == KindZeroOut {
			req = unix.BLKZEROOUT
		}
		rng := [2]uint64{k.Off, k.Len}
		_, _, e = unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(&rng)))
	default:
		return 0, unix.EINVAL
	}
	return int64(r), e
}

// Exec runs the whole IO of s synchronously (on a pool worker). EAGAIN and
// ENOMEM back off briefly and retry: memory pressure passes, and failing the
// IO would surface a transient host condition to the guest as an error.
func Exec(s *Slot) {
	fd := s.b.FD
	for {
		s.Next()
		res, e := Run(fd, &s.K, &s.Iovecs[0])
		if s.Advance(res, e) {
			return
		}
		if e != 0 {
			time.Sleep(time.Duration(min(s.retries, 100)) * 100 * time.Microsecond)
		}
	}
}

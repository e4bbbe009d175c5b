package bdev

// Check validates io against a device of size bytes in blocks of blockSize
// before an asynchronous bdev takes it (kio's file and aio bdevs, rbd): it
// returns now=true when io is finished already, with io.Err holding the
// result (an error, or nil for a zero-length transfer or an unmap of
// nothing). One place, so every bdev refuses the same IOs the same way.
func Check(io *IO, blockSize uint32, size uint64, readOnly bool) (now bool) {
	bs := uint64(blockSize)
	io.Err = nil
	switch io.Op {
	case OpRead, OpWrite, OpWriteZeroes, OpWriteSame:
		if io.Op != OpRead && readOnly {
			io.Err = ErrReadOnly
			return true
		}
		if io.Offset%bs != 0 || io.Len%bs != 0 || !inRange(io.Offset, io.Len, size) {
			io.Err = ErrRange
			return true
		}
		if io.Len == 0 {
			return true
		}
		switch io.Op {
		case OpRead, OpWrite:
			var n uint64
			for _, v := range io.Iov {
				n += uint64(len(v))
			}
			if n < io.Len {
				io.Err = ErrRange // buffers smaller than Len: a caller bug
				return true
			}
		case OpWriteSame:
			if len(io.Iov) == 0 || uint64(len(io.Iov[0])) < bs {
				io.Err = ErrRange
				return true
			}
		}
		return false
	case OpFlush:
		return false
	case OpUnmap:
		if readOnly {
			io.Err = ErrReadOnly
			return true
		}
		if io.NRanges < 0 || io.NRanges > MaxRanges {
			io.Err = ErrRange
			return true
		}
		work := false
		for _, r := range io.Ranges[:io.NRanges] {
			if !inRange(r.Offset, r.Len, size) {
				io.Err = ErrRange
				return true
			}
			work = work || r.Len != 0
		}
		return !work // nothing to unmap
	}
	io.Err = ErrNotSup
	return true
}

// inRange reports whether [off, off+n) lies within size bytes.
func inRange(off, n, size uint64) bool { return off <= size && size-off >= n }

// Unit tests for the slot state machine without a kernel: which IOs bounce,
// how results and errnos advance or finish an IO.
package kio

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"vhost-target/bdev"
)

func testBacking(t *testing.T) (*Backing, []byte) {
	mem, err := unix.Mmap(-1, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(mem) })
	b := &Backing{Name: "t", BlockSize: 512, MemAlign: 512, OffsetAlign: 512, zeroes: mem[512<<10:]}
	b.size.Store(1 << 20)
	return b, mem
}

func TestNeedsBounce(t *testing.T) {
	b, mem := testBacking(t)
	many := make([][]byte, MaxIovecs+1)
	for i := range many {
		many[i] = mem[i*512 : (i+1)*512]
	}
	cases := []struct {
		name string
		io   bdev.IO
		want bool
	}{
		{"aligned", bdev.IO{Op: bdev.OpRead, Len: 1024, Iov: [][]byte{mem[:1024]}}, false},
		{"aligned pieces", bdev.IO{Op: bdev.OpWrite, Len: 1024, Iov: [][]byte{mem[:512], {}, mem[4096:4608]}}, false},
		{"address off", bdev.IO{Op: bdev.OpRead, Len: 512, Iov: [][]byte{mem[1:513]}}, true},
		{"length off", bdev.IO{Op: bdev.OpRead, Len: 1024, Iov: [][]byte{mem[:100], mem[512:1436]}}, true},
		{"last piece past Len is trimmed", bdev.IO{Op: bdev.OpRead, Len: 512, Iov: [][]byte{mem[:600]}}, false},
		{"too many segments", bdev.IO{Op: bdev.OpRead, Len: uint64(len(many)) * 512, Iov: many}, true},
		{"write same", bdev.IO{Op: bdev.OpWriteSame, Len: 512, Iov: [][]byte{mem[:512]}}, true},
		{"flush", bdev.IO{Op: bdev.OpFlush}, false},
	}
	for _, c := range cases {
		if got := NeedsBounce(b, &c.io); got != c.want {
			t.Errorf("%s: NeedsBounce = %v", c.name, got)
		}
	}
}

func TestAdvance(t *testing.T) {
	b, mem := testBacking(t)
	bounce := mem[256<<10 : 512<<10]
	var s Slot

	// A bounced read scatters what the kernel returned, across short reads.
	io := &bdev.IO{Op: bdev.OpRead, Offset: 0, Len: 1024, Iov: [][]byte{mem[1:301], mem[401:1125]}}
	s.Begin(b, io, bounce)
	s.Next()
	if s.K.Kind != KindRead || s.K.Len != 1024 || s.K.NIov != 1 {
		t.Fatalf("op = %+v", s.K)
	}
	for i := range 512 {
		bounce[i] = 7
	}
	if s.Advance(512, 0) {
		t.Fatal("done after half")
	}
	s.Next()
	if s.K.Off != 512 || s.K.Len != 512 {
		t.Fatalf("second op = %+v", s.K)
	}
	for i := range 512 {
		bounce[i] = 9
	}
	if !s.Advance(512, 0) || io.Err != nil {
		t.Fatalf("not done: %v", io.Err)
	}
	if mem[1] != 7 || mem[300] != 7 || mem[401] != 7 || mem[401+211] != 7 || mem[401+212] != 9 || mem[1124] != 9 {
		t.Fatal("scatter misplaced bytes")
	}

	// EOF: the file shrank.
	s.Begin(b, io, bounce)
	s.Next()
	if !s.Advance(0, 0) || !errors.Is(io.Err, bdev.ErrIO) {
		t.Errorf("EOF: %v", io.Err)
	}
	// EAGAIN retries, up to RetryMax.
	s.Begin(b, io, nil)
	s.Next()
	for i := 0; i < RetryMax; i++ {
		if s.Advance(0, unix.EAGAIN) {
			t.Fatalf("EAGAIN failed the IO after %d tries", i)
		}
	}
	if !s.Advance(0, unix.EAGAIN) || !errors.Is(io.Err, bdev.ErrBusy) {
		t.Errorf("endless EAGAIN: %v", io.Err)
	}
	// Errno mapping.
	for _, c := range []struct {
		e    unix.Errno
		want error
	}{{unix.EIO, bdev.ErrIO}, {unix.ENOSPC, bdev.ErrNoSpace}, {unix.EROFS, bdev.ErrReadOnly}, {unix.EFBIG, bdev.ErrRange}} {
		s.Begin(b, io, nil)
		s.Next()
		if !s.Advance(0, c.e) || !errors.Is(io.Err, c.want) {
			t.Errorf("%v: %v", c.e, io.Err)
		}
	}
	if err := MapErrno(KindRead, unix.ENOLINK); err != unix.ENOLINK {
		t.Errorf("unmapped errno: %v", err)
	}

	// Write zeroes falls back to writing zero buffers when ZERO_RANGE is refused.
	z := &bdev.IO{Op: bdev.OpWriteZeroes, Offset: 0, Len: 1024}
	s.Begin(b, z, nil)
	s.Next()
	if s.K.Kind != KindZeroRange {
		t.Fatalf("op = %+v", s.K)
	}
	if s.Advance(0, unix.EOPNOTSUPP) {
		t.Fatal("EOPNOTSUPP on zero range failed the IO")
	}
	s.Next()
	if s.K.Kind != KindWrite || s.K.Len != 1024 || !b.noZeroRange.Load() {
		t.Fatalf("fallback op = %+v", s.K)
	}
	if !s.Advance(1024, 0) || z.Err != nil {
		t.Fatal(z.Err)
	}

	// Unmap skips empty ranges.
	u := &bdev.IO{Op: bdev.OpUnmap, NRanges: 3}
	u.Ranges[0] = bdev.Range{Offset: 0, Len: 0}
	u.Ranges[1] = bdev.Range{Offset: 512, Len: 512}
	u.Ranges[2] = bdev.Range{Offset: 4096, Len: 0}
	if Check(b, u) {
		t.Fatal(u.Err)
	}
	s.Begin(b, u, nil)
	s.Next()
	if s.K.Kind != KindPunch || s.K.Off != 512 {
		t.Fatalf("op = %+v", s.K)
	}
	if !s.Advance(0, 0) {
		t.Error("unmap not done after its one non-empty range")
	}
	u.Ranges[1].Len = 0
	if !Check(b, u) || u.Err != nil {
		t.Errorf("all-empty unmap: now=false or %v", u.Err)
	}
}

package dirtylog

import (
	"encoding/binary"
	"errors"
	"sync"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

func newLog(t *testing.T, bytes int) (*Log, []byte) {
	t.Helper()
	b := sliceOf(make([]uint64, bytes/8)) // 8-byte aligned, as QEMU's
	return FromBytes(b), b
}

// qemuDirty lists the pages set, read the way QEMU's vhost_dev_sync_region
// does: little-endian 64-bit words, bit p%64 of word p/64.
func qemuDirty(b []byte) []uint64 {
	var out []uint64
	for w := 0; w+8 <= len(b); w += 8 {
		v := binary.LittleEndian.Uint64(b[w:])
		for i := uint64(0); i < 64; i++ {
			if v&(1<<i) != 0 {
				out = append(out, uint64(w/8)*64+i)
			}
		}
	}
	return out
}

func TestMark(t *testing.T) {
	for _, c := range []struct {
		name   string
		gpa, n uint64
		want   []uint64
	}{
		{"one byte", 5 * PageSize, 1, []uint64{5}},
		{"a whole page", 7 * PageSize, PageSize, []uint64{7}},
		{"last byte of a page", 8*PageSize - 1, 1, []uint64{7}},
		{"across a boundary", 8*PageSize - 2, 4, []uint64{7, 8}},
		{"three pages", 31*PageSize + 100, 2 * PageSize, []uint64{31, 32, 33}},
		{"word boundary", 63 * PageSize, 2 * PageSize, []uint64{63, 64}},
		{"nothing", 3 * PageSize, 0, nil},
		{"last page", 127 * PageSize, 1 << 20, []uint64{127}},
		{"beyond", 128 * PageSize, 1, nil},
		{"far beyond", 1 << 62, 1 << 62, nil},
		{"huge length", 126 * PageSize, 1<<64 - 1, []uint64{126, 127}},
	} {
		l, b := newLog(t, 16) // 128 pages
		l.Mark(c.gpa, c.n)
		got := qemuDirty(b)
		if len(got) != len(c.want) {
			t.Fatalf("%s: pages %v, want %v", c.name, got, c.want)
		}
		for i := range got {
			if got[i] != c.want[i] || !l.Marked(got[i]) {
				t.Fatalf("%s: pages %v, want %v", c.name, got, c.want)
			}
		}
	}
}

func TestEmptyLog(t *testing.T) {
	l := FromBytes(nil)
	l.Mark(0, PageSize) // must not panic
	if l.Pages() != 0 || l.Marked(0) {
		t.Fatal("empty log marks")
	}
}

// TestConcurrentMarks: marks from many goroutines on the pages of one word
// all land (each is an atomic OR, not a read-modify-write of the byte).
func TestConcurrentMarks(t *testing.T) {
	l, b := newLog(t, 8)
	var wg sync.WaitGroup
	for p := uint64(0); p < 64; p++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 100 {
				l.Mark(p*PageSize, 1)
			}
		}()
	}
	wg.Wait()
	if got := qemuDirty(b); len(got) != 64 {
		t.Fatalf("%d pages marked, want 64", len(got))
	}
}

func TestMarkNoAllocs(t *testing.T) {
	l, _ := newLog(t, 4096)
	if n := testing.AllocsPerRun(1000, func() { l.Mark(12345, 9000) }); n != 0 {
		t.Fatalf("Mark allocates %v times", n)
	}
}

func memfd(t *testing.T, size int64, seal bool) int {
	t.Helper()
	fd, err := unix.MemfdCreate("log", unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Ftruncate(fd, size); err != nil {
		t.Fatal(err)
	}
	if seal {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW); err != nil {
			t.Fatal(err)
		}
	}
	return fd
}

func TestMap(t *testing.T) {
	fd := memfd(t, 8192, true)
	l, err := Map(fd, 4096, 4096)
	if err != nil {
		t.Fatal(err)
	}
	l.Mark(3*PageSize, 1)
	var b [8]byte
	if _, err := unix.Pread(fd, b[:], 4096); err != nil || b[0] != 1<<3 {
		t.Fatalf("the mark is not in the file: %v %v", b, err)
	}
	if l.Pages() != 4096*8 {
		t.Fatalf("pages %d", l.Pages())
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil { // twice: nothing left to unmap
		t.Fatal(err)
	}

	var p [2]int
	if err := unix.Pipe(p[:]); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	for _, c := range []struct {
		name         string
		fd           int
		size, offset uint64
		want         error
	}{
		{"size 0", fd, 0, 0, ErrSize},
		{"size not a multiple of 8", fd, 12, 0, ErrSize},
		{"too big", fd, MaxBytes + 8, 0, ErrSize},
		{"offset misaligned", fd, 8, 4, ErrOffset},
		{"offset overflows", fd, 8, 1<<64 - 8, ErrOffset},
		{"beyond the file", fd, 8192, 8, ErrFile},
		{"a pipe", p[0], 8, 0, ErrFile},
		{"closed fd", 1 << 20, 8, 0, ErrFile},
	} {
		if _, err := Map(c.fd, c.size, c.offset); !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
}

func sliceOf(w []uint64) []byte {
	if len(w) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&w[0])), len(w)*8)
}

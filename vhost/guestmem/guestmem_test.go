// Goal: every Map/FromBytes validation rejects exactly its malformation, and lookups are exact at region edges,
// split across adjacent regions, and allocation-free. Method: tables over byte slices, and memfds for Map.
package guestmem

import (
	"errors"
	"math"
	"testing"

	"golang.org/x/sys/unix"
)

// twoRegions: GPA-adjacent regions [0x1000,0x2000) and [0x2000,0x3000) with unrelated UVAs, and a third region
// far away; region 1 is backed at offset 0x100 of its slice.
func twoRegions(t *testing.T) (*Table, [][]byte) {
	t.Helper()
	mem := [][]byte{make([]byte, 0x1000), make([]byte, 0x1100), make([]byte, 0x1000)}
	for i := range mem {
		for j := range mem[i] {
			mem[i][j] = byte(i + 1)
		}
	}
	regs := []Region{
		{GPA: 0x1000, Size: 0x1000, UVA: 0x7f00_0000_0000},
		{GPA: 0x2000, Size: 0x1000, UVA: 0x7e00_0000_0000, MmapOffset: 0x100},
		{GPA: 0x10_0000, Size: 0x1000, UVA: 0x7d00_0000_0000},
	}
	tb, err := FromBytes(regs, mem)
	if err != nil {
		t.Fatal(err)
	}
	return tb, mem
}

func TestLookupEdges(t *testing.T) {
	tb, mem := twoRegions(t)
	cases := []struct {
		gpa, n uint64
		err    error
		region int // expected backing slice
		off    int // expected offset in it
	}{
		{0x1000, 1, nil, 0, 0},
		{0x1000, 0x1000, nil, 0, 0},
		{0x1fff, 1, nil, 0, 0xfff},
		{0x1fff, 2, ErrUnmapped, 0, 0}, // crosses into region 1: GPA wants one region
		{0x2000, 0x1000, nil, 1, 0x100},
		{0x2fff, 1, nil, 1, 0x10ff},
		{0x3000, 1, ErrUnmapped, 0, 0},
		{0xfff, 1, ErrUnmapped, 0, 0},
		{0x0, 0, ErrUnmapped, 0, 0},
		{0x10_0fff, 1, nil, 2, 0xfff},
		{0x10_1000, 0, ErrUnmapped, 0, 0},
		{math.MaxUint64, 2, ErrOverflow, 0, 0},
		{0x1000, math.MaxUint64, ErrOverflow, 0, 0},
	}
	for _, c := range cases {
		b, err := tb.GPA(c.gpa, c.n)
		if !errors.Is(err, c.err) {
			t.Errorf("GPA(%#x,%#x) err = %v, want %v", c.gpa, c.n, err, c.err)
			continue
		}
		if err != nil {
			continue
		}
		if uint64(len(b)) != c.n || cap(b) != len(b) {
			t.Errorf("GPA(%#x,%#x): len %d cap %d", c.gpa, c.n, len(b), cap(b))
		}
		if c.n > 0 && &b[0] != &mem[c.region][c.off] {
			t.Errorf("GPA(%#x,%#x): wrong host address", c.gpa, c.n)
		}
	}
	// UVA keys are independent of GPA keys.
	b, err := tb.UVA(0x7e00_0000_0010, 0x10)
	if err != nil || &b[0] != &mem[1][0x110] {
		t.Fatalf("UVA: %v", err)
	}
	if _, err := tb.UVA(0x2000, 1); !errors.Is(err, ErrUnmapped) {
		t.Fatalf("a GPA used as UVA: %v", err)
	}
	if _, err := tb.UVA(0x7f00_0000_0fff, 2); !errors.Is(err, ErrUnmapped) {
		t.Fatalf("UVA past region end: %v", err)
	}
	var ae *AddrError
	if _, err := tb.GPA(0x3000, 8); !errors.As(err, &ae) || ae.Addr != 0x3000 || ae.Space != "gpa" {
		t.Fatalf("error lacks context: %v", err)
	}
}

// TestHostGPA: the segments AppendGPA returns map back to their guest
// physical addresses; bytes outside the table do not.
func TestHostGPA(t *testing.T) {
	tb, mem := twoRegions(t)
	segs, err := tb.AppendGPA(nil, 0x1ff0, 0x20, 4)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []uint64{0x1ff0, 0x2000} {
		if gpa, ok := tb.HostGPA(segs[i]); !ok || gpa != want {
			t.Fatalf("segment %d: %#x %v, want %#x", i, gpa, ok, want)
		}
	}
	if gpa, ok := tb.HostGPA(mem[2][0xfff:]); !ok || gpa != 0x10_0fff {
		t.Fatalf("last byte of region 2: %#x %v", gpa, ok)
	}
	if _, ok := tb.HostGPA(make([]byte, 8)); ok {
		t.Fatal("bytes outside the table found")
	}
	if _, ok := tb.HostGPA(nil); ok {
		t.Fatal("empty slice found")
	}
	// Region 1 is the tail of a larger slice (MmapOffset 0x100): its first
	// 0x100 bytes are not guest memory.
	if _, ok := tb.HostGPA(mem[1][:0x10]); ok {
		t.Fatal("bytes before region 1's offset found")
	}
	if gpa, ok := tb.HostGPA(mem[1][0x1000:0x1100]); !ok || gpa != 0x2f00 {
		t.Fatalf("the last 0x100 bytes of region 1: %#x %v", gpa, ok)
	}
	if n := testing.AllocsPerRun(100, func() { tb.HostGPA(segs[1]) }); n != 0 {
		t.Fatalf("HostGPA allocates %v", n)
	}
}

func TestAppendGPASplits(t *testing.T) {
	tb, mem := twoRegions(t)
	dst := make([][]byte, 1, 8)
	got, err := tb.AppendGPA(dst, 0x1ff0, 0x20, 2)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 || len(got[1]) != 0x10 || len(got[2]) != 0x10 {
		t.Fatalf("segments %d: %d,%d", len(got), len(got[1]), len(got[2]))
	}
	if &got[1][0] != &mem[0][0xff0] || &got[2][0] != &mem[1][0x100] {
		t.Fatal("segments point at the wrong host bytes")
	}
	// max 1 is too few for a split buffer; nothing is appended.
	got, err = tb.AppendGPA(dst, 0x1ff0, 0x20, 1)
	if !errors.Is(err, ErrTooManySegments) || len(got) != 1 {
		t.Fatalf("max 1: %v, len %d", err, len(got))
	}
	// The tail runs past region 1 into a hole.
	got, err = tb.AppendGPA(dst, 0x1ff0, 0x1011, 4)
	if !errors.Is(err, ErrUnmapped) || len(got) != 1 {
		t.Fatalf("hole: %v, len %d", err, len(got))
	}
	got, err = tb.AppendGPA(dst, math.MaxUint64-4, 8, 4)
	if !errors.Is(err, ErrOverflow) || len(got) != 1 {
		t.Fatalf("overflow: %v", err)
	}
	got, err = tb.AppendGPA(dst, 0x1000, 0x2000, 4) // exactly both regions
	if err != nil || len(got) != 3 || len(got[1]) != 0x1000 || len(got[2]) != 0x1000 {
		t.Fatalf("two whole regions: %v %d", err, len(got))
	}
	got, err = tb.AppendGPA(dst, 0x5000, 0, 0)
	if err != nil || len(got) != 1 {
		t.Fatalf("n == 0: %v %d", err, len(got))
	}
}

func TestLookupNoAlloc(t *testing.T) {
	tb, _ := twoRegions(t)
	dst := make([][]byte, 0, 4)
	n := testing.AllocsPerRun(1000, func() {
		if _, err := tb.GPA(0x2010, 16); err != nil {
			t.Fatal(err)
		}
		if _, err := tb.UVA(0x7d00_0000_0000, 16); err != nil {
			t.Fatal(err)
		}
		if _, err := tb.AppendGPA(dst[:0], 0x1ff0, 0x20, 4); err != nil {
			t.Fatal(err)
		}
	})
	if n != 0 {
		t.Fatalf("lookups allocate %v per run", n)
	}
}

func TestManyRegionsBinarySearch(t *testing.T) {
	// 64 regions given in reverse order, every other GPA slot a hole.
	var regs []Region
	var mem [][]byte
	for i := 63; i >= 0; i-- {
		regs = append(regs, Region{GPA: uint64(i) * 0x2000, Size: 0x1000, UVA: 0x1_0000_0000 + uint64(i)*0x1000})
		mem = append(mem, make([]byte, 0x1000))
	}
	tb, err := FromBytes(regs, mem)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 64 {
		b, err := tb.GPA(uint64(i)*0x2000+0xff8, 8)
		if err != nil || &b[0] != &mem[63-i][0xff8] {
			t.Fatalf("region %d: %v", i, err)
		}
		if _, err := tb.GPA(uint64(i)*0x2000+0x1000, 1); !errors.Is(err, ErrUnmapped) {
			t.Fatalf("hole after region %d: %v", i, err)
		}
		// UVAs are adjacent: a buffer may span them in UVA space but UVA() wants one region.
		if _, err := tb.UVA(0x1_0000_0000+uint64(i)*0x1000+0xfff, 2); i < 63 && !errors.Is(err, ErrUnmapped) {
			t.Fatalf("uva crossing %d: %v", i, err)
		}
	}
}

func TestFromBytesValidation(t *testing.T) {
	m := func(n int) []byte { return make([]byte, n) }
	cases := []struct {
		name string
		regs []Region
		mem  [][]byte
		err  error
	}{
		{"zero size", []Region{{GPA: 0, Size: 0}}, [][]byte{m(16)}, ErrZeroSize},
		{"gpa overflow", []Region{{GPA: math.MaxUint64 - 0xf, Size: 0x10}}, [][]byte{m(16)}, ErrOverflow},
		{"uva overflow", []Region{{UVA: math.MaxUint64 - 0x7, Size: 0x10}}, [][]byte{m(16)}, ErrOverflow},
		{"offset overflow", []Region{{MmapOffset: math.MaxUint64, Size: 0x10}}, [][]byte{m(16)}, ErrOverflow},
		{"gpa overlap", []Region{{GPA: 0, Size: 0x100, UVA: 0}, {GPA: 0xff, Size: 0x100, UVA: 0x1000}},
			[][]byte{m(0x100), m(0x100)}, ErrOverlap},
		{"uva overlap", []Region{{GPA: 0, Size: 0x100, UVA: 0x1000}, {GPA: 0x100, Size: 0x100, UVA: 0x1080}},
			[][]byte{m(0x100), m(0x100)}, ErrOverlap},
		{"beyond backing", []Region{{Size: 0x100, MmapOffset: 1}}, [][]byte{m(0x100)}, ErrBeyondFile},
		{"count", []Region{{Size: 0x100}}, nil, ErrFDCount},
		{"too many", make([]Region, MaxRegions+1), make([][]byte, MaxRegions+1), ErrTooManyRegions},
	}
	for _, c := range cases {
		if _, err := FromBytes(c.regs, c.mem); !errors.Is(err, c.err) {
			t.Errorf("%s: err = %v, want %v", c.name, err, c.err)
		}
	}
	// Touching ranges are fine.
	_, err := FromBytes([]Region{{GPA: 0, Size: 0x100, UVA: 0x100}, {GPA: 0x100, Size: 0x100, UVA: 0}},
		[][]byte{m(0x100), m(0x100)})
	if err != nil {
		t.Fatal(err)
	}
}

func TestEqual(t *testing.T) {
	tb, _ := twoRegions(t)
	regs := tb.Regions()
	if !tb.Equal(regs) {
		t.Fatal("a table differs from its own regions")
	}
	regs[0] = tb.Regions()[0] // Regions returns a copy
	regs[1].MmapOffset++
	if tb.Equal(regs) {
		t.Fatal("mmap_offset change not seen")
	}
	if tb.Equal(tb.Regions()[:2]) {
		t.Fatal("shorter table equal")
	}
	r := tb.Regions()
	r[0], r[1] = r[1], r[0]
	if tb.Equal(r) {
		t.Fatal("reordered table reported equal (Equal is order-sensitive)")
	}
}

func memfd(t *testing.T, size int64) int {
	t.Helper()
	fd, err := unix.MemfdCreate("guestmem-test", 0)
	if err != nil {
		t.Skipf("memfd_create: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Ftruncate(fd, size); err != nil {
		t.Fatal(err)
	}
	return fd
}

func TestMapMemfd(t *testing.T) {
	fd := memfd(t, 0x4000)
	// Two regions in one file: the second at an unaligned mmap_offset. Map must not pass it to mmap.
	regs := []Region{
		{GPA: 0, Size: 0x2000, UVA: 0x10_0000, MmapOffset: 0},
		{GPA: 0x10_0000, Size: 0x1000, UVA: 0x20_0000, MmapOffset: 0x2008},
	}
	tb, err := Map(regs, []int{fd, fd})
	if err != nil {
		t.Fatal(err)
	}
	defer tb.Close()
	b, err := tb.GPA(0x10_0000, 8)
	if err != nil {
		t.Fatal(err)
	}
	copy(b, "abcdefgh")
	var got [8]byte
	if _, err := unix.Pread(fd, got[:], 0x2008); err != nil || string(got[:]) != "abcdefgh" {
		t.Fatalf("write through the mapping not in the file at mmap_offset: %q %v", got, err)
	}
	a, _ := tb.GPA(0x2000-8, 8)
	copy(a, "ABCDEFGH")
	if _, err := unix.Pread(fd, got[:], 0x2000-8); err != nil || string(got[:]) != "ABCDEFGH" {
		t.Fatalf("region 0 tail not at its file offset: %q %v", got, err)
	}
	if c, _ := tb.UVA(0x20_0000, 8); &c[0] != &b[0] {
		t.Fatal("UVA and GPA of one byte differ")
	}
	if !tb.SameFiles([]int{fd, fd}) {
		t.Fatal("SameFiles: same fds reported different")
	}
	other := memfd(t, 0x4000)
	if tb.SameFiles([]int{fd, other}) {
		t.Fatal("SameFiles: a different memfd reported same")
	}
	if err := tb.Close(); err != nil {
		t.Fatal(err)
	}
	if err := tb.Close(); err != nil {
		t.Fatal("second Close:", err)
	}
}

func TestMapValidation(t *testing.T) {
	fd := memfd(t, 0x2000)
	cases := []struct {
		name string
		regs []Region
		fds  []int
		err  error
	}{
		{"beyond file", []Region{{Size: 0x1000, MmapOffset: 0x1001}}, []int{fd}, ErrBeyondFile},
		{"beyond file by size", []Region{{Size: 0x2001}}, []int{fd}, ErrBeyondFile},
		{"zero size", []Region{{Size: 0}}, []int{fd}, ErrZeroSize},
		{"overflow", []Region{{GPA: math.MaxUint64, Size: 1}}, []int{fd}, ErrOverflow},
		{"gpa overlap", []Region{{Size: 0x1000}, {GPA: 0x800, UVA: 0x8000, Size: 0x800}}, []int{fd, fd}, ErrOverlap},
		{"uva overlap", []Region{{Size: 0x1000}, {GPA: 0x1000, UVA: 0xfff, Size: 0x800}}, []int{fd, fd}, ErrOverlap},
		{"fd count", []Region{{Size: 0x1000}}, []int{fd, fd}, ErrFDCount},
		{"bad fd", []Region{{Size: 0x1000}}, []int{-1}, unix.EBADF},
		// The first region maps, the second fails (TestMapUnmapsOnError checks the first is unmapped again).
		{"second fails", []Region{{Size: 0x1000}, {GPA: 0x1000, UVA: 0x1000, Size: 0x1000, MmapOffset: 0x1800}},
			[]int{fd, fd}, ErrBeyondFile},
	}
	for _, c := range cases {
		tb, err := Map(c.regs, c.fds)
		if !errors.Is(err, c.err) || tb != nil {
			t.Errorf("%s: err = %v, want %v", c.name, err, c.err)
		}
	}
	var re *RegionError
	_, err := Map([]Region{{Size: 0x1000}, {GPA: 0x1000, UVA: 0x1000, Size: 0x1000, MmapOffset: 0x1800}}, []int{fd, fd})
	if !errors.As(err, &re) || re.Index != 1 {
		t.Fatalf("error does not name region 1: %v", err)
	}
}

// TestMapUnmapsOnError counts this process's mappings of the memfd before and after a failing Map.
func TestMapUnmapsOnError(t *testing.T) {
	fd := memfd(t, 0x2000)
	// A failing Map (second region beyond file) leaves the first region mapped only if cleanup is missing.
	// Detect it through /proc/self/maps, which lists memfd mappings as "/memfd:guestmem-test".
	before := memfdMappings(t)
	for range 10 {
		if _, err := Map([]Region{{Size: 0x1000}, {GPA: 0x1000, UVA: 0x1000, Size: 0x2001}}, []int{fd, fd}); err == nil {
			t.Fatal("Map accepted a region beyond the file")
		}
		if _, err := Map([]Region{{Size: 0x1000}, {GPA: 0x1000, UVA: 0x1000, Size: 0x1000}}, []int{fd, -1}); err == nil {
			t.Fatal("Map accepted a bad fd")
		}
	}
	if after := memfdMappings(t); after != before {
		t.Fatalf("failed Maps leaked mappings: %d before, %d after", before, after)
	}
}

func memfdMappings(t *testing.T) int {
	t.Helper()
	fd, err := unix.Open("/proc/self/maps", unix.O_RDONLY, 0)
	if err != nil {
		t.Skipf("/proc/self/maps: %v", err)
	}
	defer unix.Close(fd)
	var buf []byte
	chunk := make([]byte, 1<<16)
	for {
		n, err := unix.Read(fd, chunk)
		if n <= 0 || err != nil {
			break
		}
		buf = append(buf, chunk[:n]...)
	}
	n := 0
	needle := []byte("memfd:guestmem-test")
	for i := 0; i+len(needle) <= len(buf); i++ {
		if string(buf[i:i+len(needle)]) == string(needle) {
			n++
		}
	}
	return n
}

func TestClosedTableIsEmpty(t *testing.T) {
	tb, _ := twoRegions(t)
	if err := tb.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := tb.GPA(0x1000, 1); !errors.Is(err, ErrUnmapped) {
		t.Fatalf("lookup after Close: %v", err)
	}
	if got, err := tb.AppendGPA(nil, 0x1000, 1, 4); !errors.Is(err, ErrUnmapped) || len(got) != 0 {
		t.Fatalf("AppendGPA after Close: %v", err)
	}
	if got, err := twoRegionsAppend(t, -1); !errors.Is(err, ErrTooManySegments) || len(got) != 0 {
		t.Fatalf("negative max: %v", err)
	}
}

func twoRegionsAppend(t *testing.T, max int) ([][]byte, error) {
	tb, _ := twoRegions(t)
	return tb.AppendGPA(nil, 0x1000, 1, max)
}

// TestAddRemove grows a table one region at a time (ADD_MEM_REG), removes
// one (REM_MEM_REG), and checks lookups, refusals and that mappings move
// rather than leak or get unmapped under the new table.
func TestAddRemove(t *testing.T) {
	base := memfdMappings(t)
	a, b := memfd(t, 1<<20), memfd(t, 2<<20)
	ra := Region{GPA: 0, Size: 1 << 20, UVA: 0x10000000}
	rb := Region{GPA: 1 << 20, Size: 2 << 20, UVA: 0x20000000}
	t1, err := Add(nil, ra, a)
	if err != nil {
		t.Fatal(err)
	}
	mem, _ := t1.GPA(0, 4)
	copy(mem, "abcd")
	t2, err := Add(t1, rb, b)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := t1.GPA(0, 1); !errors.Is(err, ErrUnmapped) {
		t.Fatalf("old table still answers after Add: %v", err)
	}
	t1.Close() // must not unmap what t2 now owns
	if got, err := t2.GPA(0, 4); err != nil || string(got) != "abcd" {
		t.Fatalf("region A after Add: %q %v", got, err)
	}
	if _, err := t2.GPA(1<<20+100, 8); err != nil {
		t.Fatalf("region B: %v", err)
	}
	if _, err := Add(t2, Region{GPA: 1 << 19, Size: 1 << 20, UVA: 0x30000000}, a); !errors.Is(err, ErrOverlap) {
		t.Fatalf("overlapping ADD: %v", err)
	}
	if _, err := t2.GPA(0, 1); err != nil {
		t.Fatalf("a refused Add changed the table: %v", err)
	}
	if got := memfdMappings(t) - base; got != 2 {
		t.Fatalf("%d memfd mappings, want 2", got)
	}
	if _, err := Remove(t2, Region{GPA: 5 << 20, Size: 1, UVA: 1}); !errors.Is(err, ErrNoSuchRegion) {
		t.Fatalf("removing an unknown region: %v", err)
	}
	t3, err := Remove(t2, ra)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := t3.GPA(0, 1); !errors.Is(err, ErrUnmapped) {
		t.Fatalf("removed region still mapped: %v", err)
	}
	if _, err := t3.GPA(1<<20, 1); err != nil {
		t.Fatalf("remaining region: %v", err)
	}
	if got := memfdMappings(t) - base; got != 1 {
		t.Fatalf("%d memfd mappings after Remove, want 1", got)
	}
	t3.Close()
	if got := memfdMappings(t) - base; got != 0 {
		t.Fatalf("%d memfd mappings left after Close", got)
	}
}

package malloc

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// hugePageBytes is the huge page size used: the PMD size of x86-64 (and of
// arm64 with 4 KiB pages). hugetlb mappings ask for it by size
// (MAP_HUGE_2MB), so a host whose default hugetlb size is 1 GiB still gets
// 2 MiB pages from the 2 MiB pool.
const hugePageBytes = 2 << 20

// hugetlbDir is the kernel's 2 MiB hugetlb pool.
const hugetlbDir = "/sys/kernel/mm/hugepages/hugepages-2048kB"

// hugetlbCounts is the 2 MiB hugetlb pool as the kernel reports it.
type hugetlbCounts struct {
	total, free, reserved, overcommit, surplus uint64
}

// available is how many pages a new mapping can reserve: free pages not
// promised to other mappings, plus the surplus the kernel may still allocate
// (vm.nr_overcommit_hugepages).
func (c hugetlbCounts) available() uint64 {
	var n uint64
	if c.free > c.reserved {
		n = c.free - c.reserved
	}
	if c.overcommit > c.surplus {
		n += c.overcommit - c.surplus
	}
	return n
}

func (c hugetlbCounts) String() string {
	return fmt.Sprintf("nr_hugepages %d, free %d, reserved %d, nr_overcommit_hugepages %d, surplus %d",
		c.total, c.free, c.reserved, c.overcommit, c.surplus)
}

// readHugetlbPool reads the 2 MiB pool's counters; tests replace it to play
// a host with or without free hugepages. A kernel without hugetlbfs (or
// without 2 MiB pages) has no such directory: an empty pool.
var readHugetlbPool = func() (hugetlbCounts, error) {
	var c hugetlbCounts
	for _, f := range []struct {
		name string
		v    *uint64
	}{
		{"nr_hugepages", &c.total}, {"free_hugepages", &c.free}, {"resv_hugepages", &c.reserved},
		{"nr_overcommit_hugepages", &c.overcommit}, {"surplus_hugepages", &c.surplus},
	} {
		data, err := os.ReadFile(hugetlbDir + "/" + f.name)
		if errors.Is(err, os.ErrNotExist) {
			return hugetlbCounts{}, nil
		}
		if err != nil {
			return hugetlbCounts{}, err
		}
		if *f.v, err = strconv.ParseUint(strings.TrimSpace(string(data)), 10, 64); err != nil {
			return hugetlbCounts{}, fmt.Errorf("%s/%s: %w", hugetlbDir, f.name, err)
		}
	}
	return c, nil
}

// readTHPSetting returns the kernel's transparent huge page mode: "always",
// "madvise", "never", or "" when the kernel has no THP. Tests replace it.
var readTHPSetting = func() string {
	data, err := os.ReadFile("/sys/kernel/mm/transparent_hugepage/enabled")
	if err != nil {
		return ""
	}
	// "always [madvise] never": the bracketed word is the mode.
	s := string(data)
	i, j := strings.IndexByte(s, '['), strings.IndexByte(s, ']')
	if i < 0 || j < i {
		return ""
	}
	return s[i+1 : j]
}

// memory is a populated mapping and what backs it.
type memory struct {
	mapping   []byte // the whole mapping, a multiple of the page size
	backing   string // BackingHugeTLB, BackingTHP or Backing4K
	hugeBytes uint64 // bytes of the mapping on huge pages once populated
	// notHugetlb says why "auto" did not use hugetlb ("" otherwise).
	notHugetlb string
}

// allocate maps and populates at least size bytes as mode asks, at at
// (inside the disk's reservation) when it is not nil. name is the bdev's,
// for errors.
func allocate(name string, size uint64, mode string, at unsafe.Pointer) (*memory, error) {
	hugeSize := roundUp(size, hugePageBytes)
	pages := hugeSize / hugePageBytes
	switch mode {
	case HugepagesHugeTLB:
		pool, err := readHugetlbPool()
		if err != nil {
			return nil, fmt.Errorf("malloc bdev %q: hugepages = %q: %w", name, mode, err)
		}
		if pool.available() < pages {
			return nil, fmt.Errorf("malloc bdev %q: hugepages = %q: %d MiB needs %d free 2 MiB hugepages, %d available (%v); "+
				"raise vm.nr_hugepages or use hugepages = %q", name, mode, hugeSize>>20, pages, pool.available(), pool, HugepagesAuto)
		}
		m, err := mapHugeTLB(at, hugeSize)
		if err != nil {
			return nil, fmt.Errorf("malloc bdev %q: hugepages = %q: %w", name, mode, err)
		}
		return m, nil
	case HugepagesTHP:
		if s := readTHPSetting(); s == "never" || s == "" {
			return nil, fmt.Errorf("malloc bdev %q: hugepages = %q: transparent huge pages are disabled "+
				"(/sys/kernel/mm/transparent_hugepage/enabled is %q); use hugepages = %q or %q", name, mode, s, HugepagesHugeTLB, HugepagesAuto)
		}
		m, err := mapTHP(at, hugeSize)
		if err != nil {
			return nil, fmt.Errorf("malloc bdev %q: hugepages = %q: %w", name, mode, err)
		}
		return m, nil
	case HugepagesNone:
		m, err := map4K(at, roundUp(size, uint64(os.Getpagesize())))
		if err != nil {
			return nil, fmt.Errorf("malloc bdev %q: hugepages = %q: %w", name, mode, err)
		}
		return m, nil
	case HugepagesAuto:
		return allocateAuto(name, size, at)
	}
	return nil, fmt.Errorf("malloc bdev %q: hugepages %q is not %q, %q, %q or %q", name, mode,
		HugepagesAuto, HugepagesHugeTLB, HugepagesTHP, HugepagesNone)
}

// allocateAuto takes hugetlb pages when the pool has enough, else THP, else
// 4 KiB pages. It fails only when memory itself is short.
func allocateAuto(name string, size uint64, at unsafe.Pointer) (*memory, error) {
	hugeSize := roundUp(size, hugePageBytes)
	pages := hugeSize / hugePageBytes
	var why string
	switch pool, err := readHugetlbPool(); {
	case err != nil:
		why = err.Error()
	case pool.available() < pages:
		why = fmt.Sprintf("needs %d free 2 MiB hugepages, %d available (%v)", pages, pool.available(), pool)
	default:
		m, err := mapHugeTLB(at, hugeSize)
		if err == nil {
			return m, nil
		}
		// Another process took the pages between the check and the mapping.
		why = err.Error()
	}
	var m *memory
	var err error
	if s := readTHPSetting(); s != "never" && s != "" {
		m, err = mapTHP(at, hugeSize)
	} else {
		m, err = map4K(at, roundUp(size, uint64(os.Getpagesize())))
	}
	if err != nil {
		return nil, fmt.Errorf("malloc bdev %q: hugepages = %q: %w", name, HugepagesAuto, err)
	}
	m.notHugetlb = why
	return m, nil
}

// fixed returns MAP_FIXED when at names where a mapping must go (inside
// the disk's reserved address space, see reserve), 0 otherwise.
func fixed(at unsafe.Pointer) int {
	if at != nil {
		return unix.MAP_FIXED
	}
	return 0
}

// mapHugeTLB maps length bytes (a multiple of hugePageBytes) of 2 MiB
// hugetlb pages, at at if it is not nil, and populates them. The mapping reserves its pages from the
// pool when it is made, so populating cannot run out of them.
func mapHugeTLB(at unsafe.Pointer, length uint64) (*memory, error) {
	p, err := unix.MmapPtr(-1, 0, at, uintptr(length), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_HUGETLB|unix.MAP_HUGE_2MB|fixed(at))
	if err != nil {
		return nil, fmt.Errorf("mmap %d bytes of 2 MiB hugetlb pages: %w", length, err)
	}
	m := unsafe.Slice((*byte)(p), length)
	if err := populate(m, hugePageBytes); err != nil {
		unmap(m)
		return nil, err
	}
	return &memory{mapping: m, backing: BackingHugeTLB, hugeBytes: length}, nil
}

// mapTHP maps length bytes (a multiple of hugePageBytes) at a 2 MiB-aligned
// address (at, if it is not nil), asks for transparent huge pages (MADV_HUGEPAGE) and populates
// it. The kernel gives huge pages where it can find free 2 MiB blocks and 4
// KiB pages elsewhere; hugeBytes says how much it gave.
func mapTHP(at unsafe.Pointer, length uint64) (*memory, error) {
	start := at
	if at != nil {
		// The reservation is 2 MiB aligned, and so is every mapping in it.
		if _, err := unix.MmapPtr(-1, 0, at, uintptr(length), unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED); err != nil {
			return nil, fmt.Errorf("mmap %d bytes: %w", length, err)
		}
	} else {
		var err error
		if start, err = mapAligned(length, unix.PROT_READ|unix.PROT_WRITE); err != nil {
			return nil, err
		}
	}
	m := unsafe.Slice((*byte)(start), length)
	if err := unix.Madvise(m, unix.MADV_HUGEPAGE); err != nil {
		unmap(m)
		return nil, fmt.Errorf("madvise(MADV_HUGEPAGE): %w", err)
	}
	if err := populate(m, os.Getpagesize()); err != nil {
		unmap(m)
		return nil, err
	}
	huge, err := anonHugeBytes(m)
	if err != nil {
		unmap(m)
		return nil, err
	}
	return &memory{mapping: m, backing: BackingTHP, hugeBytes: huge}, nil
}

// map4K maps (at at, if it is not nil) and populates length bytes of 4 KiB
// pages. MADV_NOHUGEPAGE
// keeps them small even where THP is "always": "none" means none.
func map4K(at unsafe.Pointer, length uint64) (*memory, error) {
	p, err := unix.MmapPtr(-1, 0, at, uintptr(length), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|fixed(at))
	if err != nil {
		return nil, fmt.Errorf("mmap %d bytes: %w", length, err)
	}
	m := unsafe.Slice((*byte)(p), length)
	// EINVAL on kernels without THP, where every page is small anyway.
	unix.Madvise(m, unix.MADV_NOHUGEPAGE)
	if err := populate(m, os.Getpagesize()); err != nil {
		unmap(m)
		return nil, err
	}
	return &memory{mapping: m, backing: Backing4K}, nil
}

// populate faults every page of m in for writing, so that each is a page of
// its own before the first IO: not the shared zero page (what a read of an
// untouched private page maps) and no fault left for a first write.
// MADV_POPULATE_WRITE (Linux 5.14) does it in one call and reports failure;
// older kernels refuse the advice (EINVAL) and get one write per page.
func populate(m []byte, pageBytes int) error {
	for range 100 {
		err := unix.Madvise(m, unix.MADV_POPULATE_WRITE)
		switch err {
		case nil:
			return nil
		case unix.EINTR:
			continue // a signal arrived mid-way; the pages done stay done
		case unix.EINVAL:
			for off := 0; off < len(m); off += pageBytes {
				m[off] = 0
			}
			return nil
		}
		return fmt.Errorf("populate %d bytes (MADV_POPULATE_WRITE): %w", len(m), err)
	}
	return fmt.Errorf("populate %d bytes (MADV_POPULATE_WRITE): interrupted 100 times", len(m))
}

// mapAligned maps length bytes (a multiple of hugePageBytes) with prot at a
// 2 MiB-aligned address: one huge page more is mapped and the unaligned ends
// are cut off, so every 2 MiB of it can be one huge page.
func mapAligned(length uint64, prot int) (unsafe.Pointer, error) {
	flags := unix.MAP_PRIVATE | unix.MAP_ANONYMOUS
	if prot == unix.PROT_NONE {
		flags |= unix.MAP_NORESERVE
	}
	p, err := unix.MmapPtr(-1, 0, nil, uintptr(length+hugePageBytes), prot, flags)
	if err != nil {
		return nil, fmt.Errorf("mmap %d bytes: %w", length+hugePageBytes, err)
	}
	head := (hugePageBytes - uintptr(p)%hugePageBytes) % hugePageBytes
	start := unsafe.Add(p, head)
	if head > 0 {
		unix.MunmapPtr(p, head) // cannot fail: a whole-page part of our own mapping
	}
	if tail := hugePageBytes - head; tail > 0 {
		unix.MunmapPtr(unsafe.Add(start, length), tail)
	}
	return start, nil
}

// reserve takes length bytes (a multiple of hugePageBytes) of address space,
// 2 MiB aligned, with no access and no memory behind it: the disk's memory
// is mapped into its start, and a Resize that grows the disk maps more right
// after it, so the disk's address never changes while reactors use it.
func reserve(length uint64) (unsafe.Pointer, error) {
	return mapAligned(length, unix.PROT_NONE)
}

// release gives [at, at+length) back to the reservation: the pages are freed
// and the range is inaccessible again.
func release(at unsafe.Pointer, length uint64) error {
	if length == 0 {
		return nil
	}
	_, err := unix.MmapPtr(-1, 0, at, uintptr(length), unix.PROT_NONE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE|unix.MAP_FIXED)
	return err
}

func unmap(m []byte) error {
	return unix.MunmapPtr(unsafe.Pointer(unsafe.SliceData(m)), uintptr(len(m)))
}

func roundUp(n, to uint64) uint64 { return (n + to - 1) / to * to }

// vma is what /proc/self/smaps says about the mapping holding an address.
type vma struct {
	start, end     uintptr
	anonymous      uint64 // bytes of private anonymous pages (not the zero page)
	anonHuge       uint64 // bytes of those on transparent huge pages
	privateHugetlb uint64 // bytes of private hugetlb pages
	flags          []string
}

// smapsOf returns the smaps entry of the mapping holding m[0]. The kernel
// may have merged m with a neighbouring mapping of the same kind (another
// malloc disk), so its counters cover at least m.
func smapsOf(m []byte) (vma, error) {
	data, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		return vma{}, err
	}
	addr := uintptr(unsafe.Pointer(unsafe.SliceData(m)))
	var v vma
	found := false
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := sc.Text()
		if lo, hi, ok := vmaRange(line); ok {
			if found {
				break // the next mapping's header: ours is complete
			}
			if addr >= lo && addr < hi {
				v, found = vma{start: lo, end: hi}, true
			}
			continue
		}
		if !found {
			continue
		}
		key, val, _ := strings.Cut(line, ":")
		val = strings.TrimSpace(val)
		switch key {
		case "Anonymous":
			v.anonymous = kB(val)
		case "AnonHugePages":
			v.anonHuge = kB(val)
		case "Private_Hugetlb":
			v.privateHugetlb = kB(val)
		case "VmFlags":
			v.flags = strings.Fields(val)
		}
	}
	if !found {
		return vma{}, fmt.Errorf("/proc/self/smaps: no mapping holds %#x", addr)
	}
	return v, sc.Err()
}

// vmaRange parses a smaps header line ("7f12a0000000-7f12a0400000 rw-p ...").
func vmaRange(line string) (lo, hi uintptr, ok bool) {
	r, _, _ := strings.Cut(line, " ")
	a, b, ok := strings.Cut(r, "-")
	if !ok {
		return 0, 0, false
	}
	x, err1 := strconv.ParseUint(a, 16, 64)
	y, err2 := strconv.ParseUint(b, 16, 64)
	if err1 != nil || err2 != nil {
		return 0, 0, false
	}
	return uintptr(x), uintptr(y), true
}

// kB parses "2048 kB" into bytes.
func kB(s string) uint64 {
	n, _ := strconv.ParseUint(strings.TrimSuffix(s, " kB"), 10, 64)
	return n << 10
}

// anonHugeBytes is how much of m the kernel put on transparent huge pages,
// at most len(m).
func anonHugeBytes(m []byte) (uint64, error) {
	v, err := smapsOf(m)
	if err != nil {
		return 0, fmt.Errorf("reading what backs the memory: %w", err)
	}
	return min(v.anonHuge, uint64(len(m))), nil
}

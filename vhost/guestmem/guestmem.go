// Package guestmem maps a vhost-user memory table and translates guest addresses into host byte slices.
//
// The front-end (QEMU, SPDK's virtio-user) describes guest RAM as regions, each an fd plus three coordinates:
// the guest physical address (descriptor addr fields are GPAs), the front-end's own virtual address (ring
// addresses in SET_VRING_ADDR are UVAs) and the region's offset inside the fd. A Table is immutable once built:
// the vhost-user server builds a new one for every SET_MEM_TABLE and swaps whole tables, so lookups need no lock
// and may run on several reactors at once.
//
// Guest memory is hostile: every lookup checks the whole [addr, addr+n) range, with overflow-checked arithmetic,
// and returned slices are capped (s[i:j:j]) so an append can never run into a neighbouring region.
// Lookups allocate nothing on success; error paths allocate their context (a guest fault, not the hot path).
package guestmem

import (
	"errors"
	"fmt"
	"math"
	"unsafe"

	"golang.org/x/sys/unix"
)

// MaxRegions is the largest memory table accepted. SET_MEM_TABLE carries at most 8 regions
// (VHOST_MEMORY_BASELINE_NREGIONS), but with VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS the front-end adds
// regions one by one up to the back-end's GET_MAX_MEM_SLOTS answer; 509 is the value libvhost-user and
// rust-vmm's vhost-user-backend report (KVM's 512 slots less those QEMU keeps for itself).
const MaxRegions = 509

// Errors returned (wrapped with the region or address at fault) by this package. Test with errors.Is.
var (
	// ErrUnmapped: an address range is not (entirely) covered by the table.
	ErrUnmapped = errors.New("guestmem: address not mapped")
	// ErrOverflow: addr+len (or a region's gpa+size, uva+size, mmap_offset+size) wraps around 2^64 or does not
	// fit the host's address space.
	ErrOverflow = errors.New("guestmem: address range overflows")
	// ErrOverlap: two regions share guest physical or front-end virtual addresses.
	ErrOverlap = errors.New("guestmem: regions overlap")
	// ErrZeroSize: a region has size 0.
	ErrZeroSize = errors.New("guestmem: region size is zero")
	// ErrTooManyRegions: the table has more than MaxRegions regions.
	ErrTooManyRegions = errors.New("guestmem: too many regions")
	// ErrBeyondFile: mmap_offset+size lies past the end of the region's backing file (or byte slice), so touching
	// the tail would SIGBUS.
	ErrBeyondFile = errors.New("guestmem: region extends beyond its file")
	// ErrFDCount: the number of fds (or byte slices) differs from the number of regions.
	ErrFDCount = errors.New("guestmem: fd count does not match region count")
	// ErrTooManySegments: a buffer spans more regions than the caller allows segments for.
	ErrTooManySegments = errors.New("guestmem: buffer needs too many segments")
)

// Region is one entry of a vhost-user memory table (SET_MEM_TABLE, ADD_MEM_REG): guest physical address, size,
// the front-end's user (virtual) address, and the offset of the region inside its fd.
type Region struct {
	GPA, Size, UVA, MmapOffset uint64
}

// AddrError reports a failed translation: which address space, the range asked for, and why.
type AddrError struct {
	Space string // "gpa" or "uva"
	Addr  uint64
	Len   uint64
	Err   error // ErrUnmapped, ErrOverflow or ErrTooManySegments
}

func (e *AddrError) Error() string {
	return fmt.Sprintf("%v: %s [%#x, +%#x)", e.Err, e.Space, e.Addr, e.Len)
}

func (e *AddrError) Unwrap() error { return e.Err }

// RegionError reports a region rejected by Map or FromBytes.
type RegionError struct {
	Index  int
	Region Region
	Err    error
}

func (e *RegionError) Error() string {
	r := e.Region
	return fmt.Sprintf("region %d (gpa %#x size %#x uva %#x mmap_offset %#x): %v",
		e.Index, r.GPA, r.Size, r.UVA, r.MmapOffset, e.Err)
}

func (e *RegionError) Unwrap() error { return e.Err }

// region is one mapped region: its coordinates and the host bytes [MmapOffset, MmapOffset+Size) of its backing.
type region struct {
	Region
	host    []byte // len == cap == Size
	mapping []byte // the whole mmap (nil for FromBytes), kept for munmap
	dev     uint64 // backing file identity (Map only), for SameFiles
	ino     uint64
}

// Table is an immutable, validated set of guest memory regions.
type Table struct {
	regions []region
	byGPA   []int32 // region indexes sorted by GPA (regions do not overlap, so also by end)
	byUVA   []int32 // region indexes sorted by UVA
}

// FromBytes builds a Table over caller-owned memory, for tests and fuzzing: mem[i] plays region i's file, so
// region i's host bytes are mem[i][MmapOffset : MmapOffset+Size]. The same validations as Map apply.
func FromBytes(regions []Region, mem [][]byte) (*Table, error) {
	if len(mem) != len(regions) {
		return nil, fmt.Errorf("%w: %d byte slices for %d regions", ErrFDCount, len(mem), len(regions))
	}
	if err := validate(regions); err != nil {
		return nil, err
	}
	t := &Table{regions: make([]region, len(regions))}
	for i, r := range regions {
		// r.MmapOffset+r.Size cannot overflow: validate checked it.
		if r.MmapOffset+r.Size > uint64(len(mem[i])) {
			return nil, &RegionError{i, r, fmt.Errorf("%w: backing has %d bytes", ErrBeyondFile, len(mem[i]))}
		}
		end := r.MmapOffset + r.Size
		t.regions[i] = region{Region: r, host: mem[i][r.MmapOffset:end:end]}
	}
	t.index()
	return t, nil
}

// Map mmaps each region's fd and returns the Table. Each fd is mapped MAP_SHARED, read-write, from file offset 0
// with length mmap_offset+size rounded up to the fd's st_blksize: hugetlbfs refuses lengths that are not a
// multiple of its page size, and mmap_offset need not be page aligned, so it is never passed as the mmap offset
// (DPDK vhost_user_mmap_region does the same). Map validates every region first (see validate) and, for regular
// files (memfd included), that mmap_offset+size lies inside the file, because touching a page past EOF raises
// SIGBUS in the reactor. Map does not close the fds; the caller does, after Map returns (the mappings stay valid).
// On error nothing stays mapped.
func Map(regions []Region, fds []int) (_ *Table, err error) {
	if len(fds) != len(regions) {
		return nil, fmt.Errorf("%w: %d fds for %d regions", ErrFDCount, len(fds), len(regions))
	}
	if err := validate(regions); err != nil {
		return nil, err
	}
	t := &Table{regions: make([]region, len(regions))}
	defer func() {
		if err != nil {
			t.Close()
		}
	}()
	for i, r := range regions {
		if t.regions[i], err = mapRegion(i, r, fds[i]); err != nil {
			return nil, err
		}
	}
	t.index()
	return t, nil
}

// mapRegion maps one validated region (index i, for errors) from fd.
func mapRegion(i int, r Region, fd int) (region, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return region{}, &RegionError{i, r, fmt.Errorf("fstat fd %d: %w", fd, err)}
	}
	end := r.MmapOffset + r.Size // cannot overflow: validate checked it
	if st.Mode&unix.S_IFMT == unix.S_IFREG && (st.Size < 0 || end > uint64(st.Size)) {
		return region{}, &RegionError{i, r, fmt.Errorf("%w: file has %d bytes", ErrBeyondFile, st.Size)}
	}
	blk := uint64(st.Blksize)
	if blk == 0 || blk&(blk-1) != 0 {
		blk = uint64(unix.Getpagesize())
	}
	length := (end + blk - 1) &^ (blk - 1)
	if length < end || length > math.MaxInt {
		return region{}, &RegionError{i, r, fmt.Errorf("%w: mapping length", ErrOverflow)}
	}
	m, err := unix.Mmap(fd, 0, int(length), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return region{}, &RegionError{i, r, fmt.Errorf("mmap fd %d length %#x: %w", fd, length, err)}
	}
	return region{Region: r, host: m[r.MmapOffset:end:end], mapping: m, dev: uint64(st.Dev), ino: uint64(st.Ino)}, nil
}

// ErrNoSuchRegion is returned by Remove for a region the table does not hold.
var ErrNoSuchRegion = errors.New("guestmem: no such region")

// Add maps one more region (vhost-user ADD_MEM_REG) and returns a table with
// t's regions and the new one; t may be nil (no table yet). The mappings move:
// on success t is left empty, so closing it unmaps nothing the new table uses.
// The caller must have quiesced every user of t. On error t is unchanged.
func Add(t *Table, r Region, fd int) (*Table, error) {
	var old []region
	if t != nil {
		old = t.regions
	}
	all := make([]Region, 0, len(old)+1)
	for _, o := range old {
		all = append(all, o.Region)
	}
	all = append(all, r)
	if err := validate(all); err != nil {
		return nil, err
	}
	nr, err := mapRegion(len(old), r, fd)
	if err != nil {
		return nil, err
	}
	n := &Table{regions: append(append(make([]region, 0, len(old)+1), old...), nr)}
	n.index()
	if t != nil {
		t.regions, t.byGPA, t.byUVA = nil, nil, nil
	}
	return n, nil
}

// Remove unmaps the region with r's guest address, size and front-end
// address (vhost-user REM_MEM_REG; mmap_offset is not compared) and returns
// a table with the rest. The mappings move as in Add. On error t is unchanged.
func Remove(t *Table, r Region) (*Table, error) {
	if t != nil {
		for i, o := range t.regions {
			if o.GPA != r.GPA || o.Size != r.Size || o.UVA != r.UVA {
				continue
			}
			n := &Table{regions: append(append(make([]region, 0, len(t.regions)-1), t.regions[:i]...), t.regions[i+1:]...)}
			n.index()
			gone := &Table{regions: []region{o}}
			t.regions, t.byGPA, t.byUVA = nil, nil, nil
			gone.Close() // munmap of a mapping we made cannot fail short of a bug
			return n, nil
		}
	}
	return nil, &RegionError{-1, r, ErrNoSuchRegion}
}

// validate checks what can be checked without the backing: count, sizes, overflow and overlaps.
func validate(regions []Region) error {
	if len(regions) > MaxRegions {
		return fmt.Errorf("%w: %d > %d", ErrTooManyRegions, len(regions), MaxRegions)
	}
	for i, r := range regions {
		switch {
		case r.Size == 0:
			return &RegionError{i, r, ErrZeroSize}
		case r.Size > math.MaxUint64-r.GPA:
			return &RegionError{i, r, fmt.Errorf("%w: gpa+size", ErrOverflow)}
		case r.Size > math.MaxUint64-r.UVA:
			return &RegionError{i, r, fmt.Errorf("%w: uva+size", ErrOverflow)}
		case r.Size > math.MaxUint64-r.MmapOffset:
			return &RegionError{i, r, fmt.Errorf("%w: mmap_offset+size", ErrOverflow)}
		case r.MmapOffset+r.Size > math.MaxInt:
			// A Go slice cannot hold it, and no host can map it.
			return &RegionError{i, r, fmt.Errorf("%w: mmap_offset+size exceeds the host address space", ErrOverflow)}
		}
	}
	// Pairwise overlap checks: the table is small (≤ MaxRegions) and this runs once per SET_MEM_TABLE.
	for i := range regions {
		for j := i + 1; j < len(regions); j++ {
			a, b := regions[i], regions[j]
			if a.GPA < b.GPA+b.Size && b.GPA < a.GPA+a.Size {
				return &RegionError{j, b, fmt.Errorf("%w: gpa range of region %d", ErrOverlap, i)}
			}
			if a.UVA < b.UVA+b.Size && b.UVA < a.UVA+a.Size {
				return &RegionError{j, b, fmt.Errorf("%w: uva range of region %d", ErrOverlap, i)}
			}
		}
	}
	return nil
}

// index builds the sorted lookup orders (insertion sort: n ≤ MaxRegions, once per table).
func (t *Table) index() {
	n := len(t.regions)
	t.byGPA = make([]int32, n)
	t.byUVA = make([]int32, n)
	for i := range n {
		t.byGPA[i], t.byUVA[i] = int32(i), int32(i)
	}
	sortBy(t.byGPA, func(i int32) uint64 { return t.regions[i].GPA })
	sortBy(t.byUVA, func(i int32) uint64 { return t.regions[i].UVA })
}

func sortBy(idx []int32, key func(int32) uint64) {
	for i := 1; i < len(idx); i++ {
		for j := i; j > 0 && key(idx[j]) < key(idx[j-1]); j-- {
			idx[j], idx[j-1] = idx[j-1], idx[j]
		}
	}
}

// Close unmaps every region mapped by Map (a no-op for FromBytes tables). The caller must make sure nothing
// still uses the table's slices: in-flight I/O writing into an unmapped range would fault or hit reused memory.
// Afterwards the table is empty (every lookup fails with ErrUnmapped). Close is idempotent.
func (t *Table) Close() error {
	var first error
	for i := range t.regions {
		if m := t.regions[i].mapping; m != nil {
			if err := unix.Munmap(m); err != nil && first == nil {
				first = fmt.Errorf("guestmem: munmap region %d: %w", i, err)
			}
			t.regions[i].mapping = nil
		}
		t.regions[i].host = nil
	}
	t.regions, t.byGPA, t.byUVA = nil, nil, nil
	return first
}

// Regions returns a copy of the table's regions, in the order they were given.
func (t *Table) Regions() []Region {
	out := make([]Region, len(t.regions))
	for i := range t.regions {
		out[i] = t.regions[i].Region
	}
	return out
}

// Equal reports whether regions has the same layout as the table, in the same order (QEMU resends an identical
// SET_MEM_TABLE at every device start; the server skips remapping then, but must still close the new fds).
// Layout equality does not prove the same backing: see SameFiles.
func (t *Table) Equal(regions []Region) bool {
	if len(regions) != len(t.regions) {
		return false
	}
	for i := range regions {
		if regions[i] != t.regions[i].Region {
			return false
		}
	}
	return true
}

// SameFiles reports whether fds[i] is the same file (device and inode) that region i was mapped from. A table
// built by FromBytes never matches. Use it with Equal before reusing a table: a front-end could in principle
// resend the same layout backed by new memory.
func (t *Table) SameFiles(fds []int) bool {
	if len(fds) != len(t.regions) {
		return false
	}
	for i, fd := range fds {
		r := &t.regions[i]
		if r.mapping == nil {
			return false
		}
		var st unix.Stat_t
		if unix.Fstat(fd, &st) != nil || uint64(st.Dev) != r.dev || uint64(st.Ino) != r.ino {
			return false
		}
	}
	return true
}

// find returns the region containing addr in the order idx (sorted by key), or nil. Binary search: no
// allocation, no shared mutable hint (tables are used from several reactors at once).
func (t *Table) find(idx []int32, addr uint64, uva bool) *region {
	lo, hi := 0, len(idx) // find the last region whose start ≤ addr
	for lo < hi {
		mid := int(uint(lo+hi) >> 1)
		r := &t.regions[idx[mid]]
		start := r.GPA
		if uva {
			start = r.UVA
		}
		if start <= addr {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	if lo == 0 {
		return nil
	}
	r := &t.regions[idx[lo-1]]
	start := r.GPA
	if uva {
		start = r.UVA
	}
	if addr-start >= r.Size { // addr ≥ start here, so no wrap
		return nil
	}
	return r
}

func (t *Table) lookup(space string, addr, n uint64) ([]byte, error) {
	uva := space == "uva"
	idx := t.byGPA
	if uva {
		idx = t.byUVA
	}
	if n > math.MaxUint64-addr {
		return nil, &AddrError{space, addr, n, ErrOverflow}
	}
	r := t.find(idx, addr, uva)
	if r == nil {
		return nil, &AddrError{space, addr, n, ErrUnmapped}
	}
	start := r.GPA
	if uva {
		start = r.UVA
	}
	off := addr - start // < r.Size
	if n > r.Size-off {
		return nil, &AddrError{space, addr, n, ErrUnmapped}
	}
	// off+n ≤ Size ≤ len(host) ≤ MaxInt: the conversions cannot overflow.
	return r.host[off : off+n : off+n], nil
}

// GPA returns the host bytes for guest physical range [gpa, gpa+n) when it lies inside one region.
// n == 0 still requires gpa to be mapped.
func (t *Table) GPA(gpa, n uint64) ([]byte, error) { return t.lookup("gpa", gpa, n) }

// UVA returns the host bytes for front-end virtual range [uva, uva+n) when it lies inside one region (vring
// addresses in SET_VRING_ADDR are UVAs).
func (t *Table) UVA(uva, n uint64) ([]byte, error) { return t.lookup("uva", uva, n) }

// HostGPA returns the guest physical address of host bytes b, which must lie in one of the table's regions
// (a segment AppendGPA returned), and whether they do. It scans the regions: for the dirty page log while a
// VM migrates, not for every request.
func (t *Table) HostGPA(b []byte) (uint64, bool) {
	if len(b) == 0 {
		return 0, false
	}
	p := uintptr(unsafe.Pointer(&b[0]))
	for i := range t.regions {
		r := &t.regions[i]
		if len(r.host) == 0 {
			continue
		}
		base := uintptr(unsafe.Pointer(&r.host[0]))
		if p >= base && p-base < uintptr(len(r.host)) && uint64(p-base)+uint64(len(b)) <= uint64(len(r.host)) {
			return r.GPA + uint64(p-base), true
		}
	}
	return 0, false
}

// AppendGPA appends to dst the host segments covering [gpa, gpa+n), one per region crossed (a buffer may span
// adjacent regions, as SPDK's vhost_vring_desc_payload_to_iov allows). It fails without appending when any
// byte is unmapped, when gpa+n overflows, or when more than max segments would be needed. n == 0 appends
// nothing. It allocates only if dst lacks capacity for the new segments.
func (t *Table) AppendGPA(dst [][]byte, gpa uint64, n uint32, max int) ([][]byte, error) {
	if uint64(n) > math.MaxUint64-gpa {
		return dst, &AddrError{"gpa", gpa, uint64(n), ErrOverflow}
	}
	orig := len(dst)
	addr, left := gpa, uint64(n)
	for left > 0 {
		r := t.find(t.byGPA, addr, false)
		if r == nil {
			return dst[:orig], &AddrError{"gpa", gpa, uint64(n), ErrUnmapped}
		}
		if len(dst)-orig >= max {
			return dst[:orig], &AddrError{"gpa", gpa, uint64(n), ErrTooManySegments}
		}
		off := addr - r.GPA
		take := min(left, r.Size-off)
		dst = append(dst, r.host[off:off+take:off+take])
		addr += take // ≤ gpa+n: no overflow
		left -= take
	}
	return dst, nil
}

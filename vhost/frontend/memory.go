package frontend

import (
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"

	"vhost-target/vhost/proto"
)

// region is one memfd-backed slice of guest physical memory. The whole file
// (mmapOffset+size bytes) is mapped; guest bytes start mmapOffset into it, as
// QEMU's memory table describes it (vhost-user.rst "Memory region description").
type region struct {
	gpa, size  uint64
	mmapOffset uint64
	fd         int
	mapping    []byte // the whole file
	data       []byte // mapping[mmapOffset:], len size
}

func (r *region) uva() uint64 { return uint64(uintptr(unsafe.Pointer(&r.data[0]))) }

// memory is the guest RAM the front-end shares with the target.
type memory struct {
	regions []region
}

// errNoFit reports a layout that does not fit in guest memory.
var errNoFit = errors.New("frontend: guest memory too small for rings, slots and scratch")

// newMemory creates nregions memfds splitting size bytes of guest RAM evenly;
// region i starts at GPA i*size/nregions. Each memfd is mapped separately, so
// the regions get unrelated virtual addresses and GPA != UVA everywhere.
func newMemory(size uint64, nregions int, mmapOffset uint64, huge bool) (*memory, error) {
	if nregions != 1 && nregions != 2 {
		return nil, fmt.Errorf("frontend: %d memory regions (want 1 or 2)", nregions)
	}
	per := size / uint64(nregions)
	m := &memory{}
	for i := 0; i < nregions; i++ {
		flags := unix.MFD_CLOEXEC
		if huge {
			flags |= unix.MFD_HUGETLB
		}
		fd, err := unix.MemfdCreate(fmt.Sprintf("vhost-frontend-ram%d", i), flags)
		if err != nil {
			m.free()
			return nil, fmt.Errorf("frontend: memfd_create: %w", err)
		}
		total := mmapOffset + per
		if err := unix.Ftruncate(fd, int64(total)); err != nil {
			unix.Close(fd)
			m.free()
			return nil, fmt.Errorf("frontend: ftruncate guest memory to %d: %w", total, err)
		}
		b, err := unix.Mmap(fd, 0, int(total), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			unix.Close(fd)
			m.free()
			return nil, fmt.Errorf("frontend: mmap guest memory (%d bytes): %w", total, err)
		}
		m.regions = append(m.regions, region{
			gpa: uint64(i) * per, size: per, mmapOffset: mmapOffset, fd: fd,
			mapping: b, data: b[mmapOffset:],
		})
	}
	return m, nil
}

func (m *memory) free() {
	for i := range m.regions {
		r := &m.regions[i]
		if r.mapping != nil {
			unix.Munmap(r.mapping)
			r.mapping, r.data = nil, nil
		}
		if r.fd >= 0 {
			unix.Close(r.fd)
			r.fd = -1
		}
	}
}

// table returns the SET_MEM_TABLE entries.
func (m *memory) table() []proto.MemRegion {
	t := make([]proto.MemRegion, len(m.regions))
	for i, r := range m.regions {
		t[i] = proto.MemRegion{GPA: r.gpa, Size: r.size, UVA: r.uva(), MmapOffset: r.mmapOffset}
	}
	return t
}

func (m *memory) fds() []int {
	f := make([]int, len(m.regions))
	for i, r := range m.regions {
		f[i] = r.fd
	}
	return f
}

// find returns the region holding gpa, or nil.
func (m *memory) find(gpa uint64) *region {
	for i := range m.regions {
		r := &m.regions[i]
		if gpa >= r.gpa && gpa-r.gpa < r.size {
			return r
		}
	}
	return nil
}

// slice returns n guest bytes at gpa when they lie inside one region, else nil.
func (m *memory) slice(gpa uint64, n int) []byte {
	r := m.find(gpa)
	if r == nil || n < 0 || uint64(n) > r.size-(gpa-r.gpa) {
		return nil
	}
	off := gpa - r.gpa
	return r.data[off : off+uint64(n) : off+uint64(n)]
}

// uva translates a GPA to the front-end virtual address the target must use
// for ring addresses (SET_VRING_ADDR carries UVAs, descriptors carry GPAs).
func (m *memory) uva(gpa uint64) (uint64, bool) {
	r := m.find(gpa)
	if r == nil {
		return 0, false
	}
	return r.uva() + (gpa - r.gpa), true
}

// copyIn writes b at gpa, crossing region boundaries when GPA-contiguous.
func (m *memory) copyIn(gpa uint64, b []byte) error {
	for len(b) > 0 {
		r := m.find(gpa)
		if r == nil {
			return fmt.Errorf("frontend: GPA %#x is not guest RAM", gpa)
		}
		n := copy(r.data[gpa-r.gpa:], b)
		b, gpa = b[n:], gpa+uint64(n)
	}
	return nil
}

// copyOut reads len(b) bytes at gpa, crossing region boundaries.
func (m *memory) copyOut(gpa uint64, b []byte) error {
	for len(b) > 0 {
		r := m.find(gpa)
		if r == nil {
			return fmt.Errorf("frontend: GPA %#x is not guest RAM", gpa)
		}
		n := copy(b, r.data[gpa-r.gpa:])
		b, gpa = b[n:], gpa+uint64(n)
	}
	return nil
}

// allocator is a bump allocator over GPA space that never lets one
// allocation straddle a region boundary (each ring and buffer must be
// host-contiguous for the front-end's own slices).
type allocator struct {
	bounds [][2]uint64 // [start, end) per region
	i      int
	cur    uint64
}

func newAllocator(size uint64, nregions int) *allocator {
	per := size / uint64(nregions)
	a := &allocator{}
	for i := 0; i < nregions; i++ {
		a.bounds = append(a.bounds, [2]uint64{uint64(i) * per, uint64(i+1) * per})
	}
	// GPA 0 is never handed out: a zeroed descriptor must not look like ours.
	a.cur = 4096
	return a
}

func (a *allocator) alloc(size, align uint64) (uint64, error) {
	for a.i < len(a.bounds) {
		p := (a.cur + align - 1) &^ (align - 1)
		if p >= a.bounds[a.i][0] && p+size <= a.bounds[a.i][1] {
			a.cur = p + size
			return p, nil
		}
		a.i++
		if a.i < len(a.bounds) {
			a.cur = a.bounds[a.i][0]
		}
	}
	return 0, fmt.Errorf("%w: %d bytes", errNoFit, size)
}

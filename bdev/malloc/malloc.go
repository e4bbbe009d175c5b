// Package malloc is a memory-backed bdev. Its data lives in an anonymous
// mapping outside the Go heap (so the GC never scans or moves it) and its
// IOs complete inline, inside Submit, on the submitting reactor.
//
// All of a disk's memory is allocated and populated when the disk is made:
// every page is faulted in for writing before the first IO. A lazily mapped
// disk serves reads of never-written blocks from the kernel's shared zero
// page (always in cache) and takes a page fault on the first write to each
// page, so it measures neither what a guest sees on a disk it has written
// nor a steady state. Pages are 2 MiB where the host allows (a random 4 KiB
// IO over gigabytes then misses the TLB far less): hugetlbfs pages when the
// pool has enough, else transparent huge pages, else 4 KiB pages; the
// config's hugepages key can pin the choice, and the disk logs what it got.
package malloc

import (
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"vhost-target/bdev"
)

// Hugepages modes (Config.Hugepages; the config key hugepages).
const (
	HugepagesAuto    = "auto"    // hugetlb if the pool has enough free pages, else THP, else 4 KiB pages
	HugepagesHugeTLB = "hugetlb" // 2 MiB hugetlb pages, or fail
	HugepagesTHP     = "thp"     // transparent huge pages (MADV_HUGEPAGE), or fail if THP is disabled
	HugepagesNone    = "none"    // 4 KiB pages
)

// Backings: what a disk's memory got (Disk.Backing, the log line).
const (
	BackingHugeTLB = "hugetlb" // every page a 2 MiB hugetlb page
	BackingTHP     = "thp"     // madvised for THP; Disk.HugeBytes says how much the kernel made huge
	Backing4K      = "4k"      // 4 KiB pages
)

// GrowMaxDefault is the least size a disk can be grown to by Resize when
// Config.MaxSize is 0; a disk created larger can grow to GrowFactorDefault
// times its size. Only address space is reserved for it, no memory: x86-64
// user space (128 TiB) holds two thousand 64 GiB reservations.
const (
	GrowMaxDefault    = 64 << 30
	GrowFactorDefault = 4
)

// Config describes a malloc bdev.
type Config struct {
	Name      string
	Size      uint64 // bytes, a positive multiple of BlockSize; any size, the mapping is rounded up
	BlockSize uint32 // 512 or 4096
	UUID      [16]byte
	Hugepages string       // a Hugepages mode; "" is HugepagesAuto
	Logger    *slog.Logger // for the line saying what backs the disk; nil = slog.Default()
	// MaxSize is the largest size Resize can grow the disk to (0 =
	// max(GrowFactorDefault*Size, GrowMaxDefault)). That much address
	// space is reserved at Create, so growing maps memory right after the
	// disk's and reactors never see the disk move.
	MaxSize uint64
}

// Disk is a malloc bdev.
type Disk struct {
	name      string
	blockSize uint32
	info      atomic.Pointer[bdev.Info]
	// mem is the disk's whole address range: the reservation (Config.MaxSize)
	// when one could be made, else the populated mapping. Its slice header
	// never changes after Create, so reactors read it without
	// synchronisation; IOs touch only mem[:size], which is always populated.
	mem  []byte
	size atomic.Uint64 // bytes served; loaded once per IO
	// pageBytes is the unit memory is mapped in: 2 MiB for hugetlb and THP
	// backings, the base page size for 4 KiB pages.
	pageBytes uint64

	// mu guards what a resize changes on the control plane, and the count
	// of open channels that the shrink rule needs.
	mu        sync.Mutex
	mapping   []byte // the populated part of mem: mem[:size rounded up to pageBytes]
	backing   string
	hugeBytes uint64
	channels  int
}

// New makes a disk of size bytes with the given logical block size on the
// memory HugepagesAuto picks, logging to slog.Default().
func New(name string, size uint64, blockSize uint32, uuid [16]byte) (*Disk, error) {
	return Create(Config{Name: name, Size: size, BlockSize: blockSize, UUID: uuid})
}

// Create allocates and populates the disk's memory (zeroed) and logs, at
// INFO, which backing it got, how much of it is on huge pages and how long
// populating took. It takes as long as the kernel needs to clear Size bytes
// of pages: about a second per few GiB with 4 KiB pages, less with huge
// pages.
func Create(c Config) (*Disk, error) {
	if c.BlockSize != 512 && c.BlockSize != 4096 {
		return nil, fmt.Errorf("malloc bdev %q: block size %d is not 512 or 4096", c.Name, c.BlockSize)
	}
	if c.Size == 0 || c.Size%uint64(c.BlockSize) != 0 {
		return nil, fmt.Errorf("malloc bdev %q: size %d is not a positive multiple of %d", c.Name, c.Size, c.BlockSize)
	}
	if c.Size > 1<<47 {
		// Beyond any x86-64 user address space: refuse before rounding up can overflow.
		return nil, fmt.Errorf("malloc bdev %q: size %d is larger than an address space", c.Name, c.Size)
	}
	maxSize := c.MaxSize
	if maxSize == 0 {
		maxSize = min(max(GrowFactorDefault*c.Size, GrowMaxDefault), 1<<47)
	}
	if maxSize < c.Size || maxSize > 1<<47 {
		return nil, fmt.Errorf("malloc bdev %q: max size %d is below the size %d or larger than an address space", c.Name, maxSize, c.Size)
	}
	mode := c.Hugepages
	if mode == "" {
		mode = HugepagesAuto
	}
	log := c.Logger
	if log == nil {
		log = slog.Default()
	}
	// Without a reservation (an address-space limit refuses it) the disk
	// still works; Resize then cannot grow it past its mapping.
	resLen := roundUp(maxSize, hugePageBytes)
	at, err := reserve(resLen)
	if err != nil {
		log.Warn("malloc bdev: no address space reserved to grow into; resize cannot grow it", "bdev", c.Name,
			"max_size", maxSize, "err", err)
		at, resLen = nil, 0
	}
	start := time.Now()
	m, err := allocate(c.Name, c.Size, mode, at)
	if err != nil {
		if at != nil {
			unix.MunmapPtr(at, uintptr(resLen))
		}
		return nil, err
	}
	took := time.Since(start)
	d := &Disk{
		name: c.Name, blockSize: c.BlockSize,
		mem:       m.mapping,
		mapping:   m.mapping,
		backing:   m.backing,
		hugeBytes: m.hugeBytes,
		pageBytes: hugePageBytes,
	}
	if at != nil {
		d.mem = unsafe.Slice((*byte)(at), resLen)
	}
	if m.backing == Backing4K {
		d.pageBytes = uint64(os.Getpagesize())
	}
	d.size.Store(c.Size)
	d.info.Store(&bdev.Info{
		Name: c.Name, Type: "malloc", BlockSize: c.BlockSize, NumBlocks: c.Size / uint64(c.BlockSize), UUID: c.UUID,
		Unmap: true, UnmapZeroes: true, WriteZeroes: true,
	})
	attrs := []any{"bdev", c.Name, "hugepages", mode, "backing", m.backing, "size", c.Size,
		"mapped", len(m.mapping), "huge_bytes", m.hugeBytes, "populate", took.Round(time.Microsecond)}
	if m.notHugetlb != "" {
		attrs = append(attrs, "no_hugetlb", m.notHugetlb)
	}
	log.Info("malloc bdev memory allocated and populated", attrs...)
	if m.backing == BackingTHP && m.hugeBytes < uint64(len(m.mapping))/2 {
		log.Warn("transparent huge pages back less than half of the malloc bdev: memory is fragmented or THP defrag is off; "+
			"hugepages = \"hugetlb\" with vm.nr_hugepages reserved at boot avoids this",
			"bdev", c.Name, "huge_bytes", m.hugeBytes, "mapped", len(m.mapping))
	}
	return d, nil
}

// Backing returns what backs the disk's memory: BackingHugeTLB, BackingTHP
// or Backing4K.
func (d *Disk) Backing() string { return d.backing }

// HugeBytes returns how many bytes of the disk's mapping were on huge pages
// once populated (the kernel may later split or collapse THP pages).
func (d *Disk) HugeBytes() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.hugeBytes
}

// Info describes the disk: the newest description (see bdev.Info).
func (d *Disk) Info() *bdev.Info { return d.info.Load() }

// Open returns a channel; all channels share the memory.
func (d *Disk) Open() (bdev.Channel, error) {
	d.mu.Lock()
	d.channels++
	d.mu.Unlock()
	return &channel{d: d}, nil
}

// Close unmaps the memory (and the address space reserved to grow into).
// No channel may be in use.
func (d *Disk) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.mem == nil {
		return nil
	}
	err := unmap(d.mem)
	d.mem, d.mapping = nil, nil
	d.size.Store(0)
	return err
}

// Bytes exposes the backing memory to tests.
func (d *Disk) Bytes() []byte { return d.mem[:d.size.Load()] }

// Resize serves newSize bytes (bdev.Resizer). Growing maps and populates
// memory of the disk's backing kind (hugetlb pages come from the pool, and
// fail if it is short) right after the disk's, inside the address space
// reserved at Create, then publishes the new size: a reactor range-checks
// each IO against the size it loads, so it never touches memory not yet
// populated, and the disk's address never changes under it. Bytes a grow
// exposes read as zeroes. Shrinking is refused while a channel is open
// (bdev.ErrInUse); otherwise the memory past the new size is freed.
func (d *Disk) Resize(newSize uint64) error {
	bs := uint64(d.blockSize)
	if newSize == 0 || newSize%bs != 0 {
		return fmt.Errorf("malloc bdev %q: new size %d is not a positive multiple of the block size %d", d.name, newSize, bs)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.mem == nil {
		return fmt.Errorf("malloc bdev %q: closed", d.name)
	}
	cur := d.size.Load()
	mapped := uint64(len(d.mapping))
	need := roundUp(newSize, d.pageBytes)
	switch {
	case newSize == cur:
		return nil
	case newSize < cur:
		if d.channels > 0 {
			return fmt.Errorf("malloc bdev %q: shrink from %d to %d bytes refused while %d channels are open: %w",
				d.name, cur, newSize, d.channels, bdev.ErrInUse)
		}
		d.setSize(newSize)
		if need < mapped && len(d.mem) > len(d.mapping) {
			// Only inside a reservation: without one, the range freed
			// would be an unreserved hole another mapping could take.
			if err := release(unsafe.Pointer(&d.mem[need]), mapped-need); err == nil {
				d.mapping = d.mem[:need]
				d.hugeBytes = min(d.hugeBytes, need)
			}
		}
		return nil
	case newSize > uint64(len(d.mem)):
		return fmt.Errorf("malloc bdev %q: cannot grow to %d bytes: %d bytes of address space were reserved for it (max size); "+
			"create a new bdev to grow further", d.name, newSize, len(d.mem))
	}
	if need > mapped {
		at := unsafe.Pointer(&d.mem[mapped])
		m, err := d.mapMore(at, need-mapped)
		if err != nil {
			release(at, need-mapped) // a failed MAP_FIXED may have unmapped part of the reservation
			return fmt.Errorf("malloc bdev %q: grow from %d to %d bytes: %w", d.name, cur, newSize, err)
		}
		d.hugeBytes += m.hugeBytes
		d.mapping = d.mem[:need]
	}
	// Bytes past the old size may hold data from before a shrink.
	clear(d.mem[cur:min(newSize, mapped)])
	d.setSize(newSize)
	return nil
}

// mapMore maps and populates n more bytes at at, of the disk's backing kind.
func (d *Disk) mapMore(at unsafe.Pointer, n uint64) (*memory, error) {
	switch d.backing {
	case BackingHugeTLB:
		return mapHugeTLB(at, n)
	case BackingTHP:
		return mapTHP(at, n)
	}
	return map4K(at, n)
}

// setSize publishes a new size and Info; the caller holds d.mu.
func (d *Disk) setSize(size uint64) {
	d.size.Store(size)
	info := *d.info.Load()
	info.NumBlocks = size / uint64(d.blockSize)
	d.info.Store(&info)
}

var _ bdev.Resizer = (*Disk)(nil)

type channel struct {
	d      *Disk
	closed bool
}

func (c *channel) Poll() int          { return 0 }
func (c *channel) InFlight() int      { return 0 }
func (c *channel) Submit(io *bdev.IO) { io.Err = c.d.do(io); io.Done.IODone(io) }

func (c *channel) Close() error {
	if !c.closed {
		c.closed = true
		c.d.mu.Lock()
		c.d.channels--
		c.d.mu.Unlock()
	}
	return nil
}

// inRange reports whether [off, off+n) lies inside a disk of size bytes.
func inRange(size, off, n uint64) bool {
	return off <= size && size-off >= n
}

// do runs io against the size loaded once for it: memory below that size
// stays mapped until every channel is closed (a shrink needs none open).
func (d *Disk) do(io *bdev.IO) error {
	size := d.size.Load()
	data := d.mem[:size:size]
	switch io.Op {
	case bdev.OpRead, bdev.OpWrite:
		if !inRange(size, io.Offset, io.Len) {
			return bdev.ErrRange
		}
		off := io.Offset
		var done uint64
		for _, b := range io.Iov {
			if done+uint64(len(b)) > io.Len {
				b = b[:io.Len-done]
			}
			if io.Op == bdev.OpRead {
				copy(b, data[off:])
			} else {
				copy(data[off:], b)
			}
			off += uint64(len(b))
			done += uint64(len(b))
			if done == io.Len {
				break
			}
		}
		if done != io.Len {
			return bdev.ErrRange // the buffers hold fewer bytes than Len: a caller bug
		}
		return nil
	case bdev.OpFlush:
		return nil
	case bdev.OpUnmap:
		// Unmapped blocks are zeroed, not handed back to the kernel
		// (MADV_DONTNEED): the next read would map the zero page and the
		// next write fault again, the lazy disk this package avoids.
		for _, r := range io.Ranges[:io.NRanges] {
			if !inRange(size, r.Offset, r.Len) {
				return bdev.ErrRange
			}
		}
		for _, r := range io.Ranges[:io.NRanges] {
			clear(data[r.Offset : r.Offset+r.Len])
		}
		return nil
	case bdev.OpWriteZeroes:
		if !inRange(size, io.Offset, io.Len) {
			return bdev.ErrRange
		}
		clear(data[io.Offset : io.Offset+io.Len])
		return nil
	case bdev.OpWriteSame:
		bs := uint64(d.blockSize)
		if !inRange(size, io.Offset, io.Len) || io.Len%bs != 0 || len(io.Iov) != 1 || uint64(len(io.Iov[0])) < bs {
			return bdev.ErrRange
		}
		for off := io.Offset; off < io.Offset+io.Len; off += bs {
			copy(data[off:off+bs], io.Iov[0][:bs])
		}
		return nil
	}
	return bdev.ErrNotSup
}

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
	"time"

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

// Config describes a malloc bdev.
type Config struct {
	Name      string
	Size      uint64 // bytes, a positive multiple of BlockSize; any size, the mapping is rounded up
	BlockSize uint32 // 512 or 4096
	UUID      [16]byte
	Hugepages string       // a Hugepages mode; "" is HugepagesAuto
	Logger    *slog.Logger // for the line saying what backs the disk; nil = slog.Default()
}

// Disk is a malloc bdev.
type Disk struct {
	info      bdev.Info
	data      []byte // the disk: the first Size bytes of mapping
	mapping   []byte // what was mapped: Size rounded up to the page size
	backing   string
	hugeBytes uint64
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
	mode := c.Hugepages
	if mode == "" {
		mode = HugepagesAuto
	}
	log := c.Logger
	if log == nil {
		log = slog.Default()
	}
	start := time.Now()
	m, err := allocate(c.Name, c.Size, mode)
	if err != nil {
		return nil, err
	}
	took := time.Since(start)
	d := &Disk{
		info: bdev.Info{
			Name: c.Name, Type: "malloc", BlockSize: c.BlockSize, NumBlocks: c.Size / uint64(c.BlockSize), UUID: c.UUID,
			Unmap: true, UnmapZeroes: true, WriteZeroes: true,
		},
		data:      m.mapping[:c.Size:c.Size],
		mapping:   m.mapping,
		backing:   m.backing,
		hugeBytes: m.hugeBytes,
	}
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
func (d *Disk) HugeBytes() uint64 { return d.hugeBytes }

// Info describes the disk.
func (d *Disk) Info() *bdev.Info { return &d.info }

// Open returns a channel; all channels share the memory.
func (d *Disk) Open() (bdev.Channel, error) { return &channel{d: d}, nil }

// Close unmaps the memory. No channel may be in use.
func (d *Disk) Close() error {
	if d.mapping == nil {
		return nil
	}
	err := unmap(d.mapping)
	d.data, d.mapping = nil, nil
	return err
}

// Bytes exposes the backing memory to tests.
func (d *Disk) Bytes() []byte { return d.data }

type channel struct{ d *Disk }

func (c *channel) Poll() int          { return 0 }
func (c *channel) InFlight() int      { return 0 }
func (c *channel) Close() error       { return nil }
func (c *channel) Submit(io *bdev.IO) { io.Err = c.d.do(io); io.Done.IODone(io) }

func (d *Disk) inRange(off, n uint64) bool {
	size := uint64(len(d.data))
	return off <= size && size-off >= n
}

func (d *Disk) do(io *bdev.IO) error {
	switch io.Op {
	case bdev.OpRead, bdev.OpWrite:
		if !d.inRange(io.Offset, io.Len) {
			return bdev.ErrRange
		}
		off := io.Offset
		var done uint64
		for _, b := range io.Iov {
			if done+uint64(len(b)) > io.Len {
				b = b[:io.Len-done]
			}
			if io.Op == bdev.OpRead {
				copy(b, d.data[off:])
			} else {
				copy(d.data[off:], b)
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
			if !d.inRange(r.Offset, r.Len) {
				return bdev.ErrRange
			}
		}
		for _, r := range io.Ranges[:io.NRanges] {
			clear(d.data[r.Offset : r.Offset+r.Len])
		}
		return nil
	case bdev.OpWriteZeroes:
		if !d.inRange(io.Offset, io.Len) {
			return bdev.ErrRange
		}
		clear(d.data[io.Offset : io.Offset+io.Len])
		return nil
	case bdev.OpWriteSame:
		bs := uint64(d.info.BlockSize)
		if !d.inRange(io.Offset, io.Len) || io.Len%bs != 0 || len(io.Iov) != 1 || uint64(len(io.Iov[0])) < bs {
			return bdev.ErrRange
		}
		for off := io.Offset; off < io.Offset+io.Len; off += bs {
			copy(d.data[off:off+bs], io.Iov[0][:bs])
		}
		return nil
	}
	return bdev.ErrNotSup
}

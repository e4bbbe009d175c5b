// Package kio holds what the kernel-backed bdevs (file and aio) share: opening
// and checking the backing file or block device with O_DIRECT, the
// direct-I/O alignment it needs, the per-IO state machine that turns a
// bdev.IO into kernel operations (direct into guest memory or through a bounce
// buffer), the per-channel bookkeeping (slots, wait FIFO, bounce pool) and a
// pool of worker goroutines for the operations that can only block.
//
// Nothing here allocates after Open: slots, iovec arrays, bounce buffers and
// rings are sized when a channel is opened.
package kio

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/ncw/directio"
	"golang.org/x/sys/unix"

	"vhost-target/bdev"
)

// Options describe the backing store of a file or aio bdev, as configured.
type Options struct {
	Name      string // bdev name, for error messages
	Path      string // regular file or block device
	Size      uint64 // bytes served; 0 = the file's size rounded down to BlockSize
	BlockSize uint32 // the LUN's logical block size: 512 or 4096
	Create    bool   // create a sparse file of Size bytes if Path does not exist
	ReadOnly  bool   // open O_RDONLY; writes fail with bdev.ErrReadOnly
}

// Backing is an open backing file or block device.
type Backing struct {
	Name      string
	Path      string
	File      *os.File
	FD        int
	BlockSize uint32 // the LUN's block size
	ReadOnly  bool
	BlockDev  bool // a block device (BLKDISCARD/BLKZEROOUT) rather than a regular file

	// MemAlign and OffsetAlign are the direct-I/O alignment: every buffer
	// address must be a multiple of MemAlign, every file offset and segment
	// length a multiple of OffsetAlign (statx(2) STATX_DIOALIGN).
	MemAlign    uint32
	OffsetAlign uint32

	// noZeroRange is set once the filesystem refuses FALLOC_FL_ZERO_RANGE;
	// write-zeroes then writes zero buffers. Shared by all channels.
	noZeroRange atomic.Bool
	// zeroes is a read-only source of zero bytes for that fallback.
	zeroes []byte

	// size is the bytes served (at most the file's size when it was last
	// looked at). Reactors load it for every IO's range check; Resize and
	// Rescan store it, then publish a new info.
	size atomic.Uint64
	info atomic.Pointer[bdev.Info]
	// mu serialises capacity changes with channels opening and closing, so
	// that a shrink sees a true count of open channels (channels).
	mu       sync.Mutex
	channels int
}

// ZeroBufferBytes is the size of the shared zero buffer used when the
// filesystem cannot zero a range itself.
const ZeroBufferBytes = 1 << 20

// Open opens and checks the backing store. Every error names the bdev and the
// path and says what is wrong, so that the daemon can refuse to start with a
// message the operator can act on.
func Open(o Options) (*Backing, error) {
	if o.BlockSize != 512 && o.BlockSize != 4096 {
		return nil, fmt.Errorf("bdev %q: block size %d is not 512 or 4096", o.Name, o.BlockSize)
	}
	if o.Size%uint64(o.BlockSize) != 0 {
		return nil, fmt.Errorf("bdev %q: size %d is not a multiple of the block size %d", o.Name, o.Size, o.BlockSize)
	}
	if o.Create && o.ReadOnly {
		return nil, fmt.Errorf("bdev %q: create with read_only would serve an empty disk", o.Name)
	}
	st, err := os.Stat(o.Path)
	switch {
	case errors.Is(err, fs.ErrNotExist) && o.Create:
		if o.Size == 0 {
			return nil, fmt.Errorf("bdev %q: create %s: a size is required", o.Name, o.Path)
		}
		if err := createSparse(o.Path, o.Size); err != nil {
			return nil, fmt.Errorf("bdev %q: %w", o.Name, err)
		}
	case err != nil:
		return nil, fmt.Errorf("bdev %q: %w", o.Name, err)
	case st.IsDir():
		return nil, fmt.Errorf("bdev %q: %s is a directory, not a file or block device", o.Name, o.Path)
	case !st.Mode().IsRegular() && st.Mode()&fs.ModeDevice == 0:
		return nil, fmt.Errorf("bdev %q: %s is not a regular file or block device (mode %v)", o.Name, o.Path, st.Mode())
	case st.Mode()&fs.ModeCharDevice != 0:
		return nil, fmt.Errorf("bdev %q: %s is a character device, not a block device", o.Name, o.Path)
	}
	flag := os.O_RDWR
	if o.ReadOnly {
		flag = os.O_RDONLY
	}
	f, err := directio.OpenFile(o.Path, flag, 0)
	if errors.Is(err, unix.EINVAL) {
		return nil, fmt.Errorf("bdev %q: open %s with O_DIRECT: the filesystem does not support direct I/O: %w", o.Name, o.Path, err)
	}
	if err != nil {
		return nil, fmt.Errorf("bdev %q: %w", o.Name, err)
	}
	b := &Backing{Name: o.Name, Path: o.Path, File: f, FD: int(f.Fd()), BlockSize: o.BlockSize, ReadOnly: o.ReadOnly}
	if err := b.probe(o.Size); err != nil {
		f.Close()
		return nil, fmt.Errorf("bdev %q: %s: %w", o.Name, o.Path, err)
	}
	return b, nil
}

// createSparse creates path with size bytes and no blocks allocated. O_EXCL:
// a file that appeared since the Stat is not truncated.
func createSparse(path string, size uint64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("create: %w", err)
	}
	if err := f.Truncate(int64(size)); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("create %s: set size %d: %w", path, size, err)
	}
	return f.Close()
}

// probe finds the file's size and direct-I/O alignment and checks them
// against the configuration.
func (b *Backing) probe(want uint64) error {
	var st unix.Stat_t
	if err := unix.Fstat(b.FD, &st); err != nil {
		return fmt.Errorf("fstat: %w", err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		b.BlockDev = true
	case unix.S_IFREG:
	default:
		return fmt.Errorf("not a regular file or block device")
	}
	have, err := b.storeSize()
	if err != nil {
		return err
	}
	b.MemAlign, b.OffsetAlign = b.dioAlign()
	if b.OffsetAlign > b.BlockSize {
		return fmt.Errorf("block size %d is smaller than the direct-I/O alignment %d of the backing store; use block_size = %d",
			b.BlockSize, b.OffsetAlign, b.OffsetAlign)
	}
	bs := uint64(b.BlockSize)
	switch {
	case want == 0:
		b.size.Store(have / bs * bs)
		if have < bs {
			return fmt.Errorf("the file holds %d bytes, less than one %d-byte block; set a size with create", have, bs)
		}
	case want > have:
		return fmt.Errorf("the file holds %d bytes, less than the configured size %d", have, want)
	default:
		b.size.Store(want)
	}
	z, err := unix.Mmap(-1, 0, ZeroBufferBytes, unix.PROT_READ, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("map zero buffer: %w", err)
	}
	b.zeroes = z
	return nil
}

// dioAlign returns the direct-I/O memory and offset alignment: statx
// STATX_DIOALIGN (Linux 6.1+) where the filesystem reports it, else the block
// device's logical block size, else 512 (and 4096-aligned memory always works).
func (b *Backing) dioAlign() (memAlign, offsetAlign uint32) {
	var sx unix.Statx_t
	err := unix.Statx(b.FD, "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &sx)
	if err == nil && sx.Mask&unix.STATX_DIOALIGN != 0 && sx.Dio_offset_align != 0 && sx.Dio_mem_align != 0 {
		return sx.Dio_mem_align, sx.Dio_offset_align
	}
	if b.BlockDev {
		var ss int32
		if ioctlPtr(b.FD, unix.BLKSSZGET, unsafe.Pointer(&ss)) == nil && ss > 0 {
			return uint32(ss), uint32(ss)
		}
	}
	return 512, 512
}

// Close closes the file.
func (b *Backing) Close() error {
	if b.zeroes != nil {
		unix.Munmap(b.zeroes)
		b.zeroes = nil
	}
	if b.File == nil {
		return nil
	}
	err := b.File.Close()
	b.File = nil
	return err
}

// Describe publishes the bdev.Info of the bdev over b (Info returns it); the
// file and aio bdevs call it once, at open.
//
// Unmap: regular files punch holes, which read back as zeroes (LBPRZ); block
// devices discard, which guarantees nothing about the data read afterwards,
// so UnmapZeroes is false for them (and SCSI then never turns a zeroing WRITE
// SAME into an unmap).
func (b *Backing) Describe(typ string, uuid [16]byte) {
	b.info.Store(&bdev.Info{
		Name: b.Name, Type: typ, BlockSize: b.BlockSize, NumBlocks: b.size.Load() / uint64(b.BlockSize), UUID: uuid,
		ReadOnly:    b.ReadOnly,
		Unmap:       !b.ReadOnly,
		UnmapZeroes: !b.ReadOnly && !b.BlockDev,
		WriteZeroes: !b.ReadOnly,
		WriteCache:  true,
	})
}

// Info returns the current description (see bdev.Info: never modified once
// returned; a capacity change publishes a new one).
func (b *Backing) Info() *bdev.Info { return b.info.Load() }

// Size returns the bytes served now.
func (b *Backing) Size() uint64 { return b.size.Load() }

// storeSize returns the backing store's size in bytes: the file's, or the
// block device's (BLKGETSIZE64).
func (b *Backing) storeSize() (uint64, error) {
	if b.BlockDev {
		var have uint64
		if err := ioctlPtr(b.FD, unix.BLKGETSIZE64, unsafe.Pointer(&have)); err != nil {
			return 0, fmt.Errorf("BLKGETSIZE64: %w", err)
		}
		return have, nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(b.FD, &st); err != nil {
		return 0, fmt.Errorf("fstat: %w", err)
	}
	return uint64(st.Size), nil
}

// setSize serves size bytes from now on and publishes a new Info. The
// caller holds b.mu. Stored before the Info: an IO checked against the new
// size may run before a reader sees the new Info, never the other way round
// for a grow (a LUN built over the new Info never sends an IO the channel
// refuses); a shrink is only made with no channel open.
func (b *Backing) setSize(size uint64) {
	b.size.Store(size)
	info := *b.info.Load()
	info.NumBlocks = size / uint64(b.BlockSize)
	b.info.Store(&info)
}

// Resize serves newSize bytes (bdev.Resizer). A regular file shorter than
// newSize is extended with ftruncate (sparse: no blocks are allocated); a
// shrink leaves the file as it is and only serves less, so no data is
// destroyed by it. A shrink is refused while a channel is open (see
// bdev.Resizer). Block devices and read-only bdevs cannot be resized by the
// target: a block device is resized by whoever owns it, then Rescan picks
// the new size up.
func (b *Backing) Resize(newSize uint64) error {
	bs := uint64(b.BlockSize)
	switch {
	case newSize == 0 || newSize%bs != 0:
		return fmt.Errorf("bdev %q: new size %d is not a positive multiple of the block size %d", b.Name, newSize, bs)
	case b.ReadOnly:
		return fmt.Errorf("bdev %q: %s is open read-only: it cannot be resized", b.Name, b.Path)
	case b.BlockDev:
		return fmt.Errorf("bdev %q: %s is a block device: resize the device itself, then rescan the bdev", b.Name, b.Path)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	cur := b.size.Load()
	if newSize < cur && b.channels > 0 {
		return fmt.Errorf("bdev %q: shrink from %d to %d bytes refused while %d channels are open: %w",
			b.Name, cur, newSize, b.channels, bdev.ErrInUse)
	}
	if newSize > cur {
		have, err := b.storeSize()
		if err != nil {
			return fmt.Errorf("bdev %q: %s: %w", b.Name, b.Path, err)
		}
		if have < newSize {
			if err := unix.Ftruncate(b.FD, int64(newSize)); err != nil {
				return fmt.Errorf("bdev %q: extend %s to %d bytes: %w", b.Name, b.Path, newSize, err)
			}
		}
	}
	b.setSize(newSize)
	return nil
}

// Rescan serves the whole backing store again, as its size is now
// (bdev.Rescanner, SPDK's bdev_aio_rescan), rounded down to the block size.
func (b *Backing) Rescan() (bool, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	have, err := b.storeSize()
	if err != nil {
		return false, fmt.Errorf("bdev %q: rescan %s: %w", b.Name, b.Path, err)
	}
	bs := uint64(b.BlockSize)
	size := have / bs * bs
	cur := b.size.Load()
	switch {
	case size == cur:
		return false, nil
	case size == 0:
		return false, fmt.Errorf("bdev %q: rescan %s: it holds %d bytes, less than one %d-byte block", b.Name, b.Path, have, bs)
	case size < cur && b.channels > 0:
		return false, fmt.Errorf("bdev %q: rescan %s: it shrank from %d to %d bytes, refused while %d channels are open: %w",
			b.Name, b.Path, cur, size, b.channels, bdev.ErrInUse)
	}
	b.setSize(size)
	return true, nil
}

// opened and closed count the channels open on b (for the shrink rule).
func (b *Backing) opened() {
	b.mu.Lock()
	b.channels++
	b.mu.Unlock()
}

func (b *Backing) closed() {
	b.mu.Lock()
	b.channels--
	b.mu.Unlock()
}

// Channels returns how many channels are open.
func (b *Backing) Channels() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.channels
}

func ioctlPtr(fd int, req uint, p unsafe.Pointer) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(p))
	if e != 0 {
		return e
	}
	return nil
}

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
	Size      uint64 // bytes served (≤ the file's size at open)
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
	var have uint64
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		b.BlockDev = true
		if err := ioctlPtr(b.FD, unix.BLKGETSIZE64, unsafe.Pointer(&have)); err != nil {
			return fmt.Errorf("BLKGETSIZE64: %w", err)
		}
	case unix.S_IFREG:
		have = uint64(st.Size)
	default:
		return fmt.Errorf("not a regular file or block device")
	}
	b.MemAlign, b.OffsetAlign = b.dioAlign()
	if b.OffsetAlign > b.BlockSize {
		return fmt.Errorf("block size %d is smaller than the direct-I/O alignment %d of the backing store; use block_size = %d",
			b.BlockSize, b.OffsetAlign, b.OffsetAlign)
	}
	bs := uint64(b.BlockSize)
	switch {
	case want == 0:
		b.Size = have / bs * bs
		if b.Size == 0 {
			return fmt.Errorf("the file holds %d bytes, less than one %d-byte block; set a size with create", have, bs)
		}
	case want > have:
		return fmt.Errorf("the file holds %d bytes, less than the configured size %d", have, want)
	default:
		b.Size = want
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

// Info fills the parts of bdev.Info that the backing store decides.
//
// Unmap: regular files punch holes, which read back as zeroes (LBPRZ); block
// devices discard, which guarantees nothing about the data read afterwards,
// so UnmapZeroes is false for them (and SCSI then never turns a zeroing WRITE
// SAME into an unmap).
func (b *Backing) Info(typ string, uuid [16]byte) bdev.Info {
	return bdev.Info{
		Name: b.Name, Type: typ, BlockSize: b.BlockSize, NumBlocks: b.Size / uint64(b.BlockSize), UUID: uuid,
		ReadOnly:    b.ReadOnly,
		Unmap:       !b.ReadOnly,
		UnmapZeroes: !b.ReadOnly && !b.BlockDev,
		WriteZeroes: !b.ReadOnly,
		WriteCache:  true,
	}
}

func ioctlPtr(fd int, req uint, p unsafe.Pointer) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(p))
	if e != 0 {
		return e
	}
	return nil
}

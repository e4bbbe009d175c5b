// Package malloc is a memory-backed bdev. Its data lives in an anonymous
// mapping outside the Go heap (so the GC never scans or moves it) and its
// IOs complete inline, inside Submit, on the submitting reactor.
package malloc

import (
	"fmt"

	"golang.org/x/sys/unix"

	"vhost-target/bdev"
)

// Disk is a malloc bdev.
type Disk struct {
	info bdev.Info
	data []byte
}

// New maps size bytes of zeroed memory with the given logical block size.
func New(name string, size uint64, blockSize uint32, uuid [16]byte) (*Disk, error) {
	if blockSize != 512 && blockSize != 4096 {
		return nil, fmt.Errorf("malloc bdev %q: block size %d is not 512 or 4096", name, blockSize)
	}
	if size == 0 || size%uint64(blockSize) != 0 {
		return nil, fmt.Errorf("malloc bdev %q: size %d is not a positive multiple of %d", name, size, blockSize)
	}
	data, err := unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("malloc bdev %q: mmap %d bytes: %w", name, size, err)
	}
	return &Disk{
		info: bdev.Info{
			Name: name, Type: "malloc", BlockSize: blockSize, NumBlocks: size / uint64(blockSize), UUID: uuid,
			Unmap: true, UnmapZeroes: true, WriteZeroes: true,
		},
		data: data,
	}, nil
}

// Info describes the disk.
func (d *Disk) Info() *bdev.Info { return &d.info }

// Open returns a channel; all channels share the memory.
func (d *Disk) Open() (bdev.Channel, error) { return &channel{d: d}, nil }

// Close unmaps the memory. No channel may be in use.
func (d *Disk) Close() error {
	if d.data == nil {
		return nil
	}
	err := unix.Munmap(d.data)
	d.data = nil
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

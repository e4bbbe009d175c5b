// Package file is a bdev on a regular file or block device opened with
// O_DIRECT, whose blocking preadv/pwritev/fdatasync/fallocate calls run on a
// pool of worker goroutines. Reactors never block: Submit pushes the IO onto
// a worker's lock-free ring, and Poll pops finished IOs from the channel's
// completion ring. It is the portable kernel-backed bdev: it needs nothing
// beyond ordinary file syscalls, where the aio bdev needs io_uring or Linux
// AIO (which container seccomp profiles may refuse).
package file

import (
	"fmt"

	"golang.org/x/sys/unix"

	"vhost-target/bdev"
	"vhost-target/bdev/kio"
)

// Defaults for zero Config fields.
const (
	WorkersDefault    = 2
	QueueDepthDefault = 128
)

// Config describes a file bdev.
type Config struct {
	Name      string
	Path      string
	Size      uint64 // bytes; 0 = the file's size rounded down to BlockSize
	BlockSize uint32 // 512 or 4096
	Create    bool   // create a sparse file of Size bytes if Path is absent
	ReadOnly  bool
	// Workers is the number of I/O goroutines shared by all channels
	// (0 = WorkersDefault). Each can have one syscall in flight, so it is
	// also the device-wide I/O depth.
	Workers int
	// QueueDepth bounds the IOs of one channel handed to the workers
	// (0 = QueueDepthDefault); more wait in the channel's FIFO.
	QueueDepth int
	UUID       [16]byte
}

// Disk is a file bdev.
type Disk struct {
	b          *kio.Backing
	pool       *kio.Pool
	queueDepth int
}

// New opens the backing file and starts the workers.
func New(c Config) (*Disk, error) {
	if c.Workers == 0 {
		c.Workers = WorkersDefault
	}
	if c.QueueDepth == 0 {
		c.QueueDepth = QueueDepthDefault
	}
	if c.Workers < 0 || c.QueueDepth < 0 {
		return nil, fmt.Errorf("bdev %q: workers %d and queue depth %d must be positive", c.Name, c.Workers, c.QueueDepth)
	}
	b, err := kio.Open(kio.Options{Name: c.Name, Path: c.Path, Size: c.Size, BlockSize: c.BlockSize,
		Create: c.Create, ReadOnly: c.ReadOnly})
	if err != nil {
		return nil, err
	}
	b.Describe("file", c.UUID)
	return &Disk{b: b, pool: kio.NewPool(c.Workers), queueDepth: c.QueueDepth}, nil
}

// Info describes the disk: the newest description (bdev.Info).
func (d *Disk) Info() *bdev.Info { return d.b.Info() }

// Resize serves newSize bytes, extending a regular backing file when it is
// shorter (see kio.Backing.Resize and bdev.Resizer).
func (d *Disk) Resize(newSize uint64) error { return d.b.Resize(newSize) }

// Rescan serves the backing store's current size (see bdev.Rescanner).
func (d *Disk) Rescan() (bool, error) { return d.b.Rescan() }

var (
	_ bdev.Resizer   = (*Disk)(nil)
	_ bdev.Rescanner = (*Disk)(nil)
)

// Open returns a channel for one reactor.
func (d *Disk) Open() (bdev.Channel, error) {
	ch := &channel{d: d, eventFD: -1}
	core, err := kio.NewCore(d.b, d.queueDepth, ch)
	if err != nil {
		return nil, err
	}
	ch.core = core
	return ch, nil
}

// Close stops the workers and closes the file. Every channel must be closed.
func (d *Disk) Close() error {
	if d.pool != nil {
		d.pool.Close()
		d.pool = nil
	}
	return d.b.Close()
}

type channel struct {
	d       *Disk
	core    *kio.Core
	eventFD int
}

var _ bdev.Waker = (*channel)(nil)

// Submit hands io to the workers, or queues it; it never blocks.
func (c *channel) Submit(io *bdev.IO) { c.core.Submit(io) }

// Dispatch is called by the core with a prepared slot.
func (c *channel) Dispatch(s *kio.Slot) { c.core.ToPool(c.d.pool, s) }

// Poll completes the IOs the workers have finished.
func (c *channel) Poll() int { return c.core.PollPool(c.d.pool) }

func (c *channel) InFlight() int { return c.core.InFlight() }

// EventFD returns an eventfd the workers write after each completion, made on
// first use (so channels nobody sleeps on pay nothing per IO); -1 if none
// could be made.
func (c *channel) EventFD() int {
	if c.eventFD < 0 {
		fd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
		if err != nil {
			return -1
		}
		c.eventFD = fd
		c.core.NotifyFD(fd)
	}
	return c.eventFD
}

func (c *channel) Close() error {
	err := c.core.Close()
	if err != nil {
		return err
	}
	if c.eventFD >= 0 {
		c.core.NotifyFD(-1)
		unix.Close(c.eventFD)
		c.eventFD = -1
	}
	return nil
}

// Package aio is a bdev on a regular file or block device opened with
// O_DIRECT whose reads, writes and flushes go to the kernel's asynchronous
// interfaces straight from the reactor: no worker threads on the data path.
// Each channel (one per reactor queue) has its own io_uring instance or Linux
// AIO context. Submit queues the operation; Poll submits what is queued with
// one syscall and reaps completions from the shared completion ring without
// one.
//
// Engines: io_uring (io_uring_setup/io_uring_enter over the mmapped rings) and
// Linux native AIO (io_setup/io_submit, completions read from the context's
// user-space ring). "auto" picks io_uring and falls back to Linux AIO, with a
// log line, where io_uring is refused (container seccomp profiles commonly
// block it). Operations an engine cannot do asynchronously (BLKDISCARD and
// BLKZEROOUT on block devices, fallocate under Linux AIO or before Linux 5.6,
// fdatasync if the kernel refuses it) run on one worker goroutine per bdev.
package aio

import (
	"errors"
	"fmt"
	"log/slog"

	"golang.org/x/sys/unix"

	"vhost-target/bdev"
	"vhost-target/bdev/kio"
)

// Engine names (config key engine).
const (
	EngineAuto   = "auto"
	EngineURing  = "uring"
	EngineLibaio = "libaio"
)

// QueueDepthDefault is used when Config.QueueDepth is 0.
const QueueDepthDefault = 128

// Config describes an aio bdev.
type Config struct {
	Name       string
	Path       string
	Size       uint64 // bytes; 0 = the file's size rounded down to BlockSize
	BlockSize  uint32 // 512 or 4096
	Create     bool   // create a sparse file of Size bytes if Path is absent
	ReadOnly   bool
	Engine     string // EngineAuto (""), EngineURing or EngineLibaio
	QueueDepth int    // IOs in flight per channel (0 = QueueDepthDefault); more wait in a FIFO
	UUID       [16]byte
	Logger     *slog.Logger // for the engine choice; nil = slog.Default()
}

// Disk is an aio bdev.
type Disk struct {
	b          *kio.Backing
	engine     string // EngineURing or EngineLibaio, after "auto" is resolved
	queueDepth int
	pool       *kio.Pool // blocking operations the engine cannot do
}

// New opens the backing file and decides the engine.
func New(c Config) (*Disk, error) {
	if c.QueueDepth == 0 {
		c.QueueDepth = QueueDepthDefault
	}
	if c.QueueDepth < 0 || c.QueueDepth > 32768 {
		return nil, fmt.Errorf("bdev %q: queue depth %d is out of range 1..32768", c.Name, c.QueueDepth)
	}
	log := c.Logger
	if log == nil {
		log = slog.Default()
	}
	engine, err := chooseEngine(c.Engine, log, c.Name)
	if err != nil {
		return nil, err
	}
	b, err := kio.Open(kio.Options{Name: c.Name, Path: c.Path, Size: c.Size, BlockSize: c.BlockSize,
		Create: c.Create, ReadOnly: c.ReadOnly})
	if err != nil {
		return nil, err
	}
	b.Describe("aio", c.UUID)
	return &Disk{b: b, engine: engine, queueDepth: c.QueueDepth, pool: kio.NewPool(1)}, nil
}

// chooseEngine resolves "auto" by creating (and closing) a small io_uring.
func chooseEngine(want string, log *slog.Logger, name string) (string, error) {
	switch want {
	case EngineLibaio:
		return EngineLibaio, nil
	case EngineURing, EngineAuto, "":
	default:
		return "", fmt.Errorf("bdev %q: engine %q is not %q, %q or %q", name, want, EngineAuto, EngineURing, EngineLibaio)
	}
	u, err := newURing(4)
	if err == nil {
		u.close()
		return EngineURing, nil
	}
	if want == EngineURing {
		return "", fmt.Errorf("bdev %q: engine uring: %w", name, err)
	}
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EACCES) {
		log.Warn("io_uring refused by the kernel or a seccomp profile; using Linux AIO", "bdev", name, "err", err)
	} else {
		log.Warn("io_uring failed; using Linux AIO", "bdev", name, "err", err)
	}
	return EngineLibaio, nil
}

// Engine returns the engine in use: EngineURing or EngineLibaio.
func (d *Disk) Engine() string { return d.engine }

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

// Close stops the helper worker and closes the file. Every channel must be closed.
func (d *Disk) Close() error {
	if d.pool != nil {
		d.pool.Close()
		d.pool = nil
	}
	return d.b.Close()
}

// completion is one reaped kernel completion: the slot index and the result
// (bytes, or -errno).
type completion struct {
	index uint64
	res   int64
}

// engine is io_uring or Linux AIO as one channel uses it.
type engine interface {
	supports(k kio.Kind) bool
	queue(fd int, s *kio.Slot)
	reap(out []completion) int
	close()
}

// Open creates a channel with its own ring or AIO context.
func (d *Disk) Open() (bdev.Channel, error) {
	var err error
	c := &channel{d: d, eventFD: -1, comp: make([]completion, d.queueDepth), failed: make([]completion, d.queueDepth)}
	switch d.engine {
	case EngineURing:
		entries := uint32(1)
		for entries < uint32(d.queueDepth) {
			entries <<= 1
		}
		c.uring, err = newURing(entries)
		if err == nil {
			c.uring.registerFile(d.b.FD)
			c.eng = c.uring
		}
	default:
		c.libaio, err = newLibaio(d.queueDepth)
		if err == nil {
			c.eng = c.libaio
		}
	}
	if err == nil {
		c.core, err = kio.NewCore(d.b, d.queueDepth, c)
	}
	if err != nil {
		if c.eng != nil {
			c.eng.close()
		}
		return nil, fmt.Errorf("bdev %q: open channel: %w", d.b.Name, err)
	}
	return c, nil
}

type channel struct {
	d       *Disk
	core    *kio.Core
	eng     engine
	uring   *uring  // the engine, when io_uring
	libaio  *libaio // the engine, when Linux AIO
	eventFD int
	comp    []completion
	failed  []completion
	noSync  bool // the kernel refused an async fdatasync: flush on the worker
}

var _ bdev.Waker = (*channel)(nil)

// Submit queues io for the kernel (or the FIFO when the channel is full).
// The syscall that starts it is made by the next Poll, once for everything
// queued since the last.
func (c *channel) Submit(io *bdev.IO) { c.core.Submit(io) }

// Dispatch runs the slot's next kernel operation.
func (c *channel) Dispatch(s *kio.Slot) {
	s.Next()
	c.issue(s)
}

func (c *channel) issue(s *kio.Slot) {
	k := s.K.Kind
	if !c.eng.supports(k) || k == kio.KindSync && c.noSync {
		// The worker runs the rest of the IO synchronously.
		c.core.ToPool(c.d.pool, s)
		return
	}
	c.eng.queue(c.d.b.FD, s)
}

// Poll submits what is queued and reaps completions; it never blocks.
func (c *channel) Poll() int {
	if c.flush() != nil {
		// The ring or context itself is broken: what is queued cannot be
		// submitted. Fail it rather than hang the reactor's requests.
		c.failQueued()
	}
	work := 0
	for {
		n := c.eng.reap(c.comp)
		for _, cp := range c.comp[:n] {
			c.done(&c.core.Slots()[cp.index], cp.res)
		}
		work += n
		if n < len(c.comp) {
			break
		}
	}
	work += c.core.PollPool(c.d.pool)
	if work > 0 {
		// Next steps and IOs started from the FIFO go out now, not a pass later.
		if c.flush() != nil {
			c.failQueued()
		}
	}
	return work
}

func (c *channel) flush() error {
	if c.uring != nil {
		return c.uring.flush()
	}
	if !c.libaio.pending() {
		return nil
	}
	nf, err := c.libaio.flush(c.failed)
	for _, f := range c.failed[:nf] {
		c.done(&c.core.Slots()[f.index], f.res)
	}
	return err
}

// done advances a slot with a kernel result.
func (c *channel) done(s *kio.Slot, res int64) {
	var errno unix.Errno
	if res < 0 {
		errno = unix.Errno(-res)
		if s.K.Kind == kio.KindSync && (errno == unix.EINVAL || errno == unix.EOPNOTSUPP) {
			// Async fdatasync refused (old kernels, some filesystems under
			// Linux AIO): flush on the worker from now on.
			c.noSync = true
			c.core.ToPool(c.d.pool, s)
			return
		}
		res = 0
	}
	if s.Advance(res, errno) {
		c.core.Complete(s)
		return
	}
	s.Next()
	c.issue(s)
}

// failQueued completes with ErrIO every IO whose SQE or iocb is queued but
// not submitted: the kernel refused the ring or context itself (EBADF,
// EFAULT), so they could never finish.
func (c *channel) failQueued() {
	n := 0
	if c.libaio != nil {
		for _, cb := range c.libaio.batch {
			c.failed[n] = completion{index: cb.data}
			n++
		}
		clear(c.libaio.batch)
		c.libaio.batch = c.libaio.batch[:0]
	} else {
		u := c.uring
		for i := u.tail - u.pending; i != u.tail; i++ {
			c.failed[n] = completion{index: u.sqes[i&u.sqMask].userData}
			n++
		}
		u.tail -= u.pending
		u.pending = 0
	}
	// Complete after the queue is emptied: Complete may start waiting IOs,
	// which queue again.
	for _, f := range c.failed[:n] {
		s := &c.core.Slots()[f.index]
		s.IO.Err = bdev.ErrIO
		c.core.Complete(s)
	}
}

func (c *channel) InFlight() int { return c.core.InFlight() }

// EventFD returns an eventfd that the kernel (IORING_REGISTER_EVENTFD,
// IOCB_FLAG_RESFD) and the helper worker write on every completion; it is
// made on first use, so channels nobody sleeps on pay nothing per IO. -1 if
// it cannot be made.
func (c *channel) EventFD() int {
	if c.eventFD >= 0 {
		return c.eventFD
	}
	fd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return -1
	}
	if c.uring != nil {
		if c.uring.setEventFD(fd) != nil {
			unix.Close(fd)
			return -1
		}
	} else {
		c.libaio.eventFD = fd
	}
	c.eventFD = fd
	c.core.NotifyFD(fd)
	return fd
}

// Close destroys the ring or AIO context. InFlight must be 0.
func (c *channel) Close() error {
	if err := c.core.Close(); err != nil {
		return err
	}
	c.core.NotifyFD(-1)
	if c.eng != nil {
		c.eng.close()
		c.eng = nil
	}
	if c.eventFD >= 0 {
		unix.Close(c.eventFD)
		c.eventFD = -1
	}
	return nil
}

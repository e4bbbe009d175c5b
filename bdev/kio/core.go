package kio

import (
	"fmt"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"vhost-target/bdev"
	"vhost-target/reactor"
)

// Per-channel limits.
const (
	// WaitMax bounds the IOs that wait for a slot or a bounce buffer in one
	// channel. A vhost request queue keeps at most 1024 requests in flight,
	// so it never sees the BUSY an overflow returns.
	WaitMax = 1024
	// BounceMax bounds the bounce buffers of one channel. They are mapped
	// MAP_NORESERVE: a channel whose guest buffers are aligned never touches
	// them.
	BounceMax = 32
)

// Dispatcher starts the kernel work of a slot that Core has prepared.
type Dispatcher interface {
	Dispatch(s *Slot)
}

// Core is the engine-independent part of a kernel-backed bdev channel: the
// queue-depth bound (a fixed set of slots), the FIFO where IOs beyond it
// wait, the bounce buffer pool, and the ring on which pool workers return
// finished slots. One reactor owns it; only the completion ring is touched
// by other goroutines.
type Core struct {
	B *Backing

	slots []Slot
	free  []*Slot

	wait      [WaitMax]*bdev.IO // FIFO of IOs waiting for a slot or a bounce buffer
	waitHead  int
	waitCount int

	bounceMem []byte
	bounce    [][]byte // free bounce buffers

	backlog  []*Slot // slots the pool refused (all worker rings full), in order
	pooled   int     // slots handed to ToPool and not yet back from the done ring
	done     *reactor.Ring[*Slot]
	eventFD  atomic.Int32 // -1, or an eventfd written after each pool completion
	inflight int
	d        Dispatcher
}

// NewCore sizes a channel for queueDepth IOs in flight.
func NewCore(b *Backing, queueDepth int, d Dispatcher) (*Core, error) {
	if queueDepth < 1 {
		return nil, fmt.Errorf("bdev %q: queue depth %d is below 1", b.Name, queueDepth)
	}
	nb := min(queueDepth, BounceMax)
	mem, err := unix.Mmap(-1, 0, nb*BounceBytes, unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("bdev %q: map %d bounce buffers: %w", b.Name, nb, err)
	}
	ringSize := 1
	for ringSize < queueDepth {
		ringSize <<= 1
	}
	c := &Core{
		B: b, slots: make([]Slot, queueDepth), free: make([]*Slot, 0, queueDepth),
		bounceMem: mem, bounce: make([][]byte, 0, nb), backlog: make([]*Slot, 0, queueDepth),
		done: reactor.NewRing[*Slot](ringSize), d: d,
	}
	c.eventFD.Store(-1)
	b.opened()
	for i := range c.slots {
		s := &c.slots[i]
		s.Index = i
		s.Done = c
		c.free = append(c.free, s)
	}
	// Slot i's buffer is the i-th BounceBytes of the mapping: page aligned,
	// so aligned for any direct-I/O requirement.
	for i := nb - 1; i >= 0; i-- {
		c.bounce = append(c.bounce, mem[i*BounceBytes:(i+1)*BounceBytes:(i+1)*BounceBytes])
	}
	return c, nil
}

// Slots returns the slot array (engines index it by Slot.Index).
func (c *Core) Slots() []Slot { return c.slots }

// InFlight returns the IOs accepted and not completed, waiting ones included.
func (c *Core) InFlight() int { return c.inflight }

// Submit starts io, or queues it when every slot (or every bounce buffer it
// needs) is in use. Errors found before any kernel work complete inline.
func (c *Core) Submit(io *bdev.IO) {
	if Check(c.B, io) {
		io.Done.IODone(io)
		return
	}
	c.inflight++
	if c.waitCount == 0 && c.start(io) {
		return
	}
	if c.waitCount == WaitMax {
		c.inflight--
		io.Err = bdev.ErrBusy
		io.Done.IODone(io)
		return
	}
	c.wait[(c.waitHead+c.waitCount)%WaitMax] = io
	c.waitCount++
}

// start takes a slot (and a bounce buffer if io needs one) and dispatches
// io; it returns false, taking nothing, when either is exhausted.
func (c *Core) start(io *bdev.IO) bool {
	if len(c.free) == 0 {
		return false
	}
	var buf []byte
	if NeedsBounce(c.B, io) {
		if len(c.bounce) == 0 {
			return false
		}
		buf = c.bounce[len(c.bounce)-1]
		c.bounce = c.bounce[:len(c.bounce)-1]
	}
	s := c.free[len(c.free)-1]
	c.free = c.free[:len(c.free)-1]
	s.Begin(c.B, io, buf)
	c.d.Dispatch(s)
	return true
}

// Complete finishes a slot whose IO is done (s.IO.Err is set): it frees the
// slot, calls the IO's Done, then starts waiting IOs that now fit.
func (c *Core) Complete(s *Slot) {
	io := s.IO
	if b := s.TakeBounce(); b != nil {
		c.bounce = append(c.bounce, b)
	}
	s.IO = nil
	c.free = append(c.free, s)
	c.inflight--
	io.Done.IODone(io)
	for c.waitCount > 0 && c.start(c.wait[c.waitHead]) {
		c.wait[c.waitHead] = nil
		c.waitHead = (c.waitHead + 1) % WaitMax
		c.waitCount--
	}
}

// ToPool hands s to a pool worker; if every worker ring is full it keeps s
// and PollPool tries again.
func (c *Core) ToPool(p *Pool, s *Slot) {
	c.pooled++
	if len(c.backlog) > 0 || !p.Push(s) {
		c.backlog = append(c.backlog, s) // capacity is the queue depth: never grows
	}
}

// PollPool retries the backlog and completes the slots pool workers have
// finished. It returns how many it completed. With nothing at the pool (an
// aio channel's usual state) it returns without touching the shared ring:
// it runs on every reactor pass.
func (c *Core) PollPool(p *Pool) int {
	if c.pooled == 0 {
		return 0
	}
	if len(c.backlog) > 0 {
		n := 0
		for n < len(c.backlog) && p.Push(c.backlog[n]) {
			n++
		}
		k := copy(c.backlog, c.backlog[n:])
		clear(c.backlog[k:])
		c.backlog = c.backlog[:k]
	}
	work := 0
	for {
		s, ok := c.done.Pop()
		if !ok {
			return work
		}
		c.pooled--
		c.Complete(s)
		work++
	}
}

// eventOne is the eventfd increment Push writes; a package variable, not a
// local, because a local handed to write(2) escapes in -race builds.
var eventOne = [8]byte{1}

// Push is called by pool workers with a finished slot.
func (c *Core) Push(s *Slot) bool {
	ok := c.done.Push(s)
	if fd := c.eventFD.Load(); fd >= 0 {
		unix.Write(int(fd), eventOne[:])
	}
	return ok
}

// NotifyFD makes pool workers write to fd (an eventfd) after each completion,
// so a reactor sleeping on it wakes; -1 stops that.
func (c *Core) NotifyFD(fd int) { c.eventFD.Store(int32(fd)) }

// Close unmaps the bounce buffers. The channel must be idle (InFlight 0).
func (c *Core) Close() error {
	if c.inflight != 0 {
		return fmt.Errorf("bdev %q: close with %d IOs in flight", c.B.Name, c.inflight)
	}
	if c.bounceMem == nil {
		return nil // closed already
	}
	err := unix.Munmap(c.bounceMem)
	c.bounceMem, c.bounce = nil, nil
	c.B.closed()
	return err
}

// Package errbdev is a bdev for tests that wraps another bdev and injects
// faults: chosen operations on chosen LBA ranges fail with an I/O error
// and/or complete late (SPDK's error bdev has the same idea). Delayed IOs
// wait in a fixed-size table per channel and are released by Poll once
// their time has come: no goroutine or timer per IO, nothing allocated.
package errbdev

import (
	"fmt"
	"math"
	"sync/atomic"
	"time"

	"vhost-target/bdev"
)

// DelayedMax bounds the IOs one channel holds back at a time; more get
// bdev.ErrBusy (the initiator retries).
const DelayedMax = 1024

// Rule is one fault. An IO matches when its operation is Op (0 = any) and
// its byte range overlaps blocks [LBAStart, LBAStart+LBACount) (LBACount 0 =
// to the end of the device); a flush has no range and matches on Op alone.
// A matching IO waits Delay, then fails with Err or, when Err is nil, goes
// to the base bdev. The first matching rule applies. A rule with Count > 0
// applies to that many IOs (over all channels), then matches no more, as
// SPDK's bdev_error_inject_error num does: one slow or failed command, the
// retry served.
type Rule struct {
	Op       bdev.Op
	LBAStart uint64
	LBACount uint64
	Err      error
	Delay    time.Duration
	Count    uint64
}

// Config describes an error bdev.
type Config struct {
	Name  string
	Base  bdev.Bdev
	Rules []Rule
	UUID  [16]byte
}

// Disk is an error bdev.
type Disk struct {
	name  string
	uuid  [16]byte
	base  bdev.Bdev
	rules []Rule
	left  []atomic.Int64 // by rule: IOs a rule with a Count may still take
	bs    uint64         // block size: the base's, which a resize does not change
	// info is the base's Info under this bdev's name, rebuilt when the base
	// publishes a new one (a resize), so the geometry follows the base's.
	info atomic.Pointer[infoCache]
}

// infoCache is an Info derived from one Info of the base.
type infoCache struct {
	base *bdev.Info
	info bdev.Info
}

// ParseOp turns a config op name ("read", "write", "flush", "unmap",
// "write_zeroes", "write_same", or "all" for 0) into an Op.
func ParseOp(s string) (bdev.Op, bool) {
	if s == "all" {
		return 0, true
	}
	for op := bdev.OpRead; op <= bdev.OpWriteSame; op++ {
		if op.String() == s {
			return op, true
		}
	}
	return 0, false
}

// New wraps c.Base. The geometry and features are the base's.
func New(c Config) (*Disk, error) {
	if c.Base == nil {
		return nil, fmt.Errorf("error bdev %q: no base bdev", c.Name)
	}
	for i, r := range c.Rules {
		if r.Op > bdev.OpWriteSame || r.Delay < 0 || r.Err == nil && r.Delay == 0 {
			return nil, fmt.Errorf("error bdev %q: rule %d (%+v) injects nothing or has a bad op", c.Name, i, r)
		}
		if r.LBAStart+r.LBACount < r.LBAStart {
			return nil, fmt.Errorf("error bdev %q: rule %d: LBA range overflows", c.Name, i)
		}
		if r.Count > math.MaxInt64 {
			return nil, fmt.Errorf("error bdev %q: rule %d: count %d too large", c.Name, i, r.Count)
		}
	}
	d := &Disk{name: c.Name, uuid: c.UUID, base: c.Base, rules: append([]Rule(nil), c.Rules...),
		left: make([]atomic.Int64, len(c.Rules)), bs: uint64(c.Base.Info().BlockSize)}
	for i, r := range c.Rules {
		d.left[i].Store(int64(r.Count))
	}
	d.Info()
	return d, nil
}

// Info describes the disk: the base's current geometry under this bdev's
// name. A new Info is made only when the base's changes.
func (d *Disk) Info() *bdev.Info {
	bi := d.base.Info()
	if c := d.info.Load(); c != nil && c.base == bi {
		return &c.info
	}
	c := &infoCache{base: bi, info: *bi}
	c.info.Name, c.info.Type, c.info.UUID = d.name, "error", d.uuid
	d.info.Store(c)
	return &c.info
}

// Resize resizes the base bdev (bdev.Resizer), if it can be resized.
func (d *Disk) Resize(newSize uint64) error {
	r, ok := d.base.(bdev.Resizer)
	if !ok {
		return fmt.Errorf("error bdev %q: its base bdev %q cannot be resized", d.name, d.base.Info().Name)
	}
	if err := r.Resize(newSize); err != nil {
		return fmt.Errorf("error bdev %q: %w", d.name, err)
	}
	return nil
}

// Rescan rescans the base bdev (bdev.Rescanner), if it can be rescanned.
func (d *Disk) Rescan() (bool, error) {
	r, ok := d.base.(bdev.Rescanner)
	if !ok {
		return false, fmt.Errorf("error bdev %q: its base bdev %q cannot be rescanned", d.name, d.base.Info().Name)
	}
	changed, err := r.Rescan()
	if err != nil {
		return false, fmt.Errorf("error bdev %q: %w", d.name, err)
	}
	return changed, nil
}

var (
	_ bdev.Resizer   = (*Disk)(nil)
	_ bdev.Rescanner = (*Disk)(nil)
)

// Close does nothing: the base bdev is closed by its owner.
func (d *Disk) Close() error { return nil }

// Open opens a channel of the base bdev and wraps it.
func (d *Disk) Open() (bdev.Channel, error) {
	bc, err := d.base.Open()
	if err != nil {
		return nil, fmt.Errorf("error bdev %q: %w", d.name, err)
	}
	return &channel{d: d, base: bc, epoch: time.Now()}, nil
}

// match returns the first rule io matches, or nil.
func (d *Disk) match(io *bdev.IO) *Rule {
	for i := range d.rules {
		r := &d.rules[i]
		if !d.matches(r, io) {
			continue
		}
		// A counted rule takes the IO only while it has some left; one
		// used up lets the IO on to the next rule.
		if r.Count > 0 && d.left[i].Add(-1) < 0 {
			d.left[i].Store(-1) // used up: keep it from drifting
			continue
		}
		return r
	}
	return nil
}

// matches reports whether io is of r's op and touches r's blocks.
func (d *Disk) matches(r *Rule, io *bdev.IO) bool {
	if r.Op != 0 && r.Op != io.Op {
		return false
	}
	switch io.Op {
	case bdev.OpFlush:
		return true
	case bdev.OpUnmap:
		for _, rg := range io.Ranges[:min(max(io.NRanges, 0), bdev.MaxRanges)] {
			if r.overlaps(rg.Offset, rg.Len, d.bs) {
				return true
			}
		}
		return false
	}
	return r.overlaps(io.Offset, io.Len, d.bs)
}

func (r *Rule) overlaps(off, n, bs uint64) bool {
	if n == 0 {
		return false
	}
	first, last := off/bs, (off+n-1)/bs // blocks touched
	if last < r.LBAStart {
		return false
	}
	return r.LBACount == 0 || first < r.LBAStart+r.LBACount
}

type delayed struct {
	io  *bdev.IO
	due time.Duration // since epoch
	err error
}

type channel struct {
	d     *Disk
	base  bdev.Channel
	epoch time.Time
	held  [DelayedMax]delayed
	nheld int
	ready [DelayedMax]delayed // Poll's scratch: IOs due this pass
}

var _ bdev.Waker = (*channel)(nil)

func (c *channel) Submit(io *bdev.IO) {
	r := c.d.match(io)
	switch {
	case r == nil:
		c.base.Submit(io)
	case r.Delay > 0:
		if c.nheld == DelayedMax {
			io.Err = bdev.ErrBusy
			io.Done.IODone(io)
			return
		}
		// time.Since reads the monotonic clock (vDSO): no syscall.
		c.held[c.nheld] = delayed{io: io, due: time.Since(c.epoch) + r.Delay, err: r.Err}
		c.nheld++
	default:
		io.Err = r.Err
		io.Done.IODone(io)
	}
}

// Poll releases held IOs whose delay has passed (in the order they were
// held), then polls the base. Due IOs are moved out of the table before any
// callback runs, so a Done that submits again finds the table consistent.
func (c *channel) Poll() int {
	work := 0
	if c.nheld > 0 {
		now := time.Since(c.epoch)
		kept, nready := 0, 0
		for i := 0; i < c.nheld; i++ {
			h := c.held[i]
			c.held[i] = delayed{}
			if h.due > now {
				c.held[kept] = h
				kept++
			} else {
				c.ready[nready] = h
				nready++
			}
		}
		c.nheld = kept
		for i := 0; i < nready; i++ {
			h := c.ready[i]
			c.ready[i] = delayed{}
			work++
			if h.err != nil {
				h.io.Err = h.err
				h.io.Done.IODone(h.io)
			} else {
				c.base.Submit(h.io)
			}
		}
	}
	if c.base.InFlight() > 0 {
		work += c.base.Poll()
	}
	return work
}

func (c *channel) InFlight() int { return c.nheld + c.base.InFlight() }

// EventFD passes the base's through; held IOs are released by Poll, which an
// adaptive reactor keeps calling while InFlight is above 0.
func (c *channel) EventFD() int {
	if w, ok := c.base.(bdev.Waker); ok {
		return w.EventFD()
	}
	return -1
}

func (c *channel) Close() error {
	if c.nheld > 0 {
		return fmt.Errorf("error bdev %q: close with %d delayed IOs", c.d.name, c.nheld)
	}
	return c.base.Close()
}

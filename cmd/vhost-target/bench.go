package main

import (
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"math/bits"
	"math/rand/v2"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	_ "unsafe" // go:linkname

	"golang.org/x/sys/unix"

	"vhost-target/vhost/frontend"
)

// benchOpts are the load generator's settings.
type benchOpts struct {
	socket     string
	rw         string // randread, randwrite, randrw, verify
	bs         int
	qd         int
	queues     int
	dur        time.Duration
	cpus       []int
	target     uint8
	lun        uint16
	mix        int // read percentage for randrw
	queueSize  int
	noEventIdx bool
	blk        bool // the socket is a vhost-user-blk controller: virtio-blk IN/OUT requests
	// interrupts: wait on the call eventfd when a poll finds nothing, as a
	// guest's driver does, instead of busy-polling the used ring.
	interrupts bool
	// precondition writes the range a workload reads before timing it
	// (randread, randrw). The flag defaults to true; the zero value is off.
	precondition bool
}

func benchMain(args []string) int {
	fs := flag.NewFlagSet("vhost-target bench", flag.ContinueOnError)
	var o benchOpts
	var cpus string
	var tgt, lun int
	fs.StringVar(&o.socket, "socket", "", "vhost-user-scsi (or, with -blk, vhost-user-blk) socket to load (required)")
	fs.BoolVar(&o.blk, "blk", false, "the socket is a vhost-user-blk controller: virtio-blk IN/OUT requests (-target and -lun unused)")
	fs.StringVar(&o.rw, "rw", "randread", "workload: randread, randwrite, randrw, verify")
	fs.IntVar(&o.bs, "bs", 4096, "block size in bytes per I/O")
	fs.IntVar(&o.qd, "qd", 32, "queue depth per request queue")
	fs.IntVar(&o.queues, "queues", 1, "request queues (one busy-polling thread each)")
	fs.DurationVar(&o.dur, "time", 10*time.Second, "duration")
	fs.StringVar(&cpus, "cpus", "", "comma-separated CPUs to pin the queue threads to (default: unpinned)")
	fs.IntVar(&tgt, "target", 0, "SCSI target (scsi only)")
	fs.IntVar(&lun, "lun", 0, "LUN (scsi only)")
	fs.IntVar(&o.mix, "mix", 70, "read percentage for randrw")
	fs.IntVar(&o.queueSize, "queue-size", 256, "virtqueue size")
	fs.BoolVar(&o.noEventIdx, "no-event-idx", false, "do not negotiate EVENT_IDX")
	fs.BoolVar(&o.interrupts, "interrupts", false,
		"wait for the target's completion interrupt (call eventfd) when nothing completed, as a guest does, instead of "+
			"busy-polling: for a slow bdev on a host whose CPUs the load generator must not take (a Ceph OSD beside it)")
	fs.BoolVar(&o.precondition, "precondition", true,
		"before randread or randrw, write the range the workload reads (sequential 1 MiB writes), so reads return written data")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if o.socket == "" {
		fmt.Fprintln(os.Stderr, "vhost-target bench: -socket is required")
		return 2
	}
	for _, f := range strings.Split(cpus, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		c, err := strconv.Atoi(f)
		if err != nil {
			fmt.Fprintf(os.Stderr, "vhost-target bench: -cpus: %v\n", err)
			return 2
		}
		o.cpus = append(o.cpus, c)
	}
	o.target, o.lun = uint8(tgt), uint16(lun)
	res, err := runBench(o, os.Stdout)
	if err != nil {
		fmt.Fprintf(os.Stderr, "vhost-target bench: %v\n", err)
		return 1
	}
	fmt.Print(res.String())
	if res.Errors > 0 || res.VerifyErrors > 0 {
		return 1
	}
	return 0
}

// benchResult is what a run measured.
type benchResult struct {
	Opts                 benchOpts
	IOs, Bytes           uint64
	Errors, VerifyErrors uint64
	// Wakeups and WaitTimeouts count the waits (-interrupts) that the
	// target's completion signal ended, and those that timed out.
	Wakeups, WaitTimeouts uint64
	Elapsed               time.Duration
	Mean, P50, P99, P999  time.Duration
	BlockSize, NumBlocks  uint64
}

func (r *benchResult) IOPS() float64 { return float64(r.IOs) / r.Elapsed.Seconds() }

func (r *benchResult) String() string {
	return fmt.Sprintf("%s bs=%d qd=%d queues=%d: %.0f IOPS, %.1f MiB/s, lat mean %v p50 %v p99 %v p99.9 %v, errors %d, verify errors %d (%d I/Os in %v)\n",
		r.Opts.rw, r.Opts.bs, r.Opts.qd, r.Opts.queues, r.IOPS(), float64(r.Bytes)/r.Elapsed.Seconds()/(1<<20),
		r.Mean, r.P50, r.P99, r.P999, r.Errors, r.VerifyErrors, r.IOs, r.Elapsed.Round(time.Millisecond))
}

// hist is a log-linear latency histogram in nanoseconds: 32 sub-buckets per
// power of two, fixed size, so recording allocates nothing.
type hist struct {
	b     [64 * 32]uint64
	n     uint64
	sumNs uint64
}

func (h *hist) add(ns uint64) {
	h.n++
	h.sumNs += ns
	h.b[bucket(ns)]++
}

func bucket(ns uint64) int {
	if ns < 32 {
		return int(ns)
	}
	e := bits.Len64(ns) - 6 // ns >> e is in [32, 64)
	return (e+1)*32 + int(ns>>e) - 32
}

func bucketLow(i int) uint64 {
	if i < 32 {
		return uint64(i)
	}
	e := i/32 - 1
	return uint64(32+i%32) << e
}

func (h *hist) merge(o *hist) {
	for i := range h.b {
		h.b[i] += o.b[i]
	}
	h.n += o.n
	h.sumNs += o.sumNs
}

func (h *hist) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	want := uint64(q * float64(h.n))
	var acc uint64
	for i, c := range h.b {
		acc += c
		if acc > want {
			return time.Duration(bucketLow(i))
		}
	}
	return 0
}

type benchWorker struct {
	q                 *frontend.Queue
	index             int // request queue
	o                 *benchOpts
	rng               *rand.Rand
	blocks            uint64 // in units of the LUN block size
	lbsPerIO          uint64
	lbs               uint64
	sectorsPerLB      uint64 // blk: 512-byte sectors per logical block
	h                 hist
	ios, bytes, errs  atomic.Uint64
	verifyErrs        uint64
	wakeups, timeouts uint64 // -interrupts: waits the call eventfd ended, waits that timed out
	cdb               [16]byte
	written           []uint32 // verify: last generation submitted per I/O-sized unit
	durable           []uint32 // verify: last generation whose write completed
	slotUnit          []uint64 // verify: unit of the I/O in each slot
	slotMin           []uint32 // verify: lowest generation a read may return
	region            uint64   // units this worker owns
	first             uint64
	now               int64 // clock of the current submit or reap batch
}

func runBench(o benchOpts, progress *os.File) (*benchResult, error) {
	if o.bs <= 0 || o.qd <= 0 || o.queues <= 0 {
		return nil, errors.New("bs, qd and queues must be positive")
	}
	switch o.rw {
	case "randread", "randwrite", "randrw", "verify":
	default:
		return nil, fmt.Errorf("unknown -rw %q", o.rw)
	}
	slotData := o.bs
	if slotData < 4096 {
		slotData = 4096
	}
	mem := uint64(o.queues) * uint64(o.qd+8) * uint64(slotData+8192)
	mem = max(mem+32<<20, 64<<20)
	dev, err := frontend.Dial(o.socket, frontend.Options{
		NumQueues: o.queues, QueueSize: uint16(o.queueSize), Slots: o.qd, SlotDataSize: slotData,
		MemSize: (mem + 2<<20 - 1) &^ (2<<20 - 1), NoEventIdx: o.noEventIdx, Blk: o.blk,
	})
	if err != nil {
		return nil, fmt.Errorf("connect %s: %w", o.socket, err)
	}
	defer dev.Close()
	nblocks, lbs, err := benchCapacity(dev, &o)
	if err != nil {
		return nil, err
	}
	if uint64(o.bs)%lbs != 0 {
		return nil, fmt.Errorf("-bs %d is not a multiple of the LUN block size %d", o.bs, lbs)
	}
	res := &benchResult{Opts: o, BlockSize: lbs, NumBlocks: nblocks}
	workers := make([]*benchWorker, o.queues)
	units := nblocks / (uint64(o.bs) / lbs)
	if units < uint64(o.queues) {
		return nil, errors.New("LUN too small for this block size and queue count")
	}
	for i := range workers {
		w := &benchWorker{q: dev.Queue(i), index: i, o: &o, rng: rand.New(rand.NewPCG(uint64(i)+1, uint64(time.Now().UnixNano()))),
			blocks: nblocks, lbsPerIO: uint64(o.bs) / lbs, lbs: lbs, sectorsPerLB: lbs / frontend.BlkSectorSize}
		w.region = units / uint64(o.queues)
		w.first = uint64(i) * w.region
		if o.rw == "verify" {
			w.written = make([]uint32, w.region)
			w.durable = make([]uint32, w.region)
			w.slotUnit = make([]uint64, w.q.Slots())
			w.slotMin = make([]uint32, w.q.Slots())
		}
		workers[i] = w
	}
	if o.precondition && (o.rw == "randread" || o.rw == "randrw") {
		if err := precondition(dev, workers, progress); err != nil {
			return nil, err
		}
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	errc := make(chan error, len(workers))
	start := time.Now()
	for i, w := range workers {
		wg.Add(1)
		go func(i int, w *benchWorker) {
			defer wg.Done()
			runtime.LockOSThread()
			if len(o.cpus) > 0 {
				var set unix.CPUSet
				set.Set(o.cpus[i%len(o.cpus)])
				unix.SchedSetaffinity(0, &set)
			}
			if err := w.run(&stop); err != nil {
				errc <- err
			}
		}(i, w)
	}
	tick := time.NewTicker(time.Second)
	deadline := time.After(o.dur)
	var lastIOs uint64
	last := start
loop:
	for {
		select {
		case <-deadline:
			break loop
		case err := <-errc:
			stop.Store(true)
			wg.Wait()
			return nil, err
		case now := <-tick.C:
			var ios uint64
			for _, w := range workers {
				ios += w.ios.Load()
			}
			if progress != nil {
				fmt.Fprintf(progress, "[%3.0fs] %.0f IOPS\n", now.Sub(start).Seconds(), float64(ios-lastIOs)/now.Sub(last).Seconds())
			}
			lastIOs, last = ios, now
		}
	}
	stop.Store(true)
	wg.Wait()
	res.Elapsed = time.Since(start)
	select {
	case err := <-errc:
		return nil, err
	default:
	}
	var h hist
	for _, w := range workers {
		res.IOs += w.ios.Load()
		res.Bytes += w.bytes.Load()
		res.Errors += w.errs.Load()
		res.VerifyErrors += w.verifyErrs
		res.Wakeups += w.wakeups
		res.WaitTimeouts += w.timeouts
		h.merge(&w.h)
	}
	if h.n > 0 {
		res.Mean = time.Duration(h.sumNs / h.n)
	}
	res.P50, res.P99, res.P999 = h.quantile(0.5), h.quantile(0.99), h.quantile(0.999)
	return res, nil
}

// benchCapacity returns the disk's size in logical blocks and its logical
// block size: READ CAPACITY(16) of a SCSI LUN, or a blk controller's config
// space (capacity in 512-byte sectors; blk_size when VIRTIO_BLK_F_BLK_SIZE
// was negotiated, else 512).
func benchCapacity(dev *frontend.Device, o *benchOpts) (nblocks, lbs uint64, err error) {
	if o.blk {
		if dev.ConfigSpace() == nil {
			return 0, 0, errors.New("the blk controller's config space was not read")
		}
		cfg := dev.BlkConfig()
		lbs = frontend.BlkSectorSize
		if dev.Features()&(1<<frontend.BlkFBlkSize) != 0 {
			lbs = uint64(cfg.BlkSize)
		}
		if lbs < frontend.BlkSectorSize || lbs%frontend.BlkSectorSize != 0 {
			return 0, 0, fmt.Errorf("blk_size %d in the config space", cfg.BlkSize)
		}
		return cfg.Capacity * frontend.BlkSectorSize / lbs, lbs, nil
	}
	rc, err := dev.Do(frontend.Command{Target: o.target, LUN: o.lun, CDB: []byte{0x9e, 0x10, 10: 0, 13: 32}, DataInLen: 32})
	if err != nil {
		return 0, 0, fmt.Errorf("READ CAPACITY(16): %w", err)
	}
	if rc.Response != 0 || rc.Status != 0 {
		return 0, 0, fmt.Errorf("READ CAPACITY(16): response %d status %#x sense %x", rc.Response, rc.Status, rc.Sense)
	}
	nblocks = binary.BigEndian.Uint64(rc.DataIn[0:]) + 1
	lbs = uint64(binary.BigEndian.Uint32(rc.DataIn[8:]))
	if lbs == 0 {
		return 0, 0, errors.New("READ CAPACITY(16): block size 0")
	}
	return nblocks, lbs, nil
}

// preconditionBytesMax is the size of one preconditioning write: large
// enough that a GiB takes a thousand commands, within the 4 MiB a LUN of
// this target accepts (and what SPDK's and Linux's targets accept).
const preconditionBytesMax = 1 << 20

// precondition writes, before the timed run, every block the workers will
// read: each worker's region, sequentially, in preconditionBytesMax writes
// (WRITE(16)) on the worker's own request queue through the same vhost-user
// path (blk: OUT requests), the queues in parallel. A read of a block nobody wrote measures the
// backing store's shortcut for it (the kernel's zero page behind a lazily
// mapped RAM disk, a hole in a sparse file), not a read. The blocks get the
// verify pattern (LBA, generation 0), so they are not zero either.
func precondition(dev *frontend.Device, workers []*benchWorker, progress *os.File) error {
	start := time.Now()
	errc := make(chan error, len(workers))
	var total atomic.Uint64
	for i, w := range workers {
		go func() {
			n, err := w.precondition(dev, i)
			total.Add(n)
			errc <- err
		}()
	}
	var first error
	for range workers {
		if err := <-errc; err != nil && first == nil {
			first = err
		}
	}
	if first != nil {
		return fmt.Errorf("precondition (-precondition=false skips it): %w", first)
	}
	took := time.Since(start)
	w0, wn := workers[0], workers[len(workers)-1]
	if progress != nil {
		fmt.Fprintf(progress, "preconditioned LBA %d..%d (%d MiB) with %d KiB writes on %d queue(s) in %v (%.0f MiB/s)\n",
			w0.first*w0.lbsPerIO, (wn.first+wn.region)*wn.lbsPerIO-1, total.Load()>>20, preconditionBytesMax>>10,
			len(workers), took.Round(time.Millisecond), float64(total.Load())/(1<<20)/took.Seconds())
	}
	return nil
}

// precondition writes the worker's region on request queue i and returns
// the bytes written.
func (w *benchWorker) precondition(dev *frontend.Device, i int) (uint64, error) {
	lo := w.first * w.lbsPerIO
	hi := (w.first + w.region) * w.lbsPerIO // blocks [lo, hi) are what this worker reads
	step := uint64(preconditionBytesMax) / w.lbs
	buf := make([]byte, step*w.lbs)
	var cdb [16]byte
	var written uint64
	for lba := lo; lba < hi; lba += step {
		n := min(step, hi-lba)
		data := buf[:n*w.lbs]
		fillPattern(data, lba, 0, w.lbs)
		if w.o.blk {
			r, err := dev.DoBlk(frontend.BlkCommand{Type: frontend.BlkTOut, Sector: lba * w.sectorsPerLB, DataOut: data, Queue: i})
			if err != nil {
				return written, fmt.Errorf("queue %d: OUT LBA %d+%d: %w", i, lba, n, err)
			}
			if r.Status != frontend.BlkSOK {
				return written, fmt.Errorf("queue %d: OUT LBA %d+%d: status %d", i, lba, n, r.Status)
			}
			written += uint64(len(data))
			continue
		}
		cdb = [16]byte{0: 0x8a} // WRITE(16)
		binary.BigEndian.PutUint64(cdb[2:], lba)
		binary.BigEndian.PutUint32(cdb[10:], uint32(n))
		r, err := dev.Do(frontend.Command{Target: w.o.target, LUN: w.o.lun, CDB: cdb[:], DataOut: data, Queue: i})
		if err != nil {
			return written, fmt.Errorf("queue %d: WRITE(16) LBA %d+%d: %w", i, lba, n, err)
		}
		if r.Response != 0 || r.Status != 0 {
			return written, fmt.Errorf("queue %d: WRITE(16) LBA %d+%d: response %d status %#x sense %x",
				i, lba, n, r.Response, r.Status, r.Sense)
		}
		written += uint64(len(data))
	}
	return written, nil
}

// run keeps qd requests in flight on one queue, busy-polling for completions.
func (w *benchWorker) run(stop *atomic.Bool) error {
	q := w.q
	// A polling initiator wants no interrupts (as SPDK's virtio-user does):
	// the target then skips the call eventfd write.
	q.SetInterrupts(w.o.interrupts)
	inflight := 0
	done := w.done // one method value, not one per Reap
	var idle uint64
	var lastDone int64
	for {
		if !stop.Load() {
			// One clock read per batch: submissions in a batch share a
			// timestamp, as completions reaped together do.
			w.now = nanotime()
			for inflight < w.o.qd {
				s := q.Get()
				if s == nil {
					break
				}
				w.submit(s)
				inflight++
			}
			q.Kick()
		}
		if inflight == 0 {
			return nil
		}
		w.now = 0 // read lazily, when the first completion of this batch is seen
		n := q.Reap(done)
		if n == 0 && w.o.interrupts {
			// Sleep until the target signals, then look again (a
			// completion between the Reap and the wait has signalled too).
			if q.WaitCallFD(10 * time.Millisecond) {
				w.wakeups++
			} else {
				w.timeouts++
			}
			q.DrainCall()
			n = q.Reap(done)
		}
		inflight -= n
		if n > 0 {
			idle = 0
		} else if idle++; idle&0xffff == 0 && inflight > 0 {
			// Checked every 65536 empty polls: a target that died or hung
			// must not hang the load generator.
			if lastDone == 0 {
				lastDone = nanotime()
			} else if nanotime()-lastDone > int64(benchStall) {
				return fmt.Errorf("queue %d: %d requests got no completion for %v", w.index, inflight, benchStall)
			}
		}
		if n > 0 {
			lastDone = 0
		}
		if err := q.Err(); err != nil {
			return err
		}
	}
}

const verifyMagic = 0x76687374 // "vhst"

// benchStall is how long requests may go without any completion before the
// bench gives up on the target.
const benchStall = 10 * time.Second

// nanotime is the runtime's monotonic clock: one vDSO read (time.Now reads
// the wall clock as well).
//
//go:linkname nanotime runtime.nanotime
func nanotime() int64

func (w *benchWorker) submit(s *frontend.Slot) {
	unit := w.first + w.rng.Uint64N(w.region)
	read := true
	switch w.o.rw {
	case "randwrite":
		read = false
	case "randrw":
		read = w.rng.IntN(100) < w.o.mix
	case "verify":
		// Read back only what a completed write made durable.
		read = w.durable[unit-w.first] != 0 && w.rng.IntN(2) == 0
		w.slotUnit[s.ID] = unit
		w.slotMin[s.ID] = w.durable[unit-w.first]
	}
	lba := unit * w.lbsPerIO
	c := w.cdb[:]
	op := byte(0x88)
	dir := frontend.DirIn
	if !read {
		op, dir = 0x8a, frontend.DirOut
		if w.o.rw == "verify" {
			gen := w.written[unit-w.first] + 1
			w.written[unit-w.first] = gen
			fillPattern(s.Data[:w.o.bs], lba, gen, w.lbs)
		}
	}
	s.User = uint64(w.now)
	if w.o.blk {
		typ := uint32(frontend.BlkTIn)
		if !read {
			typ = frontend.BlkTOut
		}
		w.q.PrepareBlk(s, typ, lba*w.sectorsPerLB, dir, w.o.bs)
		w.q.Submit(s)
		return
	}
	clear(c)
	c[0] = op
	binary.BigEndian.PutUint64(c[2:], lba)
	binary.BigEndian.PutUint32(c[10:], uint32(w.lbsPerIO))
	w.q.Prepare(s, w.o.target, w.o.lun, c, dir, w.o.bs)
	w.q.Submit(s)
}

// fillPattern stamps every logical block with its LBA and a generation.
func fillPattern(b []byte, lba uint64, gen uint32, lbs uint64) {
	for off := uint64(0); off+lbs <= uint64(len(b)); off += lbs {
		blk := b[off : off+lbs]
		binary.LittleEndian.PutUint64(blk[0:], lba+off/lbs)
		binary.LittleEndian.PutUint32(blk[8:], gen)
		binary.LittleEndian.PutUint32(blk[12:], verifyMagic)
	}
}

func (w *benchWorker) done(s *frontend.Slot) {
	if w.now == 0 {
		w.now = nanotime()
	}
	w.h.add(uint64(w.now) - s.User)
	failed := s.Response() != 0 || s.Status() != 0
	if w.o.blk {
		failed = s.BlkStatus() != frontend.BlkSOK
	}
	if failed {
		w.errs.Add(1)
	} else {
		w.bytes.Add(uint64(s.Len()))
		if w.o.rw == "verify" {
			if s.Dir() == frontend.DirIn {
				w.check(s)
			} else {
				u := w.slotUnit[s.ID] - w.first
				w.durable[u] = max(w.durable[u], binary.LittleEndian.Uint32(s.Data[8:]))
			}
		}
	}
	w.ios.Add(1)
	w.q.Put(s)
}

// check verifies that a read returned the blocks it asked for, each with a
// generation at least as new as the last completed write before the read
// and no newer than the last write submitted.
func (w *benchWorker) check(s *frontend.Slot) {
	unit := w.slotUnit[s.ID]
	lba := unit * w.lbsPerIO
	lo, hi := w.slotMin[s.ID], w.written[unit-w.first]
	b := s.Data[:s.Len()]
	for off := uint64(0); off+w.lbs <= uint64(len(b)); off += w.lbs {
		blk := b[off : off+w.lbs]
		gen := binary.LittleEndian.Uint32(blk[8:])
		if binary.LittleEndian.Uint64(blk[0:]) != lba+off/w.lbs || binary.LittleEndian.Uint32(blk[12:]) != verifyMagic ||
			gen < lo || gen > hi {
			w.verifyErrs++
			return
		}
	}
}

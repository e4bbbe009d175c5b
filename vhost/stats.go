package vhost

import (
	"math/bits"
	"sync"
	"sync/atomic"
)

// ErrorKind classifies failed commands for the errors metric.
type ErrorKind int

const (
	ErrIllegalRequest ErrorKind = iota // ILLEGAL REQUEST: bad opcode, field, LBA range
	ErrMedium                          // MEDIUM ERROR: the backing store failed a read or write
	ErrDataProtect                     // DATA PROTECT: write to a read-only LUN, no space
	ErrBusy                            // BUSY status: the bdev was out of resources
	ErrOther                           // any other CHECK CONDITION
	NumErrorKinds
)

// ErrorKindNames are the metric label values, by ErrorKind.
var ErrorKindNames = [NumErrorKinds]string{"illegal_request", "medium_error", "data_protect", "busy", "other"}

// LatencyBuckets is the number of finite latency histogram buckets: bucket i
// holds latencies up to 2^i microseconds (1 us .. ~1 s).
const LatencyBuckets = 21

// LUNCounters count one LUN's commands. Each queue keeps its own copy, written
// only by the queue's reactor; a scrape sums the copies.
type LUNCounters struct {
	Reads, Writes, Flushes, Unmaps uint64
	ReadBytes, WriteBytes          uint64
	Errors                         [NumErrorKinds]uint64 // commands that ended in CHECK CONDITION or BUSY
	// Latency of block I/O commands (submission to completion on the
	// reactor), in a cumulative-free histogram: Latency[i] counts requests in
	// bucket i, Latency[LatencyBuckets] those above the last bound.
	Latency      [LatencyBuckets + 1]uint64
	LatencyNanos uint64
	InFlight     int64 // block I/O commands submitted to the bdev and not completed
}

// ErrorTotal is the number of commands that ended in an error, of any kind.
func (c *LUNCounters) ErrorTotal() uint64 {
	var n uint64
	for _, v := range c.Errors {
		n += v
	}
	return n
}

// latencyBucket maps nanoseconds to a bucket: ceil(log2(us)).
func latencyBucket(ns int64) int {
	us := uint64(ns+999) / 1000
	if us <= 1 {
		return 0
	}
	b := bits.Len64(us - 1)
	if b > LatencyBuckets {
		return LatencyBuckets
	}
	return b
}

func (a *LUNCounters) add(b *LUNCounters) {
	a.Reads += b.Reads
	a.Writes += b.Writes
	a.Flushes += b.Flushes
	a.Unmaps += b.Unmaps
	a.ReadBytes += b.ReadBytes
	a.WriteBytes += b.WriteBytes
	for i := range a.Errors {
		a.Errors[i] += b.Errors[i]
	}
	for i := range a.Latency {
		a.Latency[i] += b.Latency[i]
	}
	a.LatencyNanos += b.LatencyNanos
	a.InFlight += b.InFlight
}

// QueueCounters count one request queue's work.
type QueueCounters struct {
	Requests        uint64 // chains completed
	Polls           uint64
	Signals         uint64 // call eventfd writes
	BadChains       uint64 // malformed descriptor chains, failed individually
	BadRequests     uint64 // chains too short for the virtio-scsi headers, or bidirectional
	TransportErrors uint64 // responses other than VIRTIO_SCSI_S_OK (bad target, bad LUN)
	Broken          uint64 // times the queue was marked broken
	Renotified      uint64 // notifications the driver waited for and was sent late (queue.checkUnnotified)
}

func (a *QueueCounters) add(b *QueueCounters) {
	a.Requests += b.Requests
	a.Polls += b.Polls
	a.Signals += b.Signals
	a.BadChains += b.BadChains
	a.BadRequests += b.BadRequests
	a.TransportErrors += b.TransportErrors
	a.Broken += b.Broken
	a.Renotified += b.Renotified
}

// ControllerStats gathers the counters of a controller's queues. Live queues
// are read on their reactors (a message, not shared atomics); a stopped
// queue's counters are folded into the retired totals.
type ControllerStats struct {
	c              *Controller
	connections    atomic.Uint64
	protocolErrors atomic.Uint64
	tmfs           atomic.Uint64
	refused        atomic.Uint64 // connections closed at once: max_sessions reached

	mu         sync.Mutex
	live       map[*queue]struct{}
	retiredLUN []LUNCounters          // by lunRef.slot
	retiredQ   map[int]*QueueCounters // by request queue number
}

func newControllerStats(c *Controller) *ControllerStats {
	return &ControllerStats{c: c, live: map[*queue]struct{}{}, retiredQ: map[int]*QueueCounters{}}
}

// resetLUN zeroes the retired counters of slot: its LUN is new, or gone
// (a LUN added later at the same slot starts from zero, as a new series).
func (cs *ControllerStats) resetLUN(slot int) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if slot < len(cs.retiredLUN) {
		cs.retiredLUN[slot] = LUNCounters{}
	}
}

func (cs *ControllerStats) add(q *queue) {
	cs.mu.Lock()
	cs.live[q] = struct{}{}
	cs.mu.Unlock()
}

// retire folds a stopped queue's counters in; the queue's reactor no longer runs it.
func (cs *ControllerStats) retire(q *queue) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	delete(cs.live, q)
	if n := len(q.lunSt); n > len(cs.retiredLUN) {
		cs.retiredLUN = append(cs.retiredLUN, make([]LUNCounters, n-len(cs.retiredLUN))...)
	}
	for i := range q.lunSt {
		cs.retiredLUN[i].add(&q.lunSt[i])
	}
	cs.qc(q.rq).add(&q.st)
}

func (cs *ControllerStats) qc(rq int) *QueueCounters {
	if cs.retiredQ[rq] == nil {
		cs.retiredQ[rq] = &QueueCounters{}
	}
	return cs.retiredQ[rq]
}

// Snapshot is a consistent-enough view of a controller's counters.
type Snapshot struct {
	Connections    uint64
	Refused        uint64 // connections closed at once because max_sessions was reached
	ProtocolErrors uint64
	TMFs           uint64
	LUNs           []LUNSnapshot
	Queues         map[int]QueueCounters // by request queue number
}

// LUNSnapshot is one LUN's summed counters.
type LUNSnapshot struct {
	Target uint8
	LUN    uint16
	Bdev   string
	LUNCounters
}

// Snapshot sums retired and live counters. Live queues are copied on their
// own reactors, so the reactors never pay for shared cache lines. LUNs are
// those of the table now: a LUN removed is no longer listed, one added is.
func (cs *ControllerStats) Snapshot() Snapshot {
	tbl := cs.c.table.Load()
	cs.mu.Lock()
	defer cs.mu.Unlock()
	luns := make([]LUNCounters, max(len(cs.retiredLUN), tbl.slots))
	copy(luns, cs.retiredLUN)
	qs := map[int]QueueCounters{}
	for rq, c := range cs.retiredQ {
		qs[rq] = *c
	}
	for q := range cs.live {
		// Allocated here, copied into on the reactor: the reactor itself
		// never allocates for a scrape. Slots past the table's belong to a
		// LUN being added, not yet published: not listed, not needed.
		lc := make([]LUNCounters, len(luns))
		var qc QueueCounters
		if q.r.Call(func() { copy(lc, q.lunSt); qc = q.st }) != nil {
			continue
		}
		for i := range lc {
			luns[i].add(&lc[i])
		}
		t := qs[q.rq]
		t.add(&qc)
		qs[q.rq] = t
	}
	snap := Snapshot{Connections: cs.connections.Load(), Refused: cs.refused.Load(), ProtocolErrors: cs.protocolErrors.Load(), TMFs: cs.tmfs.Load(), Queues: qs}
	tbl.each(func(tg *target, ref *lunRef) {
		var lc LUNCounters
		if ref.slot < len(luns) {
			lc = luns[ref.slot]
		}
		snap.LUNs = append(snap.LUNs, LUNSnapshot{Target: tg.id, LUN: ref.id, Bdev: ref.bdev.Info().Name, LUNCounters: lc})
	})
	return snap
}

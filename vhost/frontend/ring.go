package frontend

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Split-ring flag bits (virtio 1.2 §2.7.5, §2.7.6, §2.7.8).
const (
	DescFNext         = 1 // VIRTQ_DESC_F_NEXT
	DescFWrite        = 2 // VIRTQ_DESC_F_WRITE: device-writable
	DescFIndirect     = 4 // VIRTQ_DESC_F_INDIRECT
	AvailFNoInterrupt = 1 // VIRTQ_AVAIL_F_NO_INTERRUPT
	UsedFNoNotify     = 1 // VIRTQ_USED_F_NO_NOTIFY
	descSize          = 16
	usedElemSize      = 8
)

// Desc is one split-ring descriptor as written into the table.
type Desc struct {
	Addr  uint64
	Len   uint32
	Flags uint16
	Next  uint16
}

// Ring sizes in bytes for a queue of n entries. The event words are padded to
// 4 bytes so the front-end can update them with 32-bit atomics (notes F.3).
func descTableSize(n uint16) uint64 { return uint64(n) * descSize }
func availRingSize(n uint16) uint64 { return 4 + 2*uint64(n) + 4 } // flags, idx, ring[n], used_event + pad
func usedRingSize(n uint16) uint64  { return 4 + usedElemSize*uint64(n) + 4 }

// needEvent is vring_need_event (virtio 1.2 §2.7.7.2): true when event lies in
// the half-open window of indices (old, new] that were just published.
func needEvent(event, newIdx, old uint16) bool {
	return newIdx-event-1 < newIdx-old
}

// What a chain head stands for, so a used element finds its owner.
const (
	headFree uint8 = iota
	headSlot
	headDo
	headAbandoned // a Do that timed out: freed silently when it completes
	headRaw
	headEvent
)

type headInfo struct {
	kind  uint8
	ndesc uint16
	slot  *Slot
	aux   int
}

// RawUsed is a completed raw chain (see AddRawChain).
type RawUsed struct {
	Head uint16
	Len  uint32
}

// Queue is the driver side of one split virtqueue. The async methods
// (Get/Put/Prepare/Submit/Kick/Reap) are for one goroutine and take no locks;
// Do and TMF serialize on the queue's mutex and must not run concurrently with
// that goroutine on the same queue.
type Queue struct {
	d     *Device
	index int // vring index: 0 control, 1 event, 2.. requests
	size  uint16
	mask  uint16

	descGPA, availGPA, usedGPA uint64
	desc, avail, used          []byte
	availWord                  *uint32 // avail {flags, idx}: written only by us
	usedWord                   *uint32 // used {flags, idx}: written only by the device
	usedEventWord              *uint32 // avail->used_event (+2 pad bytes we own)
	availEventWord             *uint32 // used->avail_event (+2 pad bytes)

	eventIdx, indirect bool
	base               uint16 // SET_VRING_BASE value for the next start

	shadowAvail uint16 // next avail index to fill
	published   uint16 // avail idx the device can see
	kicked      uint16 // avail idx at the last kick decision
	lastUsed    uint16
	availFlags  uint16
	intrOff     bool
	inflight    int

	free  []uint16 // stack of free descriptor indices
	next  []uint16 // our own chain links: the table itself is shared and may hold anything
	heads []headInfo

	kickFD, callFD int
	started        bool // NUM/BASE/ADDR/KICK sent
	efd            [8]byte

	slots   []Slot
	pool    []*Slot
	pending []*Slot // completions found while Do polled, handed out by Reap
	descBuf [4]Desc

	mu         sync.Mutex // serializes Do/TMF/Events
	scratchGPA uint64
	scratchLen uint64
	scratchCur uint64
	abandoned  int
	doDone     bool
	doLen      uint32
	raw        []RawUsed
	evDone     []int // event buffer indices completed
	evLen      []uint32

	violation error // first device misbehaviour seen on this ring
	kicks     uint64
}

func (q *Queue) setup(mem *memory) {
	q.mask = q.size - 1
	q.desc = mem.slice(q.descGPA, int(descTableSize(q.size)))
	q.avail = mem.slice(q.availGPA, int(availRingSize(q.size)))
	q.used = mem.slice(q.usedGPA, int(usedRingSize(q.size)))
	q.availWord = (*uint32)(unsafe.Pointer(&q.avail[0]))
	q.usedWord = (*uint32)(unsafe.Pointer(&q.used[0]))
	q.usedEventWord = (*uint32)(unsafe.Pointer(&q.avail[4+2*int(q.size)]))
	q.availEventWord = (*uint32)(unsafe.Pointer(&q.used[4+usedElemSize*int(q.size)]))
	q.free = make([]uint16, 0, q.size)
	q.next = make([]uint16, q.size)
	q.heads = make([]headInfo, q.size)
	q.pending = make([]*Slot, 0, q.size)
	q.raw = make([]RawUsed, 0, q.size)
	q.kickFD, q.callFD = -1, -1
	q.resetState()
}

// resetState returns the ring to "never used" at index q.base: ring memory
// zeroed, every descriptor free, every slot back in the pool. Only valid while
// the device does not own the ring (before start, after GET_VRING_BASE).
func (q *Queue) resetState() {
	clear(q.desc)
	clear(q.avail)
	clear(q.used)
	q.shadowAvail, q.published, q.kicked, q.lastUsed = q.base, q.base, q.base, q.base
	q.availFlags = 0
	if q.intrOff {
		q.availFlags = AvailFNoInterrupt
	}
	atomic.StoreUint32(q.availWord, uint32(q.availFlags)|uint32(q.base)<<16)
	atomic.StoreUint32(q.usedWord, uint32(q.base)<<16)
	q.writeUsedEvent()
	q.free = q.free[:0]
	for i := int(q.size) - 1; i >= 0; i-- {
		q.free = append(q.free, uint16(i))
	}
	clear(q.heads)
	q.inflight = 0
	q.pool = q.pool[:0]
	for i := len(q.slots) - 1; i >= 0; i-- {
		q.slots[i].busy = false
		q.pool = append(q.pool, &q.slots[i])
	}
	q.pending = q.pending[:0]
	q.raw = q.raw[:0]
	q.evDone, q.evLen = q.evDone[:0], q.evLen[:0]
	q.scratchCur, q.abandoned, q.doDone = 0, 0, false
	q.violation = nil
}

// Index returns the vring index (0 control, 1 event, 2.. request queues).
func (q *Queue) Index() int { return q.index }

// Size returns the queue size.
func (q *Queue) Size() uint16 { return q.size }

// Started reports whether the ring was configured (NUM/BASE/ADDR/KICK sent).
func (q *Queue) Started() bool { return q.started }

// RingGPAs returns the guest physical addresses of the descriptor table,
// avail ring and used ring.
func (q *Queue) RingGPAs() (desc, avail, used uint64) { return q.descGPA, q.availGPA, q.usedGPA }

// Err returns the first device protocol violation seen on this ring (a used
// id that was not in flight, a used index that jumped), or nil.
func (q *Queue) Err() error { return q.violation }

// Kicks counts kicks (eventfd writes, or would-be writes before the kick fd exists).
func (q *Queue) Kicks() uint64 { return q.kicks }

// Inflight counts chains made available and not yet seen used.
func (q *Queue) Inflight() int { return q.inflight }

func (q *Queue) writeDesc(i uint16, d Desc) {
	b := q.desc[int(i)*descSize:]
	binary.LittleEndian.PutUint64(b, d.Addr)
	binary.LittleEndian.PutUint32(b[8:], d.Len)
	binary.LittleEndian.PutUint16(b[12:], d.Flags)
	binary.LittleEndian.PutUint16(b[14:], d.Next)
}

// WriteDesc writes table entry i verbatim (hostile tests; the front-end's
// own bookkeeping is not told).
func (q *Queue) WriteDesc(i uint16, d Desc) { q.writeDesc(i&q.mask, d) }

// ReadDesc reads table entry i.
func (q *Queue) ReadDesc(i uint16) Desc {
	b := q.desc[int(i&q.mask)*descSize:]
	return Desc{binary.LittleEndian.Uint64(b), binary.LittleEndian.Uint32(b[8:]),
		binary.LittleEndian.Uint16(b[12:]), binary.LittleEndian.Uint16(b[14:])}
}

// takeDescs reserves n free descriptors linked in q.next; it returns the head.
func (q *Queue) takeDescs(n int) (uint16, bool) {
	if n <= 0 || n > len(q.free) {
		return 0, false
	}
	top := len(q.free)
	head := q.free[top-1]
	prev := head
	for k := 1; k < n; k++ {
		i := q.free[top-1-k]
		q.next[prev] = i
		prev = i
	}
	q.free = q.free[:top-n]
	return head, true
}

func (q *Queue) freeChain(head uint16) {
	h := &q.heads[head]
	i := head
	for k := uint16(0); k < h.ndesc; k++ {
		q.free = append(q.free, i)
		i = q.next[i]
	}
	*h = headInfo{}
	q.inflight--
}

// addChain writes descs as one linked chain in free table entries, sets NEXT
// on all but the last, and queues the head in the avail ring (unpublished).
func (q *Queue) addChain(descs []Desc, kind uint8, s *Slot, aux int) (uint16, bool) {
	head, ok := q.takeDescs(len(descs))
	if !ok {
		return 0, false
	}
	i := head
	for k, d := range descs {
		if k < len(descs)-1 {
			d.Flags |= DescFNext
			d.Next = q.next[i]
		} else {
			d.Flags &^= DescFNext
			d.Next = 0
		}
		q.writeDesc(i, d)
		i = q.next[i]
	}
	q.commitHead(head, uint16(len(descs)), kind, s, aux)
	return head, true
}

// addIndirect writes descs into the indirect table at tableGPA (table is its
// host view) and one INDIRECT descriptor pointing at it.
func (q *Queue) addIndirect(tableGPA uint64, table []byte, descs []Desc, kind uint8, s *Slot, aux int) (uint16, bool) {
	head, ok := q.takeDescs(1)
	if !ok {
		return 0, false
	}
	for k, d := range descs {
		if k < len(descs)-1 {
			d.Flags |= DescFNext
			d.Next = uint16(k + 1)
		} else {
			d.Flags &^= DescFNext
			d.Next = 0
		}
		b := table[k*descSize:]
		binary.LittleEndian.PutUint64(b, d.Addr)
		binary.LittleEndian.PutUint32(b[8:], d.Len)
		binary.LittleEndian.PutUint16(b[12:], d.Flags)
		binary.LittleEndian.PutUint16(b[14:], d.Next)
	}
	q.writeDesc(head, Desc{Addr: tableGPA, Len: uint32(len(descs) * descSize), Flags: DescFIndirect})
	q.commitHead(head, 1, kind, s, aux)
	return head, true
}

func (q *Queue) commitHead(head, ndesc uint16, kind uint8, s *Slot, aux int) {
	q.heads[head] = headInfo{kind: kind, ndesc: ndesc, slot: s, aux: aux}
	q.inflight++
	q.pushAvail(head)
}

func (q *Queue) pushAvail(head uint16) {
	binary.LittleEndian.PutUint16(q.avail[4+2*int(q.shadowAvail&q.mask):], head)
	q.shadowAvail++
}

// publish makes every queued avail entry visible: the ring entries were
// written with plain stores, and the atomic store of {flags, idx} orders them
// before the index (the virtio write barrier).
func (q *Queue) publish() {
	q.published = q.shadowAvail
	atomic.StoreUint32(q.availWord, uint32(q.availFlags)|uint32(q.published)<<16)
}

// kickWanted applies the device's notification suppression. The atomic store
// in publish and the atomic load here are sequentially consistent, which is
// the full barrier virtio requires between the two (§2.7.13.4).
func (q *Queue) kickWanted() bool {
	if q.eventIdx {
		ev := uint16(atomic.LoadUint32(q.availEventWord))
		return needEvent(ev, q.published, q.kicked)
	}
	return uint16(atomic.LoadUint32(q.usedWord))&UsedFNoNotify == 0
}

// Kick publishes the avail index and writes the kick eventfd only if the
// device asked for notifications (NO_NOTIFY clear, or avail_event passed).
func (q *Queue) Kick() {
	if q.shadowAvail == q.published {
		return
	}
	q.publish()
	if q.kickWanted() {
		q.Notify()
	}
	q.kicked = q.published
}

// Notify writes the kick eventfd unconditionally.
func (q *Queue) Notify() {
	q.kicks++
	if q.kickFD < 0 {
		return
	}
	binary.LittleEndian.PutUint64(q.efd[:], 1)
	unix.Write(q.kickFD, q.efd[:])
}

// SetAvailIdx publishes v as avail->idx, whatever was queued (hostile tests).
func (q *Queue) SetAvailIdx(v uint16) {
	q.shadowAvail = v
	q.publish()
}

// AvailIdx returns the avail index the device can see.
func (q *Queue) AvailIdx() uint16 { return q.published }

// UsedIdx returns the device's used->idx.
func (q *Queue) UsedIdx() uint16 { return uint16(atomic.LoadUint32(q.usedWord) >> 16) }

// UsedFlags returns used->flags.
func (q *Queue) UsedFlags() uint16 { return uint16(atomic.LoadUint32(q.usedWord)) }

// AvailEvent returns used->avail_event.
func (q *Queue) AvailEvent() uint16 { return uint16(atomic.LoadUint32(q.availEventWord)) }

// UsedElem returns used ring element i (taken modulo the size).
func (q *Queue) UsedElem(i uint16) (id, length uint32) {
	e := q.used[4+usedElemSize*int(i&q.mask):]
	return binary.LittleEndian.Uint32(e), binary.LittleEndian.Uint32(e[4:])
}

// SetInterrupts asks the device to signal the call eventfd on completions
// (the default, like a guest), or not (busy-polling load generators): it sets
// or clears VIRTQ_AVAIL_F_NO_INTERRUPT and, with EVENT_IDX, moves used_event.
func (q *Queue) SetInterrupts(on bool) {
	q.intrOff = !on
	if on {
		q.availFlags &^= AvailFNoInterrupt
	} else {
		q.availFlags |= AvailFNoInterrupt
	}
	q.writeUsedEvent()
	atomic.StoreUint32(q.availWord, uint32(q.availFlags)|uint32(q.published)<<16)
}

// SetUsedEvent writes used_event as given: a test plays a driver that has
// consumed only up to v and asks to be told of what follows.
func (q *Queue) SetUsedEvent(v uint16) { atomic.StoreUint32(q.usedEventWord, uint32(v)) }

func (q *Queue) writeUsedEvent() {
	ev := q.lastUsed
	if q.intrOff {
		// Half the index space ahead of what we consumed: the device would
		// signal only after 32768 more completions. (A value behind would
		// read as a driver waiting for completions it has consumed, which
		// the device answers with a late notification: virtq.Unnotified.)
		ev = q.lastUsed + 0x8000
	}
	atomic.StoreUint32(q.usedEventWord, uint32(ev))
}

func (q *Queue) violate(format string, args ...any) {
	if q.violation == nil {
		q.violation = fmt.Errorf("frontend: vring %d: "+format, append([]any{q.index}, args...)...)
	}
}

// poll consumes the used ring once. Completed async slots go to fn, or to
// q.pending when fn is nil (Do polling on behalf of the async user).
func (q *Queue) poll(fn func(*Slot)) int {
	usedIdx := q.UsedIdx() // atomic load: acquire, so element reads below see the device's stores
	n := 0
	if ahead := usedIdx - q.lastUsed; int(ahead) > q.inflight {
		q.violate("used idx %d is %d ahead of %d consumed with %d in flight", usedIdx, ahead, q.lastUsed, q.inflight)
		return 0
	}
	for q.lastUsed != usedIdx {
		id, ln := q.UsedElem(q.lastUsed)
		q.lastUsed++
		if id >= uint32(q.size) || q.heads[id].kind == headFree {
			q.violate("used id %d was not in flight", id)
			continue
		}
		h := q.heads[id]
		q.freeChain(uint16(id))
		switch h.kind {
		case headSlot:
			s := h.slot
			s.usedLen = ln
			s.busy = false
			if fn != nil {
				fn(s)
				n++
			} else {
				q.pending = append(q.pending, s)
			}
		case headDo:
			q.doDone, q.doLen = true, ln
		case headAbandoned:
			q.abandoned--
		case headRaw:
			q.raw = append(q.raw, RawUsed{Head: uint16(id), Len: ln})
		case headEvent:
			q.evDone = append(q.evDone, h.aux)
			q.evLen = append(q.evLen, ln)
		}
	}
	if !q.intrOff && q.eventIdx {
		q.writeUsedEvent()
	}
	return n
}

// DrainCall reads the call eventfd (nonblocking) so its counter never fills.
func (q *Queue) DrainCall() {
	if q.callFD >= 0 {
		var b [8]byte
		unix.Read(q.callFD, b[:])
	}
}

// waitCall sleeps until the call eventfd fires or d passes, whichever first.
func (q *Queue) waitCall(d time.Duration) {
	if q.callFD < 0 {
		time.Sleep(d)
		return
	}
	fds := [1]unix.PollFd{{Fd: int32(q.callFD), Events: unix.POLLIN}}
	unix.Poll(fds[:], int(d/time.Millisecond))
	q.DrainCall()
}

// waitCallUntil blocks until the call eventfd fires (and drains it) or the
// deadline passes; it reports whether it fired.
func (q *Queue) waitCallUntil(deadline time.Time) bool {
	for {
		d := time.Until(deadline)
		if d <= 0 {
			return false
		}
		fds := [1]unix.PollFd{{Fd: int32(q.callFD), Events: unix.POLLIN}}
		n, err := unix.Poll(fds[:], int(d/time.Millisecond)+1)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n == 0 {
			return false
		}
		q.DrainCall()
		return true
	}
}

// AddRawChain writes descs into len(descs) free table entries and queues one
// avail entry for the first (unpublished: Kick or SetAvailIdx publishes).
// Flags are written as given. A Next value below len(descs) names a position
// in descs and is translated to that entry's table index (so Next: 0 makes a
// loop back to the head); larger values are written as given. Completions of
// raw chains are collected by polling; see WaitRaw.
func (q *Queue) AddRawChain(descs []Desc) (head uint16) {
	head, ok := q.takeDescs(len(descs))
	if !ok {
		panic(fmt.Sprintf("frontend: AddRawChain: %d descriptors wanted, %d free", len(descs), len(q.free)))
	}
	idx := make([]uint16, len(descs))
	for k, i := 0, head; k < len(descs); k++ {
		idx[k] = i
		i = q.next[i]
	}
	for k, d := range descs {
		if int(d.Next) < len(descs) {
			d.Next = idx[d.Next]
		}
		q.writeDesc(idx[k], d)
	}
	q.commitHead(head, uint16(len(descs)), headRaw, nil, 0)
	return head
}

// PushAvail queues head in the avail ring without touching the table.
func (q *Queue) PushAvail(head uint16) { q.pushAvail(head) }

// ErrTimeout is returned when the device does not answer in time.
var ErrTimeout = errors.New("frontend: timed out waiting for the device")

// WaitRaw polls until the raw chain with this head completes and returns the
// used length; ErrTimeout if it does not within timeout.
func (q *Queue) WaitRaw(head uint16, timeout time.Duration) (uint32, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	deadline := time.Now().Add(timeout)
	for spins := 0; ; spins++ {
		q.poll(nil)
		for i, r := range q.raw {
			if r.Head == head {
				q.raw = append(q.raw[:i], q.raw[i+1:]...)
				return r.Len, nil
			}
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("vring %d raw head %d: %w", q.index, head, ErrTimeout)
		}
		if spins > 100 {
			q.waitCall(time.Millisecond)
		}
	}
}

// Poll consumes completed used entries (raw chains are then visible to
// WaitRaw, slots to Reap); it returns the number of used entries consumed.
func (q *Queue) Poll() int {
	before := q.lastUsed
	q.poll(nil)
	return int(q.lastUsed - before)
}

// WaitCallFD reports whether the call eventfd currently installed for this
// vring fires within d (its counter is left as it is). Tests use it to check
// that a completion was signalled on the fd the front-end listens to now.
func (q *Queue) WaitCallFD(d time.Duration) bool {
	if q.callFD < 0 {
		return false
	}
	fds := [1]unix.PollFd{{Fd: int32(q.callFD), Events: unix.POLLIN}}
	n, err := unix.Poll(fds[:], int(d/time.Millisecond))
	return err == nil && n == 1
}

// closeFDs closes the kick and call eventfds (a dead connection's: a new
// back-end gets new ones).
func (q *Queue) closeFDs() {
	if q.kickFD >= 0 {
		unix.Close(q.kickFD)
		q.kickFD = -1
	}
	if q.callFD >= 0 {
		unix.Close(q.callFD)
		q.callFD = -1
	}
}

// Package virtq is the device side of a virtio split virtqueue (virtio 1.2 §2.7) over guest memory that the
// driver may rewrite at any moment.
//
// A Queue is owned by one reactor: none of its methods may run concurrently with another on the same Queue.
// The driver runs concurrently, so every guest field is read once into a local before it is checked, ring
// indexes go through sync/atomic (Go's atomics are sequentially consistent, which gives the virtio read, write
// and full barriers; notes F.3), and every address goes through guestmem's overflow-checked lookups.
//
// Memory ordering, in the order the device protocol needs it:
//   - Pop loads avail->idx atomically (acquire) before reading ring entries and descriptors.
//   - Push writes used elements with plain stores; Publish then stores used->idx atomically (release), so the
//     driver never sees the index before the elements.
//   - Publish's atomic store is followed by an atomic load of avail->flags or used_event: a store-load (full)
//     barrier, as the spec requires before deciding whether to notify.
//   - SetNotification(true) stores atomically and the caller's HasAvail loads atomically: the full barrier that
//     closes the "driver added a buffer just before we enabled notifications" race (notes A.4).
//
// Go has no 16-bit atomics, so 16-bit fields are accessed through the aligned 32-bit word holding them. For
// the {flags, idx} words at the start of each ring this needs the avail ring 4-aligned (the spec says 2; see
// ErrAvailAlign). With EVENT_IDX, used_event and avail_event sit at the end of their rings and their word may
// take 2 bytes past the ring: New then requires those 2 bytes to be mapped (they always are in practice, since
// a region ends on a page boundary and the word ends 4-aligned) and avail_event is written by compare-and-swap
// so the 2 neighbouring bytes keep whatever the guest has there.
package virtq

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
	"unsafe"

	"vhost-target/vhost/dirtylog"
	"vhost-target/vhost/guestmem"
)

// MaxSize is the largest split queue size (virtio 1.2 §2.7: "Queue Size ... maximum 32768").
const MaxSize = 32768

// MaxSegments caps the host segments of one chain: QEMU's vhost-user-scsi advertises seg_max = virtqueue_size-2
// = 126 data segments (notes B.3), plus the request and response headers, plus slack for buffers split across
// regions. A chain needing more is a ChainError (SPDK caps at 129 iovecs).
const MaxSegments = 130

// Descriptor flags (virtio 1.2 §2.7.5).
const (
	descFNext     = 1
	descFWrite    = 2
	descFIndirect = 4
)

const (
	availFNoInterrupt = 1 // avail->flags: driver asks for no used-buffer notifications
	usedFNoNotify     = 1 // used->flags: device asks for no available-buffer notifications
	descBytes         = 16
	usedElemBytes     = 8
)

// Config describes a ring as the vhost-user front-end configured it.
type Config struct {
	Size                       uint32 // SET_VRING_NUM: power of two, 1..MaxSize
	DescUVA, AvailUVA, UsedUVA uint64 // SET_VRING_ADDR: front-end virtual addresses, translated with Table.UVA
	LastAvail                  uint16 // SET_VRING_BASE: next avail index to process
	EventIdx                   bool   // VIRTIO_RING_F_EVENT_IDX negotiated
	Indirect                   bool   // VIRTIO_RING_F_INDIRECT_DESC negotiated
	// Inflight, when not nil, is this ring's region of the inflight I/O tracking area (inflight.go): every
	// head taken is marked in it and cleared when published, and New recovers from it, replacing LastAvail
	// with the ring's used index plus the heads still in flight, which Pop returns first.
	Inflight []byte
	// Log, when not nil, is the dirty page log (live migration, VHOST_F_LOG_ALL): every write of the used
	// ring is marked in it at UsedLogGPA, the ring's guest-physical address (SET_VRING_ADDR's log_guest_addr).
	Log        *dirtylog.Log
	UsedLogGPA uint64
}

// Queue is the device side of one split virtqueue.
type Queue struct {
	mem   *guestmem.Table
	desc  []byte // size*16 bytes
	avail []byte // 6+2*size bytes (+2 with EVENT_IDX when the used_event word needs them)
	used  []byte // 6+8*size bytes (+2 with EVENT_IDX)
	size  uint16 // power of two; MaxSize is stored as 0x8000, which fits
	mask  uint16

	eventIdx, indirect bool

	lastAvail   uint16 // next avail index to process
	shadowAvail uint16 // avail->idx as last loaded; lastAvail ≤ shadowAvail (mod 2^16) ≤ lastAvail+size
	broken      error  // sticky ring-level error

	inf *inflight // inflight I/O tracking (INFLIGHT_SHMFD); nil when not negotiated

	log     *dirtylog.Log // dirty page log while the VM migrates; nil otherwise
	usedLog uint64        // guest-physical address of the used ring, for log

	usedIdx   uint16 // used->idx as last stored
	usedFlags uint16 // used->flags as last stored (the device owns both halves of that word)
	pending   uint16 // elements written since the last used->idx store

	// Notification decision state (Publish): the used index at the last decision, and the number of elements
	// published since, which can exceed 16 bits only if Push had to flush on its own.
	signalled      uint16
	signalledValid bool // false until the first decision: the first Publish after New always notifies
	sinceSignal    uint32

	notified  uint16      // used index at the last notification (Publish true, or Renotify)
	decisions [4]Decision // the last EVENT_IDX decisions, for diagnostics (State)
	decided   uint8       // next slot in decisions
}

// Decision is one EVENT_IDX notification decision of Publish: used_event as
// loaded, the published range [Old, New), and the outcome.
type Decision struct {
	UsedEvent, Old, New uint16
	Notify              bool
}

// New validates a ring configuration and translates its three parts once. The used index is read back from
// guest memory, so a ring restarted after GET_VRING_BASE continues where the driver expects. New writes nothing
// to guest memory; call SetNotification to choose the notification state. The Queue keeps slices of mem: stop
// using it before mem is closed (a new memory table means a new Queue, with addresses translated again).
func New(mem *guestmem.Table, c Config) (*Queue, error) {
	if mem == nil {
		return nil, fmt.Errorf("virtq: nil guest memory table")
	}
	if c.Size == 0 || c.Size > MaxSize || c.Size&(c.Size-1) != 0 {
		return nil, fmt.Errorf("%w: %d", ErrQueueSize, c.Size)
	}
	// Alignment: desc 16, avail 2 (we need 4, see ErrAvailAlign), used 4 (virtio 1.2 §2.7 table).
	switch {
	case c.DescUVA%16 != 0:
		return nil, fmt.Errorf("%w: %#x", ErrDescAlign, c.DescUVA)
	case c.AvailUVA%4 != 0:
		return nil, fmt.Errorf("%w: %#x", ErrAvailAlign, c.AvailUVA)
	case c.UsedUVA%4 != 0:
		return nil, fmt.Errorf("%w: %#x", ErrUsedAlign, c.UsedUVA)
	}
	n := uint64(c.Size)
	// Sizes cannot overflow: n ≤ 32768.
	descLen, availLen, usedLen := descBytes*n, 6+2*n, 6+usedElemBytes*n
	if c.EventIdx {
		// Round up so the 32-bit word holding used_event / avail_event is inside the slice.
		availLen, usedLen = (availLen+3)&^3, (usedLen+3)&^3
	}
	q := &Queue{mem: mem, size: uint16(c.Size), mask: uint16(c.Size - 1), eventIdx: c.EventIdx,
		indirect: c.Indirect, lastAvail: c.LastAvail, log: c.Log, usedLog: c.UsedLogGPA}
	var err error
	if q.desc, err = mem.UVA(c.DescUVA, descLen); err != nil {
		return nil, fmt.Errorf("%w: descriptor table: %w", ErrRingUnmapped, err)
	}
	if q.avail, err = mem.UVA(c.AvailUVA, availLen); err != nil {
		return nil, fmt.Errorf("%w: available ring: %w", ErrRingUnmapped, err)
	}
	if q.used, err = mem.UVA(c.UsedUVA, usedLen); err != nil {
		return nil, fmt.Errorf("%w: used ring: %w", ErrRingUnmapped, err)
	}
	if uintptr(unsafe.Pointer(&q.avail[0]))%4 != 0 || uintptr(unsafe.Pointer(&q.used[0]))%4 != 0 {
		return nil, ErrHostAlign
	}
	q.usedFlags, q.usedIdx = q.loadUsedWord()
	if c.Inflight != nil {
		if err := q.setInflight(c.Inflight); err != nil {
			return nil, err
		}
	}
	q.shadowAvail = q.lastAvail
	// Whether the driver was notified of the elements already in the used
	// ring is unknown: the ring that published them may have stopped (a
	// device stop, a restart, the source of a live migration) without the
	// notification a driver then waits for, and a driver that waits for it
	// adds no requests that would lead to one. Half the index space back
	// counts every published element as possibly unnotified, so Unnotified
	// reports a driver whose used_event lies among them. A used index of 0
	// is taken for a new ring with nothing published (it is also where a
	// ring lands after 65536 elements; a late notification missed there is
	// only missed if the driver's barrier also failed at that moment).
	if q.usedIdx != 0 {
		q.notified = q.usedIdx - 0x8000
	}
	return q, nil
}

// Size returns the queue size.
func (q *Queue) Size() uint16 { return q.size }

// LastAvail returns the next avail index to process: the value GET_VRING_BASE reports.
func (q *Queue) LastAvail() uint16 { return q.lastAvail }

// word returns the 32-bit word at b[off:off+4]; off is 4-aligned within a 4-aligned slice (checked in New).
func word(b []byte, off int) *uint32 {
	_ = b[off+3] // bounds check the whole word
	return (*uint32)(unsafe.Pointer(&b[off]))
}

// halves splits a 32-bit word loaded from guest memory into its two little-endian 16-bit fields (lower
// address first), whatever the host byte order.
func halves(w uint32) (lo, hi uint16) {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], w)
	return binary.LittleEndian.Uint16(b[0:]), binary.LittleEndian.Uint16(b[2:])
}

// join is the inverse of halves.
func join(lo, hi uint16) uint32 {
	var b [4]byte
	binary.LittleEndian.PutUint16(b[0:], lo)
	binary.LittleEndian.PutUint16(b[2:], hi)
	return binary.NativeEndian.Uint32(b[:])
}

// load16 atomically loads the le16 at b[off] (off even) through its aligned 32-bit word.
func load16(b []byte, off int) uint16 {
	lo, hi := halves(atomic.LoadUint32(word(b, off&^3)))
	if off&2 != 0 {
		return hi
	}
	return lo
}

// store16 atomically stores the le16 at b[off] without disturbing the other half of its 32-bit word, which
// may belong to the guest: compare-and-swap, retried while the guest changes that half. A guest that rewrites
// bytes it does not own in a tight loop can only delay its own notification.
func store16(b []byte, off int, v uint16) {
	p := word(b, off&^3)
	for {
		old := atomic.LoadUint32(p)
		lo, hi := halves(old)
		if off&2 != 0 {
			hi = v
		} else {
			lo = v
		}
		if atomic.CompareAndSwapUint32(p, old, join(lo, hi)) {
			return
		}
	}
}

func (q *Queue) loadUsedWord() (flags, idx uint16) { return halves(atomic.LoadUint32(word(q.used, 0))) }

// storeUsedWord publishes used->flags and used->idx in one atomic (sequentially consistent) store.
func (q *Queue) storeUsedWord() {
	atomic.StoreUint32(word(q.used, 0), join(q.usedFlags, q.usedIdx))
	if q.log != nil {
		q.log.Mark(q.usedLog, 4)
	}
}

// refreshAvail loads avail->idx and checks it: at most size entries may be outstanding (rust-vmm
// AvailIter::new, QEMU "Guest moved used index"). A driver that moves the index backwards also lands here.
func (q *Queue) refreshAvail() {
	idx := load16(q.avail, 2)
	if pending := idx - q.lastAvail; pending > q.size { // uint16: wraps on purpose
		q.broken = fmt.Errorf("%w: avail idx %d, last processed %d, size %d", ErrAvailAhead, idx, q.lastAvail, q.size)
		return
	}
	q.shadowAvail = idx
}

// HasAvail reports whether a chain is waiting (it loads avail->idx when everything seen so far is consumed).
// It also reports true once the ring is broken, so that the caller's Pop surfaces the error.
func (q *Queue) HasAvail() bool {
	if q.inf != nil && q.inf.resubmitNext < len(q.inf.resubmit) && q.broken == nil {
		return true
	}
	if q.broken == nil && q.lastAvail == q.shadowAvail {
		q.refreshAvail()
	}
	return q.broken != nil || q.lastAvail != q.shadowAvail
}

// Pop takes the next available chain into c. It returns ok=false with a nil error when no chain is waiting.
// A malformed chain yields ok=false and a *ChainError: its head is consumed and the caller completes it with
// Push(head, 0) and counts it. Any other error (ErrAvailAhead, ErrHeadIndex) means the ring is broken; Pop
// keeps returning it and the caller marks the device broken. Pop allocates only on error paths.
func (q *Queue) Pop(c *Chain) (ok bool, err error) {
	if q.broken != nil {
		return false, q.broken
	}
	if q.inf != nil && q.inf.resubmitNext < len(q.inf.resubmit) {
		return q.popResubmit(c) // recovered heads first, in the order they were first taken
	}
	if q.lastAvail == q.shadowAvail {
		q.refreshAvail()
		if q.broken != nil {
			return false, q.broken
		}
		if q.lastAvail == q.shadowAvail {
			return false, nil
		}
	}
	// The atomic load of avail->idx orders the ring read after it. off < 4+2*size ≤ len(avail).
	off := 4 + 2*int(q.lastAvail&q.mask)
	head := binary.LittleEndian.Uint16(q.avail[off:])
	if head >= q.size {
		q.broken = fmt.Errorf("%w: avail[%d] = %d, size %d", ErrHeadIndex, q.lastAvail&q.mask, head, q.size)
		return false, q.broken
	}
	q.lastAvail++
	if q.inf != nil {
		// Marked before the chain is walked: a malformed chain is taken too, and completed with length 0.
		q.inf.storeCounter(head)
		q.inf.storeTaken(head)
	}
	if err := q.walk(c, head); err != nil {
		return false, err
	}
	return true, nil
}

// Push records a used element {head, written}; the driver sees it at the next Publish. head must come from
// Pop (a head ≥ Size is a bug in the caller and panics). Pushing more than Size elements between Publish calls
// (a caller that pops more than Size chains per pass, or a driver offering one head twice) stores used->idx
// early, so that no element the driver has not seen is overwritten; the next Publish still decides
// notification over the whole range.
func (q *Queue) Push(head uint16, written uint32) {
	if head >= q.size {
		panic(fmt.Sprintf("virtq: Push of head %d on a queue of size %d", head, q.size))
	}
	if q.pending == q.size {
		q.flush()
	}
	// off+8 ≤ 4+8*size ≤ len(used).
	off := 4 + usedElemBytes*int((q.usedIdx+q.pending)&q.mask)
	binary.LittleEndian.PutUint32(q.used[off:], uint32(head))
	binary.LittleEndian.PutUint32(q.used[off+4:], written)
	if q.log != nil {
		q.log.Mark(q.usedLog+uint64(off), usedElemBytes)
	}
	q.pending++
	if q.inf != nil {
		q.inf.storeNext(head)
		q.inf.storeBatchHead(head)
	}
}

// flush stores used->idx after the pending elements (release: the atomic store orders the plain stores), then,
// with inflight tracking, clears the batch's flags and records used_idx (inflight.go has the order).
func (q *Queue) flush() {
	n := q.pending
	q.usedIdx += q.pending
	q.sinceSignal += uint32(q.pending)
	q.pending = 0
	q.storeUsedWord()
	if q.inf != nil {
		q.inf.clearBatch(int(n), int(n), q.mask)
		q.inf.storeUsedIdx(q.usedIdx)
	}
}

// Publish makes the pushed elements visible with one used->idx store and reports whether the driver must be
// notified (call eventfd): without EVENT_IDX unless avail->flags has NO_INTERRUPT, with EVENT_IDX when the
// published range crossed used_event (virtio 1.2 §2.7.10). The first Publish after New always notifies
// (a restarted ring may have lost a notification; spurious ones are harmless, missing ones hang guests).
// Publish with nothing pushed stores nothing and returns false.
func (q *Queue) Publish() (notify bool) {
	if q.pending == 0 && q.sinceSignal == 0 {
		return false
	}
	if q.pending != 0 {
		q.flush()
	}
	// The sequentially consistent store in flush and the load below form the full barrier the spec requires.
	old, since := q.signalled, q.sinceSignal
	q.signalled, q.sinceSignal = q.usedIdx, 0
	switch {
	case !q.signalledValid:
		q.signalledValid = true
		notify = true
	case !q.eventIdx:
		flags := load16(q.avail, 0)
		notify = flags&availFNoInterrupt == 0
	case since > 0xffff: // more than 16 bits of progress: the window test below would be meaningless
		notify = true
	default:
		usedEvent := load16(q.avail, 4+2*int(q.size))
		notify = needEvent(usedEvent, q.usedIdx, old)
		q.decisions[q.decided%uint8(len(q.decisions))] = Decision{usedEvent, old, q.usedIdx, notify}
		q.decided++
	}
	if notify {
		q.notified = q.usedIdx
	}
	return notify
}

// Unnotified reports whether the driver now asks for a notification it was
// not sent: elements were published since the last notification, and
// used_event (EVENT_IDX) lies among them, or (without EVENT_IDX)
// interrupts are no longer suppressed. A driver sees no such state for
// long: before it waits it re-reads used->idx after re-enabling
// notifications, with a full barrier between (virtio 1.2 §2.7.10), and
// finds those elements. One whose barrier does not reach us does not: QEMU
// TCG with one vCPU emits the guest's `lock add` (Linux's virt_mb) without
// a host barrier, so its used_event store can pass its used->idx load and
// both sides miss each other; that guest waits forever. The caller polls
// this when idle and, when it stays true, calls Renotify and signals.
// It loads one word of guest memory.
func (q *Queue) Unnotified() bool {
	if q.pending != 0 || q.notified == q.usedIdx {
		return false
	}
	if q.eventIdx {
		return needEvent(load16(q.avail, 4+2*int(q.size)), q.usedIdx, q.notified)
	}
	return load16(q.avail, 0)&availFNoInterrupt == 0
}

// Published reports whether this ring has published elements (the first
// Publish with any decides, and sets signalledValid).
func (q *Queue) Published() bool { return q.signalledValid }

// Renotify records that the caller notifies the driver now, outside Publish.
func (q *Queue) Renotify() { q.notified = q.usedIdx }

// needEvent is vring_need_event: notify when used_event lies in [old, new), computed in wrapping uint16.
func needEvent(event, new, old uint16) bool {
	return new-event-1 < new-old
}

// SetNotification asks the driver to kick (enable) or not to kick (disable) when it adds buffers. Without
// EVENT_IDX it sets or clears VRING_USED_F_NO_NOTIFY in used->flags. With EVENT_IDX, enable writes avail_event
// = the current avail->idx (kick on the next buffer) and disable does nothing: the driver kicks only when
// avail->idx crosses avail_event, which stays behind while we poll (Linux vhost and QEMU do the same). After
// enabling, the caller must call HasAvail again before sleeping: a buffer added just before avail_event / the
// flag became visible produced no kick (notes A.4). The atomic store here and the load in HasAvail are the
// full barrier between the two.
func (q *Queue) SetNotification(enable bool) {
	if q.eventIdx {
		if enable {
			off := 4 + usedElemBytes*int(q.size)
			store16(q.used, off, load16(q.avail, 2))
			if q.log != nil {
				q.log.Mark(q.usedLog+uint64(off), 2)
			}
		}
		return
	}
	if enable {
		q.usedFlags &^= usedFNoNotify
	} else {
		q.usedFlags |= usedFNoNotify
	}
	q.storeUsedWord()
}

// State is a snapshot of a ring for diagnostics: what the device last did
// and what the driver's words say now.
type State struct {
	LastAvail  uint16 // next avail index the device will take
	AvailIdx   uint16 // avail->idx, loaded now
	AvailFlags uint16
	UsedIdx    uint16 // used->idx as last stored
	UsedFlags  uint16
	Pending    uint16 // used elements written, not yet published
	UsedEvent  uint16 // with EVENT_IDX: the driver's used_event (it wants a call when used->idx passes it)
	AvailEvent uint16 // with EVENT_IDX: avail_event as the device left it (the driver kicks when avail->idx passes it)
	EventIdx   bool
	Signalled  uint16     // used index at the last notification decision
	Notified   uint16     // used index at the last notification sent
	Decisions  []Decision // the last EVENT_IDX decisions, oldest first
	Resubmit   int        // recovered heads still to be taken (inflight tracking)
	Broken     string
}

// State reads the ring's state; call it where Pop and Push are called (the
// owner), it does not synchronise with them.
func (q *Queue) State() State {
	flags, idx := halves(atomic.LoadUint32(word(q.avail, 0)))
	s := State{LastAvail: q.lastAvail, AvailIdx: idx, AvailFlags: flags, UsedIdx: q.usedIdx, UsedFlags: q.usedFlags,
		Pending: q.pending, EventIdx: q.eventIdx, Signalled: q.signalled, Notified: q.notified}
	for i := range len(q.decisions) {
		if d := q.decisions[(int(q.decided)+i)%len(q.decisions)]; d != (Decision{}) {
			s.Decisions = append(s.Decisions, d)
		}
	}
	if q.eventIdx {
		s.UsedEvent = load16(q.avail, 4+2*int(q.size))
		s.AvailEvent = load16(q.used, 4+usedElemBytes*int(q.size))
	}
	if q.inf != nil {
		s.Resubmit = len(q.inf.resubmit) - q.inf.resubmitNext
	}
	if q.broken != nil {
		s.Broken = q.broken.Error()
	}
	return s
}

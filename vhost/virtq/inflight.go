package virtq

// Inflight I/O tracking for split rings (vhost-user.rst "Inflight I/O tracking"): a region of memory shared
// with the front-end, which keeps it across a back-end crash and hands it to the next back-end with
// SET_INFLIGHT_FD. Per queue the region is
//
//	QueueRegionSplit { u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//	                   DescStateSplit desc[desc_num]; }          16-byte header
//	DescStateSplit   { u8 inflight; u8 padding[5]; u16 next; u64 counter; }   16 bytes per head
//
// and the device writes it in this order (each step a store; a crash may fall between any two):
//
//	taking head i from the avail ring:   desc[i].counter = ++counter; desc[i].inflight = 1
//	pushing a used element for head i:   desc[i].next = last_batch_head; last_batch_head = i
//	publishing the batch:                used->idx += n; desc[j].inflight = 0 for the n heads of the batch
//	                                     (the list from last_batch_head through next); used_idx = used->idx
//
// so the next back-end, on the same region and rings, finds (recover): used_idx != used->idx only when the
// crash fell between the used->idx store and the used_idx store, and then the batch that used->idx already
// published is the list of used->idx - used_idx heads from last_batch_head, whose flags it clears; after that
// the heads with inflight = 1 are exactly those taken and not published, run again in counter order, and the
// next avail index is used->idx + their number (libvhost-user vu_check_queue_inflights; DPDK
// vhost_check_queue_inflights_split adds the number to the SET_VRING_BASE value, which QEMU sets to used->idx
// after a back-end crash: virtio_queue_restore_last_avail_idx). That index is right because every head taken is
// either published (counted in used->idx) or in flight, whatever order requests complete in.
//
// Memory ordering: the region matters to the next process after this one died, so what counts is the order
// the stores leave this CPU in program order; the flag stores and the used_idx store are atomic (Go's atomics
// are sequentially consistent, which also keeps the compiler from moving the plain stores around them), the
// counter, next and last_batch_head stores are plain and ordered by the atomic store after them (the flag,
// or used->idx). This is the order and the fences DPDK uses (rte_vhost_set_inflight_desc_split,
// rte_vhost_set_last_inflight_io_split, rte_vhost_clr_inflight_desc_split).

import (
	"encoding/binary"
	"fmt"
	"slices"
	"sync/atomic"
	"unsafe"
)

// Inflight region layout (vhost-user.rst "Inflight I/O tracking", split virtqueue).
const (
	inflightHeaderBytes = 16
	inflightDescBytes   = 16
	inflightOffVersion  = 8  // u16 version, u16 desc_num: one 32-bit word
	inflightOffBatch    = 12 // u16 last_batch_head, u16 used_idx: one 32-bit word
	inflightDescNext    = 6  // u16 next, in the 32-bit word at 4 with padding[3..4]
	inflightDescCounter = 8  // u64 counter
	// InflightVersion is the region version this code writes and reads.
	InflightVersion = 1
	// inflightAlign is the per-queue stride's alignment (libvhost-user's and DPDK's INFLIGHT_ALIGNMENT).
	inflightAlign = 64
)

// InflightQueueBytes is the stride of one queue's region in an inflight area laid out for queueSize-entry
// rings: header and entries rounded up to 64 bytes, as DPDK's get_pervq_shm_size_split computes it (and
// libvhost-user's vu_inflight_queue_size, which gives the same value for every power-of-two size).
// queueSize ≤ MaxSize, so it cannot overflow.
func InflightQueueBytes(queueSize uint16) uint64 {
	n := inflightHeaderBytes + inflightDescBytes*uint64(queueSize)
	return (n + inflightAlign - 1) &^ (inflightAlign - 1)
}

// InitInflight prepares one queue's part of a freshly zeroed area (GET_INFLIGHT_FD): desc_num, as DPDK's
// vhost_user_get_inflight_fd writes it. version stays 0, so the first ring start takes it as new.
func InitInflight(region []byte, queueSize uint16) {
	binary.LittleEndian.PutUint16(region[inflightOffVersion+2:], queueSize)
}

// inflightOne is the first 32-bit word of a DescStateSplit with inflight = 1 and zero padding.
var inflightOne = join(1, 0)

// inflight is a queue's view of its region. The region is guest-controlled memory as far as this process is
// concerned (the front-end maps it too): every index read back from it is masked to the ring.
type inflight struct {
	b             []byte // header + size entries; 8-aligned
	counter       uint64 // last counter given to a head
	lastBatchHead uint16 // last_batch_head as last stored
	resubmit      []uint16
	resubmitNext  int // resubmit[resubmitNext:] are still to run again
}

func (f *inflight) desc(head uint16) int { return inflightHeaderBytes + inflightDescBytes*int(head) }

// storeCounter and storeTaken are the two stores of taking a head, in that order.
func (f *inflight) storeCounter(head uint16) {
	f.counter++
	binary.LittleEndian.PutUint64(f.b[f.desc(head)+inflightDescCounter:], f.counter)
}

func (f *inflight) storeTaken(head uint16) { atomic.StoreUint32(word(f.b, f.desc(head)), inflightOne) }

// storeNext and storeBatchHead are the two stores of pushing a used element for head, in that order.
func (f *inflight) storeNext(head uint16) {
	binary.LittleEndian.PutUint16(f.b[f.desc(head)+inflightDescNext:], f.lastBatchHead)
}

func (f *inflight) storeBatchHead(head uint16) {
	f.lastBatchHead = head
	binary.LittleEndian.PutUint16(f.b[inflightOffBatch:], head)
}

// clearBatch clears the inflight flags of the first k of the n heads in the batch list (publishing a batch
// whose used->idx is stored; k = n outside tests). mask bounds every index read back from the region.
func (f *inflight) clearBatch(n, k int, mask uint16) {
	h := f.lastBatchHead & mask
	for i := 0; i < n && i < k; i++ {
		d := f.desc(h)
		atomic.StoreUint32(word(f.b, d), 0)
		h = binary.LittleEndian.Uint16(f.b[d+inflightDescNext:]) & mask
	}
}

// storeUsedIdx stores used_idx, ending a batch.
func (f *inflight) storeUsedIdx(usedIdx uint16) {
	atomic.StoreUint32(word(f.b, inflightOffBatch), join(f.lastBatchHead, usedIdx))
}

// setInflight checks a queue's region and recovers it against the ring (see the top of this file). It sets
// the next avail index and the heads to run again; New calls it after reading used->idx.
func (q *Queue) setInflight(region []byte) error {
	need := inflightHeaderBytes + inflightDescBytes*int(q.size)
	if len(region) < need {
		return fmt.Errorf("%w: %d bytes for a ring of %d", ErrInflightRegion, len(region), q.size)
	}
	if uintptr(unsafe.Pointer(&region[0]))%8 != 0 {
		return fmt.Errorf("%w: not 8-byte aligned", ErrInflightRegion)
	}
	f := &inflight{b: region[:need:need]}
	q.inf = f
	version, _ := halves(atomic.LoadUint32(word(f.b, inflightOffVersion)))
	if version == 0 {
		// A new region (GET_INFLIGHT_FD, or a front-end's zeroed one): nothing to recover. used_idx starts at
		// the ring's used->idx so that a crash before the first batch finds them equal.
		f.storeUsedIdx(q.usedIdx)
		atomic.StoreUint32(word(f.b, inflightOffVersion), join(InflightVersion, q.size))
		return nil
	}
	batchHead, usedIdx := halves(atomic.LoadUint32(word(f.b, inflightOffBatch)))
	f.lastBatchHead = batchHead & q.mask
	if usedIdx != q.usedIdx {
		// Crashed after publishing a batch and before recording it: that batch is no longer in flight. A
		// batch is at most size elements (Push flushes before overflowing); more means a region that does not
		// belong to this ring (a stale or hostile one), and clearing a whole ring's worth is as far as it goes.
		n := min(int(q.usedIdx-usedIdx), int(q.size))
		f.clearBatch(n, n, q.mask)
		f.storeUsedIdx(q.usedIdx)
	}
	for h := uint16(0); h < q.size; h++ {
		if f.b[f.desc(h)] != 1 {
			continue
		}
		f.resubmit = append(f.resubmit, h)
		f.counter = max(f.counter, f.counterOf(h))
	}
	slices.SortStableFunc(f.resubmit, func(a, b uint16) int {
		ca, cb := f.counterOf(a), f.counterOf(b)
		switch {
		case ca < cb:
			return -1
		case ca > cb:
			return 1
		}
		return 0
	})
	// Every head taken is published or in flight (cannot overflow: at most size heads).
	q.lastAvail = q.usedIdx + uint16(len(f.resubmit))
	return nil
}

func (f *inflight) counterOf(head uint16) uint64 {
	return binary.LittleEndian.Uint64(f.b[f.desc(head)+inflightDescCounter:])
}

// Resubmits returns the heads a recovered ring runs again before any new chain, in counter order (the order
// they were taken). Pop returns them first.
func (q *Queue) Resubmits() []uint16 {
	if q.inf == nil {
		return nil
	}
	return q.inf.resubmit
}

// popResubmit takes the next head to run again into c.
func (q *Queue) popResubmit(c *Chain) (ok bool, err error) {
	f := q.inf
	head := f.resubmit[f.resubmitNext]
	f.resubmitNext++
	if err := q.walk(c, head); err != nil {
		return false, err
	}
	return true, nil
}

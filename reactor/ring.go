package reactor

import (
	"fmt"
	"sync/atomic"
)

const cacheLine = 64

type pad [cacheLine]byte

// Ring is a bounded, lock-free multi-producer single-consumer queue
// (Vyukov's array queue with per-slot sequence numbers). Producers may be any
// goroutines; exactly one goroutine may call Pop. Capacity is a power of two.
// Push and Pop never allocate. The head and tail live on their own cache lines
// so producers and the consumer do not false-share.
type Ring[T any] struct {
	_     pad
	tail  atomic.Uint64 // next slot producers claim
	_     pad
	head  atomic.Uint64 // next slot the consumer reads (only the consumer writes it)
	_     pad
	mask  uint64
	slots []ringSlot[T]
}

type ringSlot[T any] struct {
	seq atomic.Uint64
	val T
}

// NewRing returns a ring holding up to size elements; size must be a power of two.
func NewRing[T any](size int) *Ring[T] {
	if size <= 0 || size&(size-1) != 0 {
		panic(fmt.Sprintf("reactor: ring size %d is not a power of two", size))
	}
	r := &Ring[T]{mask: uint64(size - 1), slots: make([]ringSlot[T], size)}
	for i := range r.slots {
		r.slots[i].seq.Store(uint64(i))
	}
	return r
}

// Cap returns the capacity.
func (r *Ring[T]) Cap() int { return len(r.slots) }

// Push adds v; it returns false when the ring is full.
func (r *Ring[T]) Push(v T) bool {
	for {
		pos := r.tail.Load()
		s := &r.slots[pos&r.mask]
		seq := s.seq.Load()
		switch diff := int64(seq) - int64(pos); {
		case diff == 0:
			if r.tail.CompareAndSwap(pos, pos+1) {
				s.val = v
				s.seq.Store(pos + 1) // publishes val to the consumer
				return true
			}
		case diff < 0:
			return false // the slot still holds an element a lap behind: full
		}
		// Another producer claimed pos: retry with the new tail.
	}
}

// Pop removes the oldest element. Only one goroutine may call it.
func (r *Ring[T]) Pop() (v T, ok bool) {
	pos := r.head.Load()
	s := &r.slots[pos&r.mask]
	if s.seq.Load() != pos+1 {
		return v, false // empty, or a producer has claimed the slot but not yet filled it
	}
	v = s.val
	var zero T
	s.val = zero
	s.seq.Store(pos + r.mask + 1) // hand the slot to the producer one lap ahead
	r.head.Store(pos + 1)
	return v, true
}

// Len returns an instantaneous element count (exact only when quiescent).
func (r *Ring[T]) Len() int {
	n := int64(r.tail.Load()) - int64(r.head.Load())
	if n < 0 {
		return 0
	}
	return int(n)
}

// SPSC is a bounded single-producer single-consumer ring: the cheapest hand-off
// between two fixed goroutines (a reactor and a bdev worker, say).
type SPSC[T any] struct {
	_     pad
	tail  atomic.Uint64
	_     pad
	head  atomic.Uint64
	_     pad
	mask  uint64
	slots []T
}

// NewSPSC returns a ring of size elements; size must be a power of two.
func NewSPSC[T any](size int) *SPSC[T] {
	if size <= 0 || size&(size-1) != 0 {
		panic(fmt.Sprintf("reactor: ring size %d is not a power of two", size))
	}
	return &SPSC[T]{mask: uint64(size - 1), slots: make([]T, size)}
}

// Push adds v (producer only); false when full.
func (r *SPSC[T]) Push(v T) bool {
	t := r.tail.Load()
	if t-r.head.Load() > r.mask {
		return false
	}
	r.slots[t&r.mask] = v
	r.tail.Store(t + 1)
	return true
}

// Pop removes the oldest element (consumer only).
func (r *SPSC[T]) Pop() (v T, ok bool) {
	h := r.head.Load()
	if h == r.tail.Load() {
		return v, false
	}
	v = r.slots[h&r.mask]
	var zero T
	r.slots[h&r.mask] = zero
	r.head.Store(h + 1)
	return v, true
}

// Len returns an instantaneous element count.
func (r *SPSC[T]) Len() int { return int(r.tail.Load() - r.head.Load()) }

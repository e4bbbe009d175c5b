package kio

import (
	"sync"
	"sync/atomic"

	"vhost-target/reactor"
)

// WorkerRingSize bounds the slots queued for one worker. A channel that finds
// every worker ring full keeps the slot and retries from its next Poll.
const WorkerRingSize = 1024

// Pool is a set of worker goroutines that run blocking kernel operations
// (preadv, pwritev, fdatasync, fallocate, ioctl) for reactors. A reactor
// pushes a slot onto a worker's lock-free ring and returns at once; the worker
// runs the IO to completion and pushes the slot onto its channel's completion
// ring, which the reactor reaps from Poll. An idle worker sleeps on a channel
// receive; a submitter wakes it only when it has gone to sleep, so a busy
// pool costs no wake-ups and an idle one costs no CPU.
type Pool struct {
	workers []*worker
	next    atomic.Uint32 // round-robin start for pick
	wg      sync.WaitGroup
}

type worker struct {
	ring     *reactor.Ring[*Slot]
	sleeping atomic.Bool
	wake     chan struct{} // capacity 1: a wake-up sent before the worker blocks is kept
	stop     atomic.Bool
}

// NewPool starts n workers.
func NewPool(n int) *Pool {
	if n < 1 {
		n = 1
	}
	p := &Pool{workers: make([]*worker, n)}
	for i := range p.workers {
		w := &worker{ring: reactor.NewRing[*Slot](WorkerRingSize), wake: make(chan struct{}, 1)}
		p.workers[i] = w
		p.wg.Add(1)
		go p.run(w)
	}
	return p
}

// Workers returns the number of workers.
func (p *Pool) Workers() int { return len(p.workers) }

// Push hands s (prepared with Begin, s.Done set) to a worker. It returns
// false when every worker's ring is full. It never blocks or allocates; it
// makes a channel send only to wake a sleeping worker.
func (p *Pool) Push(s *Slot) bool {
	n := len(p.workers)
	start := int(p.next.Add(1)) % n
	// Prefer an idle worker: a slow IO on one worker must not hold up the
	// next IO while another worker sleeps.
	for i := 0; i < n; i++ {
		w := p.workers[(start+i)%n]
		if w.ring.Len() == 0 && w.ring.Push(s) {
			w.kick()
			return true
		}
	}
	for i := 0; i < n; i++ {
		w := p.workers[(start+i)%n]
		if w.ring.Push(s) {
			w.kick()
			return true
		}
	}
	return false
}

// kick wakes w if it sleeps. Push is sequentially consistent with the
// worker's sleeping.Store/ring check: either we see it asleep, or it sees
// the slot.
func (w *worker) kick() {
	if w.sleeping.Load() && w.sleeping.CompareAndSwap(true, false) {
		select {
		case w.wake <- struct{}{}:
		default:
		}
	}
}

func (p *Pool) run(w *worker) {
	defer p.wg.Done()
	for {
		s, ok := w.ring.Pop()
		if ok {
			Exec(s)
			if !s.Done.Push(s) {
				// The completion ring holds one entry per slot: it cannot be full.
				panic("kio: completion ring full")
			}
			continue
		}
		if w.stop.Load() {
			return
		}
		w.sleeping.Store(true)
		if w.ring.Len() > 0 || w.stop.Load() {
			w.sleeping.Store(false)
			continue
		}
		<-w.wake
	}
}

// Close stops the workers after they finish what is queued.
func (p *Pool) Close() {
	for _, w := range p.workers {
		w.stop.Store(true)
		w.sleeping.Store(false)
		select {
		case w.wake <- struct{}{}:
		default:
		}
	}
	p.wg.Wait()
}

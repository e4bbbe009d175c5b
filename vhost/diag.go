package vhost

import (
	"sort"

	"vhost-target/vhost/virtq"
)

// QueueState describes one running request queue, for an operator (or a
// test) looking at a guest whose I/O stands still: whether requests wait in
// the ring unseen, are in flight in the target, or were completed without
// the guest being told.
type QueueState struct {
	Session  uint64
	Vring    int
	Reactor  int
	InFlight int    // requests taken and not yet completed
	Kick     int    // kick eventfd, -1 when polling only
	Call     int    // call eventfd, -1 when none
	Signals  uint64 // writes to the call eventfds since the queue started
	Broken   bool
	Stopping bool
	Ring     virtq.State
}

// QueueStates reads every running request queue's state on its reactor.
func (c *Controller) QueueStates() []QueueState {
	c.lunsMu.Lock()
	qs := make([]*queue, 0, len(c.queues))
	for q := range c.queues {
		qs = append(qs, q)
	}
	c.lunsMu.Unlock()
	out := make([]QueueState, 0, len(qs))
	for _, q := range qs {
		var st QueueState
		if q.r.Call(func() {
			st = QueueState{Session: q.s.id, Vring: q.idx, Reactor: q.r.ID(), InFlight: q.inflight, Kick: q.kick,
				Call: q.call, Signals: q.st.Signals, Broken: q.broken, Stopping: q.stopping, Ring: q.vq.State()}
		}) == nil {
			out = append(out, st)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Session != out[j].Session {
			return out[i].Session < out[j].Session
		}
		return out[i].Vring < out[j].Vring
	})
	return out
}

package vhost

import (
	"fmt"
	"sort"
	"sync/atomic"
	"time"

	"vhost-target/bdev"
	"vhost-target/scsi"
	"vhost-target/vhost/blk"
)

// The LUN table and its changes at runtime (issue 10). lifecycle.go ("LUN
// table") has the rules this file follows; in short: a lunTable is
// immutable and published through Controller.table, request queues load it
// once per command, and every change is made under Controller.lunsMu, which
// also covers queues starting and stopping, so a change reaches every
// running queue of every session exactly once.

// lunRef ties a SCSI LUN to its bdev and to its slot: the index of its
// bdev channel and counters in every queue (queue.chans, queue.lunSt), of
// its retired counters (ControllerStats) and of its unit attention flags in
// every session. A slot belongs to one LUN from AddLUN to RemoveLUN; a
// capacity change keeps the slot and replaces the scsi.LUN.
type lunRef struct {
	id   uint16
	lun  *scsi.LUN
	bdev bdev.Bdev
	slot int
	// disk is the virtio-blk view of a blk controller's disk (blkdev.go),
	// nil on scsi controllers; replaced with lun on a capacity change.
	disk *blk.Disk
}

// target is one SCSI target of a table version.
type target struct {
	id   uint8
	t    *scsi.Target
	luns []lunRef // sorted by id
}

func (t *target) find(id uint16) *lunRef {
	for i := range t.luns {
		if t.luns[i].id == id {
			return &t.luns[i]
		}
	}
	return nil
}

// lunTable is one version of a controller's targets. Never modified once
// published: a change builds a new one.
type lunTable struct {
	targets [256]*target // nil: no such target (BAD_TARGET)
	// slots bounds the slots in use: every queue registered while this
	// table is current has arrays of at least this length.
	slots int
}

// clone copies the table; targets are shared until replaced.
func (t *lunTable) clone() *lunTable {
	n := *t
	return &n
}

// setTarget replaces target id with refs (sorted here); no refs removes it.
func (t *lunTable) setTarget(id uint8, refs []lunRef) error {
	if len(refs) == 0 {
		t.targets[id] = nil
		return nil
	}
	sort.Slice(refs, func(i, j int) bool { return refs[i].id < refs[j].id })
	luns := make([]*scsi.LUN, len(refs))
	for i := range refs {
		luns[i] = refs[i].lun
	}
	st, err := scsi.NewTarget(id, luns)
	if err != nil {
		return err
	}
	t.targets[id] = &target{id: id, t: st, luns: refs}
	return nil
}

// each calls fn for every LUN, by target then LUN.
func (t *lunTable) each(fn func(tg *target, ref *lunRef)) {
	for _, tg := range t.targets {
		if tg == nil {
			continue
		}
		for i := range tg.luns {
			fn(tg, &tg.luns[i])
		}
	}
}

// LUNs returns the controller's LUNs now, sorted by target then LUN.
func (c *Controller) LUNs() []LUNSpec {
	var out []LUNSpec
	c.table.Load().each(func(tg *target, ref *lunRef) {
		out = append(out, LUNSpec{Target: tg.id, LUN: ref.id, Bdev: ref.bdev})
	})
	return out
}

// allocSlot returns the lowest free slot; c.lunsMu is held.
func (c *Controller) allocSlot() int {
	for i, used := range c.slotUsed {
		if !used {
			c.slotUsed[i] = true
			return i
		}
	}
	c.slotUsed = append(c.slotUsed, true)
	return len(c.slotUsed) - 1
}

// AddLUN places spec.Bdev at (spec.Target, spec.LUN). Running sessions see
// it at once: every running request queue of every session gets a channel
// of the bdev before the new table is published, so the first command to
// the LUN finds its channel. Sessions that negotiated VIRTIO_SCSI_F_HOTPLUG
// get a TRANSPORT_RESET/RESCAN event for it (Linux then scsi_add_device()s
// it), and the target's other LUNs a REPORTED LUNS DATA HAS CHANGED unit
// attention in every session (SPC-4 6.33). It fails if the address is
// taken or the bdev cannot be opened on some queue (nothing changes then).
func (c *Controller) AddLUN(spec LUNSpec) error {
	if c.cfg.Kind != KindSCSI {
		return fmt.Errorf("vhost: controller %q is a %v controller: it has one disk and no LUNs to add", c.cfg.Name, c.cfg.Kind)
	}
	return c.addLUN(spec)
}

func (c *Controller) addLUN(spec LUNSpec) error {
	if spec.LUN > scsi.MaxLUNID {
		return fmt.Errorf("vhost: controller %q: target %d lun %d: LUN out of range 0..%d", c.cfg.Name, spec.Target, spec.LUN, scsi.MaxLUNID)
	}
	if spec.Bdev == nil {
		return fmt.Errorf("vhost: controller %q: target %d lun %d: no bdev", c.cfg.Name, spec.Target, spec.LUN)
	}
	c.lunsMu.Lock()
	defer c.lunsMu.Unlock()
	old := c.table.Load()
	var refs []lunRef
	if tg := old.targets[spec.Target]; tg != nil {
		if ref := tg.find(spec.LUN); ref != nil {
			return fmt.Errorf("vhost: controller %q: target %d lun %d is already bdev %q",
				c.cfg.Name, spec.Target, spec.LUN, ref.bdev.Info().Name)
		}
		refs = append(refs, tg.luns...)
	}
	slot := c.allocSlot()
	ref := lunRef{id: spec.LUN, lun: scsi.NewLUN(spec.LUN, spec.Bdev.Info()), bdev: spec.Bdev, slot: slot}
	if c.isBlk() {
		ref.disk = blk.NewDisk(spec.Bdev.Info(), c.cfg.ReadOnly)
	}
	next := old.clone()
	next.slots = max(old.slots, slot+1)
	if err := next.setTarget(spec.Target, append(refs, ref)); err != nil {
		c.slotUsed[slot] = false
		return fmt.Errorf("vhost: controller %q: target %d lun %d: %w", c.cfg.Name, spec.Target, spec.LUN, err)
	}
	// Channels first, on every running queue; the table last.
	var opened []*queue
	for q := range c.queues {
		if err := q.openLUN(slot, next.slots, spec.Bdev); err != nil {
			for _, o := range opened {
				o.closeLUN(slot)
			}
			c.slotUsed[slot] = false
			return fmt.Errorf("vhost: controller %q: target %d lun %d: %w", c.cfg.Name, spec.Target, spec.LUN, err)
		}
		opened = append(opened, q)
	}
	c.Stats.resetLUN(slot)
	c.table.Store(next)
	c.log.Debug("LUN added", "target", spec.Target, "lun", spec.LUN, "bdev", spec.Bdev.Info().Name)
	for _, s := range c.sessionList() {
		s.clearUA(slot)
		for _, o := range refs {
			s.raiseUA(o.slot, scsi.UAReportedLUNsChanged)
		}
		s.event(evTransportReset, spec.Target, spec.LUN, evReasonRescan)
	}
	return nil
}

// RemoveLUN takes (target, lun) away. New commands to it get the answer of
// a missing LUN at once (ILLEGAL REQUEST / LOGICAL UNIT NOT SUPPORTED; a
// target left without LUNs answers BAD_TARGET, as one never configured).
// Commands already submitted to the bdev complete as the bdev completes
// them: RemoveLUN waits for every one of them, on every queue of every
// session, then closes the LUN's channels, and only then returns, so the
// caller may close the bdev. Sessions that negotiated HOTPLUG then get a
// TRANSPORT_RESET/REMOVED event (Linux scsi_remove_device()s it), and the
// target's other LUNs a REPORTED LUNS DATA HAS CHANGED unit attention.
//
// A bdev that never completes an IO holds RemoveLUN (and queue starts and
// stops of this controller) until it does; it logs a WARN every 10 s. The
// one exception is a queue whose stop gave up draining (queue.stop, after
// 30 s): nothing polls its channels, so RemoveLUN leaves that channel to the
// stop, which closes it, and returns with a WARN.
func (c *Controller) RemoveLUN(target uint8, lun uint16) error {
	if c.cfg.Kind != KindSCSI {
		return fmt.Errorf("vhost: controller %q is a %v controller: its disk is removed with the controller", c.cfg.Name, c.cfg.Kind)
	}
	c.lunsMu.Lock()
	defer c.lunsMu.Unlock()
	old := c.table.Load()
	tg := old.targets[target]
	var ref *lunRef
	if tg != nil {
		ref = tg.find(lun)
	}
	if ref == nil {
		return fmt.Errorf("vhost: controller %q: no target %d lun %d", c.cfg.Name, target, lun)
	}
	gone := *ref
	var rest []lunRef
	for _, o := range tg.luns {
		if o.id != lun {
			rest = append(rest, o)
		}
	}
	next := old.clone()
	if err := next.setTarget(target, rest); err != nil {
		return fmt.Errorf("vhost: controller %q: target %d lun %d: %w", c.cfg.Name, target, lun, err)
	}
	c.table.Store(next)
	// Every command that found the LUN in the old table was submitted on
	// its queue's reactor before the reactor runs drainLUN's first
	// message: the message queue orders them.
	for q := range c.queues {
		q.drainLUN(gone.slot, target, lun)
	}
	c.Stats.resetLUN(gone.slot)
	c.slotUsed[gone.slot] = false
	c.log.Debug("LUN removed", "target", target, "lun", lun, "bdev", gone.bdev.Info().Name)
	for _, s := range c.sessionList() {
		s.clearUA(gone.slot)
		for _, o := range rest {
			s.raiseUA(o.slot, scsi.UAReportedLUNsChanged)
		}
		s.event(evTransportReset, target, lun, evReasonRemoved)
	}
	return nil
}

// CapacityChanged tells the controller that b's capacity changed (after a
// bdev.Resizer.Resize or bdev.Rescanner.Rescan): every LUN over b takes b's
// current Info, every session gets UNIT ATTENTION CAPACITY DATA HAS CHANGED
// (2A/09) on its next command to such a LUN (once per session: a session is
// the I_T nexus), and sessions that negotiated VIRTIO_SCSI_F_CHANGE get a
// PARAM_CHANGE event with that ASC/ASCQ, on which Linux rescans the disk. A
// bdev no LUN uses is not an error.
func (c *Controller) CapacityChanged(b bdev.Bdev) error {
	c.lunsMu.Lock()
	defer c.lunsMu.Unlock()
	old := c.table.Load()
	next := old.clone()
	type changed struct {
		target uint8
		lun    uint16
		slot   int
	}
	var hit []changed
	for id, tg := range old.targets {
		if tg == nil {
			continue
		}
		refs := append([]lunRef(nil), tg.luns...)
		touched := false
		for i := range refs {
			if refs[i].bdev == b {
				refs[i].lun = scsi.NewLUN(refs[i].id, b.Info())
				if c.isBlk() {
					refs[i].disk = blk.NewDisk(b.Info(), c.cfg.ReadOnly)
				}
				hit = append(hit, changed{uint8(id), refs[i].id, refs[i].slot})
				touched = true
			}
		}
		if touched {
			if err := next.setTarget(uint8(id), refs); err != nil {
				return fmt.Errorf("vhost: controller %q: target %d: %w", c.cfg.Name, id, err)
			}
		}
	}
	if len(hit) == 0 {
		return nil
	}
	c.table.Store(next)
	info := b.Info()
	c.log.Debug("LUN capacity changed", "bdev", info.Name, "blocks", info.NumBlocks, "block_size", info.BlockSize, "luns", len(hit))
	for _, s := range c.sessionList() {
		if c.isBlk() {
			s.configChanged()
			continue
		}
		for _, h := range hit {
			s.raiseUA(h.slot, scsi.UACapacityChanged)
			s.event(evParamChange, h.target, h.lun, evReasonCapacityChanged)
		}
	}
	return nil
}

// sessionList returns the controller's sessions now.
func (c *Controller) sessionList() []*session {
	c.mu.Lock()
	defer c.mu.Unlock()
	ss := make([]*session, 0, len(c.sessions))
	for s := range c.sessions {
		ss = append(ss, s)
	}
	return ss
}

// openLUN gives the running queue q a channel of b at slot, growing its
// per-slot arrays to n entries if needed. The channel is opened here and
// handed to the reactor, which owns it from then on (as startQueue does).
func (q *queue) openLUN(slot, n int, b bdev.Bdev) error {
	ch, err := b.Open()
	if err != nil {
		return fmt.Errorf("vring %d of session %d: open bdev %s: %w", q.idx, q.s.id, b.Info().Name, err)
	}
	// Allocated here, not on the reactor.
	var chans []bdev.Channel
	var wake []int
	var st []LUNCounters
	if n > len(q.chans) {
		chans, wake, st = make([]bdev.Channel, n), make([]int, n), make([]LUNCounters, n)
	}
	err = q.r.Call(func() {
		if chans != nil {
			copy(chans, q.chans)
			copy(st, q.lunSt)
			q.chans, q.lunSt = chans, st
			if q.wakeFDs != nil {
				for i := copy(wake, q.wakeFDs); i < n; i++ {
					wake[i] = -1
				}
				q.wakeFDs = wake
			}
		}
		q.chans[slot] = ch
		q.lunSt[slot] = LUNCounters{}
		q.watchChannel(slot)
	})
	if err != nil {
		ch.Close()
		return fmt.Errorf("vring %d of session %d: reactor %d: %w", q.idx, q.s.id, q.r.ID(), err)
	}
	return nil
}

// watchChannel lets an adaptive reactor sleep while slot's IOs are in
// flight, when the channel can signal its completions. On the reactor.
func (q *queue) watchChannel(slot int) {
	if q.wakeFDs == nil {
		return
	}
	q.wakeFDs[slot] = -1
	if w, ok := q.chans[slot].(bdev.Waker); ok {
		if fd := w.EventFD(); fd >= 0 && q.r.WatchFD(fd) == nil {
			q.wakeFDs[slot] = fd
		}
	}
}

// takeChannel removes slot's channel from the queue and returns it. On the
// reactor.
func (q *queue) takeChannel(slot int) bdev.Channel {
	if slot >= len(q.chans) {
		return nil
	}
	ch := q.chans[slot]
	q.chans[slot] = nil
	q.lunSt[slot] = LUNCounters{}
	if q.wakeFDs != nil && q.wakeFDs[slot] >= 0 {
		q.r.UnwatchFD(q.wakeFDs[slot])
		q.wakeFDs[slot] = -1
	}
	return ch
}

// closeLUN undoes openLUN (AddLUN failed on another queue; the LUN was
// never published, so nothing was submitted to the channel).
func (q *queue) closeLUN(slot int) {
	var ch bdev.Channel
	if q.r.Call(func() { ch = q.takeChannel(slot) }) != nil {
		ch = q.chans[slot] // the reactor is gone: nothing else touches q
		q.chans[slot] = nil
	}
	if ch != nil {
		ch.Close()
	}
}

// drainLUN waits until the commands q submitted to slot's bdev have
// completed (the LUN is no longer in the table, so no more come), then
// takes the channel off the queue and closes it.
func (q *queue) drainLUN(slot int, target uint8, lun uint16) {
	const warnEvery = 10 * time.Second
	start, warned := time.Now(), time.Duration(0)
	for {
		var ch bdev.Channel
		var inflight int64
		var stopped bool
		err := q.r.Call(func() {
			if slot < len(q.lunSt) {
				inflight = q.lunSt[slot].InFlight
			}
			stopped = q.stopped
			if inflight == 0 {
				ch = q.takeChannel(slot)
			}
		})
		if err == nil && inflight > 0 && stopped {
			// Only after a stop that gave up waiting (queue.stop's 30 s):
			// nothing polls the channel, so its IOs never complete here.
			// The queue's stop closes it; waiting would hold lunsMu, which
			// that stop needs.
			q.s.log.Warn("removing a LUN: its commands on a queue that stopped without draining are lost",
				"vring", q.idx, "target", target, "lun", lun, "in_flight", inflight)
			return
		}
		if err != nil {
			// The reactor is gone: nothing runs q, nothing completes.
			if slot < len(q.chans) {
				ch, q.chans[slot] = q.chans[slot], nil
			}
			inflight = 0
		}
		if inflight == 0 {
			if ch != nil {
				if err := ch.Close(); err != nil {
					q.s.log.Warn("closing the channel of a removed LUN", "vring", q.idx, "target", target, "lun", lun, "err", err)
				}
			}
			return
		}
		if d := time.Since(start); d-warned >= warnEvery {
			warned = d
			q.s.log.Warn("removing a LUN: commands still in flight on its bdev", "vring", q.idx, "target", target,
				"lun", lun, "in_flight", inflight, "waited", d.Round(time.Second))
		}
		time.Sleep(time.Millisecond)
	}
}

// uaChunk holds the pending unit attentions of one session for 64 slots.
type uaChunk [64]atomic.Uint32

// uaFlags is one session's pending unit attentions by slot. Only the
// control plane (under Controller.lunsMu) replaces it, adding chunks;
// chunks never move, so a reactor that loaded an older uaFlags clears a
// flag in the same chunk the control plane sees.
type uaFlags struct {
	chunks []*uaChunk
}

// flag returns slot's word, or nil when no condition was ever raised there.
// On any goroutine; does not allocate.
func (f *uaFlags) flag(slot int) *atomic.Uint32 {
	if f == nil || slot/64 >= len(f.chunks) || f.chunks[slot/64] == nil {
		return nil
	}
	return &f.chunks[slot/64][slot%64]
}

// raiseUA makes ua pending for s on slot. Under Controller.lunsMu.
func (s *session) raiseUA(slot int, ua scsi.UnitAttention) {
	f := s.ua.Load()
	if f.flag(slot) == nil {
		n := &uaFlags{}
		if f != nil {
			n.chunks = append(n.chunks, f.chunks...)
		}
		for len(n.chunks) <= slot/64 {
			n.chunks = append(n.chunks, nil)
		}
		n.chunks[slot/64] = new(uaChunk)
		s.ua.Store(n)
		f = n
	}
	f.flag(slot).Or(uint32(ua))
}

// clearUA forgets slot's conditions (its LUN is new or gone). Under
// Controller.lunsMu.
func (s *session) clearUA(slot int) {
	if p := s.ua.Load().flag(slot); p != nil {
		p.Store(0)
	}
}

// takeUA returns the unit attention the command c about to run on slot
// must report instead of running, clearing it, or 0. One atomic load when
// the session never had one; a compare-and-swap decides which of the
// session's queues reports a condition, so it is reported once.
func (s *session) takeUA(slot int, c *scsi.Cmd) scsi.UnitAttention {
	p := s.ua.Load().flag(slot)
	if p == nil {
		return 0
	}
	for {
		v := p.Load()
		if v == 0 || !scsi.ReportsUnitAttention(c.CDB[0]) {
			return 0
		}
		ua := scsi.UnitAttention(v).Next()
		if p.CompareAndSwap(v, v&^uint32(ua)) {
			return ua
		}
	}
}

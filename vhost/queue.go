package vhost

import (
	"encoding/binary"
	"time"

	"golang.org/x/sys/unix"

	"vhost-target/bdev"
	"vhost-target/reactor"
	"vhost-target/scsi"
	"vhost-target/vhost/blk"
	"vhost-target/vhost/dirtylog"
	"vhost-target/vhost/virtq"
)

// virtio-scsi request and response layouts (virtio spec 5.6.6, cdb 32 / sense 96).
const (
	reqHdrSize  = 8 + 8 + 1 + 1 + 1 + 32 // lun, tag, task_attr, prio, crn, cdb
	respHdrSize = 4 + 4 + 2 + 1 + 1 + 96 // sense_len, resid, status_qualifier, status, response, sense
)

// virtio-scsi response codes (virtio spec 5.6.6.1).
const (
	respOK           = 0
	respOverrun      = 1
	respAborted      = 2
	respBadTarget    = 3
	respReset        = 4
	respBusy         = 5
	respTransportErr = 6
	respTargetFail   = 7
	respNexusFail    = 8
	respFailure      = 9
	respIncorrectLUN = 12
)

// maxSlots bounds the requests one queue keeps in flight (and preallocates).
const maxSlots = 1024

// popBatch bounds the chains taken from a queue per poll, so one busy queue
// cannot starve the others on its reactor.
const popBatch = 32

var callValue = [8]byte{1}

// request is one in-flight virtio-scsi command; preallocated per queue.
type request struct {
	q     *queue
	chain virtq.Chain
	cmd   scsi.Cmd
	data  [virtq.MaxSegments][]byte // data buffers after the headers (guest memory)
	resp  [respHdrSize]byte
	lun   int          // lunRef.slot of the LUN the command ran on, -1 for none
	br    *blk.Request // a blk queue's request state (blkdev.go); nil on scsi queues
	start int64        // poll time (ns) when the bdev IO was submitted; 0 for emulated commands
	epoch uint64       // queue.epoch when the request was taken (task management, ctrlq.go)
}

// queue is a request virtqueue running on one reactor. Only that reactor
// touches it after start; the control plane talks to it with reactor.Call.
type queue struct {
	s    *session
	r    *reactor.Reactor
	vq   *virtq.Queue
	idx  int // vring index
	kick int
	// drain is Disarm's read buffer (a field so that -race builds, where a
	// syscall's slice escapes, do not allocate per sleep).
	drain [8]byte
	call  int

	slots    []request
	free     []*request
	inflight int
	// epoch and older scope a task management function to the requests in
	// flight when it arrived (session.waitTaskSet): a TMF increments epoch
	// and sets older to inflight; a request taken in an earlier epoch
	// decrements older when it completes. So older counts the requests in
	// flight that are older than the last TMF, whatever the I/O after it.
	epoch    uint64
	older    int
	heads    []uint64       // bitmap of heads in flight: a head twice is a broken driver
	pending  int            // used elements pushed since the last Publish
	chans    []bdev.Channel // by lunRef.slot; nil for a slot with no LUN
	scratch  []byte
	broken   bool
	stopping bool
	stopTake int         // chains a stopping queue may still take (see stop)
	stopCh   chan uint16 // set by stop; the reactor sends the final avail index
	stopped  bool        // off the reactor: nothing polls its channels any more
	// crashed is set by Controller.SimulateCrash: the queue behaves as if
	// its process had died (it takes and publishes nothing, and its stop
	// only waits for the bdev IOs in flight, whose completions go nowhere).
	crashed bool
	now     int64 // time of the current Poll: one clock read per poll, not per request
	// log is the session's dirty page log while it migrates (migration.go):
	// the pages each request wrote are marked in it. Fixed for the queue's
	// life (a change restarts the ring).
	log     *dirtylog.Log
	logKick int // SET_LOG_FD's eventfd while logging, else -1; written after each publish
	// idleSince is when the current stretch of polls without work began
	// (or the last look for a missed notification in it); 0 while busy.
	idleSince int64
	wakeFDs   []int // adaptive mode: completion eventfd per channel (-1 none), watched by the reactor

	// Counters written only by the owning reactor; read through reactor.Call.
	rq    int // request queue number (vring index - session.firstRequest)
	st    QueueCounters
	lunSt []LUNCounters // by lunRef.slot
}

func startQueue(s *session, v *vring, vq *virtq.Queue) (*queue, error) {
	c := s.c
	rq := v.idx - s.firstRequest()
	r := c.cfg.Reactors[rq%len(c.cfg.Reactors)]
	n := int(vq.Size())
	if n > maxSlots {
		n = maxSlots
	}
	q := &queue{
		s: s, r: r, vq: vq, idx: v.idx, kick: v.kick, call: v.call, logKick: -1,
		slots:   make([]request, n),
		free:    make([]*request, 0, n),
		heads:   make([]uint64, (int(vq.Size())+63)/64),
		scratch: make([]byte, scsi.ScratchSize),
		rq:      rq,
	}
	if s.logging() {
		q.log, q.logKick = s.dirty, s.logKick
	}
	for i := range q.slots {
		req := &q.slots[i]
		req.q = q
		req.cmd.Buf = q.scratch
		req.cmd.IO.Done = req
		q.free = append(q.free, req)
	}
	if c.isBlk() {
		q.blkRequests()
	}
	// Under lunsMu from the table's channels to the registration: a LUN
	// added or removed meanwhile would miss this queue (lifecycle.go).
	c.lunsMu.Lock()
	defer c.lunsMu.Unlock()
	q.crashed = c.crashed
	tbl := c.table.Load()
	q.chans = make([]bdev.Channel, tbl.slots)
	q.lunSt = make([]LUNCounters, tbl.slots)
	var openErr error
	tbl.each(func(_ *target, ref *lunRef) {
		if openErr != nil {
			return
		}
		ch, err := ref.bdev.Open()
		if err != nil {
			openErr = protoErr("vring %d: open bdev %s: %v", v.idx, ref.bdev.Info().Name, err)
			return
		}
		q.chans[ref.slot] = ch
	})
	if openErr != nil {
		q.closeChannels()
		return nil, openErr
	}
	// Counted before the reactor runs it: a scrape right after the first
	// request must see this queue's counters.
	c.Stats.add(q)
	err := r.Call(func() {
		if q.kick >= 0 && r.Mode() == reactor.Adaptive {
			r.WatchFD(q.kick)
		}
		if r.Mode() == reactor.Adaptive {
			// Channels that can signal completions let the reactor sleep
			// while their IOs are in flight; EventFD is called on the
			// reactor because the channel is the reactor's.
			q.wakeFDs = make([]int, len(q.chans))
			for i := range q.chans {
				q.wakeFDs[i] = -1
				if q.chans[i] != nil {
					q.watchChannel(i)
				}
			}
		}
		q.vq.SetNotification(false) // we poll; Arm enables kicks before an adaptive sleep
		r.AddPoller(q)
		// One spurious interrupt after (re)start: a guest that missed a call
		// while the ring was stopped would otherwise wait forever (as SPDK does).
		q.signal()
	})
	if err != nil {
		c.Stats.retire(q)
		q.closeChannels()
		return nil, protoErr("vring %d: reactor %d: %v", v.idx, r.ID(), err)
	}
	c.queues[q] = struct{}{}
	s.log.Debug("request queue started", "vring", v.idx, "reactor", r.ID(), "size", vq.Size())
	return q, nil
}

// closeChannels closes the queue's bdev channels. Only when no reactor runs
// the queue, with c.lunsMu held (RemoveLUN takes channels off running
// queues under it).
func (q *queue) closeChannels() {
	for i, ch := range q.chans {
		if ch != nil {
			if err := ch.Close(); err != nil {
				q.s.log.Warn("closing a bdev channel", "vring", q.idx, "slot", i, "err", err)
			}
			q.chans[i] = nil
		}
	}
}

// setCall swaps the call fd on the owning reactor, then signals the new fd
// once. QEMU installs a ring's call fd only after enabling it (vhost-scsi-common
// unmasks every queue after vhost_dev_start), so completions published
// before the swap were signalled on the previous fd, which nobody reads any
// more: without this interrupt the guest waits forever for its first command
// (issue 9). libvhost-user writes to every new call fd for the same reason.
func (q *queue) setCall(fd int) {
	q.r.Call(func() {
		q.call = fd
		q.signal()
	})
}

// stop drains the queue on its reactor (in-flight requests complete and are
// published), removes it, and returns the next avail index.
func (q *queue) stop() uint16 {
	ch := make(chan uint16, 1)
	// Chains the driver made available before the stop are still taken and
	// completed (at most one ring's worth, so a driver that keeps adding
	// cannot hold the stop): a reactor descheduled for a moment must not
	// leave requests that were kicked before a SIGTERM without a used
	// element. Processing available buffers before GET_VRING_BASE answers is
	// allowed; the base it returns counts them.
	if err := q.r.Call(func() { q.stopping, q.stopCh, q.stopTake = true, ch, int(q.vq.Size()); q.Poll() }); err != nil {
		// The reactor is gone: nothing runs the queue any more.
		ch <- q.vq.LastAvail()
	}
	var base uint16
	select {
	case base = <-ch:
	case <-time.After(30 * time.Second):
		q.s.log.Error("request queue did not drain in 30 s; its in-flight requests are lost",
			"vring", q.idx)
		if q.r.Call(func() { q.finishStop() }) != nil {
			ch <- q.vq.LastAvail()
		}
		base = <-ch
	}
	// The reactor no longer runs q. Unregistered under lunsMu before its
	// channels close: a RemoveLUN in progress has finished with q, and the
	// next one will not find it.
	c := q.s.c
	c.lunsMu.Lock()
	delete(c.queues, q)
	q.closeChannels()
	c.Stats.retire(q)
	c.lunsMu.Unlock()
	return base
}

func (q *queue) finishStop() {
	if q.stopCh == nil {
		return
	}
	if q.pending > 0 && !q.crashed {
		q.publish()
	}
	if q.kick >= 0 && q.r.Mode() == reactor.Adaptive {
		q.r.UnwatchFD(q.kick)
	}
	for _, fd := range q.wakeFDs {
		if fd >= 0 {
			q.r.UnwatchFD(fd)
		}
	}
	q.r.RemovePoller(q)
	q.stopCh <- q.vq.LastAvail()
	q.stopCh = nil
	q.stopped = true
}

// Poll reaps bdev completions, then starts up to popBatch new requests.
func (q *queue) Poll() int {
	q.now = q.r.Now()
	work := 0
	for _, ch := range q.chans {
		if ch != nil && ch.InFlight() > 0 {
			work += ch.Poll()
		}
	}
	if q.crashed {
		return q.pollCrashed(work)
	}
	if q.stopping {
		if q.stopTake > 0 {
			if q.broken || !q.vq.HasAvail() {
				q.stopTake = 0 // everything available is taken: accept no more
			} else {
				n, taken := q.take(min(popBatch, q.stopTake))
				work += n
				q.stopTake -= taken
			}
		}
		if q.pending > 0 {
			q.publish()
		}
		if q.inflight == 0 && q.stopTake == 0 {
			q.finishStop()
		}
		return work
	}
	n, _ := q.take(popBatch)
	work += n
	if q.pending > 0 {
		q.publish()
	}
	q.idle(work)
	q.st.Polls++
	return work
}

// renotifyAfter is how long a queue stays idle before it looks whether the
// driver waits for a notification it was not sent, and how often it looks
// again while idle. A driver that re-reads used->idx after re-enabling
// notifications (as it must) leaves that state within microseconds; one
// whose barrier does not reach us would wait forever (virtq.Unnotified).
// Only idle stretches pay for the look (one load of guest memory a
// millisecond): a loaded queue never reaches it.
const renotifyAfter = int64(time.Millisecond)

// idle tracks idle stretches and, every renotifyAfter of one, sends the
// notification the driver waits for, if it does (and Arm keeps an adaptive
// reactor awake while it does, so this runs).
func (q *queue) idle(work int) {
	if work > 0 {
		q.idleSince = 0
		return
	}
	if q.idleSince == 0 {
		q.idleSince = q.now
		return
	}
	if q.now-q.idleSince < renotifyAfter {
		return
	}
	q.idleSince = q.now
	if !q.vq.Unnotified() {
		return
	}
	q.st.Renotified++
	if !q.vq.Published() {
		// Elements published before this ring started (by the ring or the
		// process before it, or on the source of a live migration), whose
		// notification the driver still waits for.
		q.s.log.Info("ring started with the driver waiting for a notification; sending it", "vring", q.idx,
			"used_idx", q.vq.State().UsedIdx)
	} else if q.st.Renotified <= 10 {
		// INFO, not WARN: a driver descheduled for a millisecond between
		// asking and re-checking (a loaded host, KVM overcommit) reads the
		// same and loses nothing; the metric counts both kinds.
		st := q.vq.State()
		q.s.log.Info("driver waited for a notification it was not sent; sending it", "vring", q.idx,
			"used_idx", st.UsedIdx, "used_event", st.UsedEvent, "notified", st.Notified, "decisions", st.Decisions)
	}
	q.signal()
}

// pollCrashed is Poll after SimulateCrash: completions were reaped (their
// responses and used elements are written, as a process can do before it
// dies) but nothing is taken and used->idx is never stored again, so the
// driver sees none of it; the stop finishes once the bdevs are done.
func (q *queue) pollCrashed(work int) int {
	if q.stopping && q.inflight == 0 {
		q.finishStop()
	}
	return work
}

// take pops and starts up to max chains. It returns the requests started
// and the chains consumed (malformed ones included).
func (q *queue) take(max int) (started, taken int) {
	for ; taken < max && !q.broken && len(q.free) > 0; taken++ {
		r := q.free[len(q.free)-1]
		ok, err := q.vq.Pop(&r.chain)
		if err != nil {
			q.popError(r, err)
			continue
		}
		if !ok {
			break
		}
		h := r.chain.Head
		if q.heads[h/64]&(1<<(h%64)) != 0 {
			q.markBroken("head already in flight", int(h))
			break
		}
		q.heads[h/64] |= 1 << (h % 64)
		q.free = q.free[:len(q.free)-1]
		q.inflight++
		r.epoch = q.epoch
		started++
		q.execute(r)
	}
	return started, taken
}

func (q *queue) popError(r *request, err error) {
	if ce, ok := err.(*virtq.ChainError); ok {
		if h := ce.Head; q.heads[h/64]&(1<<(h%64)) != 0 {
			// The driver reused a head still in flight: completing it now would
			// give it a used element for the request we are still running.
			q.markBroken("head already in flight", int(h))
			return
		}
		// One malformed chain: complete it with nothing written and go on.
		q.st.BadChains++
		q.vq.Push(ce.Head, 0)
		q.pending++
		if q.st.BadChains <= 10 {
			q.s.log.Warn("malformed descriptor chain failed", "vring", q.idx, "head", ce.Head, "err", err)
		}
		return
	}
	q.markBroken(err.Error(), -1)
}

// markBroken stops processing a queue whose rings the driver has corrupted.
// The guest must reset the device; the rest of the process is untouched.
func (q *queue) markBroken(why string, head int) {
	q.broken = true
	q.st.Broken++
	q.s.log.Error("virtqueue broken by the driver; it needs a device reset", "vring", q.idx, "head", head, "err", why)
}

func (q *queue) publish() {
	q.pending = 0 // callers publish only with elements pending
	if q.vq.Publish() {
		q.signal()
	}
	if q.logKick >= 0 {
		unix.Write(q.logKick, callValue[:])
	}
}

func (q *queue) signal() {
	q.vq.Renotify()
	if q.call >= 0 {
		unix.Write(q.call, callValue[:])
		q.st.Signals++
	}
}

// Arm lets an adaptive reactor sleep: enable kicks, then look again.
func (q *queue) Arm() bool {
	if q.stopping || q.crashed || q.kick < 0 || !q.canSleepInFlight() || q.vq.Unnotified() {
		return false
	}
	if q.broken {
		// Nothing is taken from a broken ring until the control plane stops it
		// (a reactor message, which wakes us). Its avail entries stay pending,
		// so HasAvail below would keep the reactor spinning forever.
		return true
	}
	q.vq.SetNotification(true)
	return !q.vq.HasAvail()
}

// Disarm returns to polling: suppress kicks and drain the kick eventfd.
func (q *queue) Disarm() {
	q.vq.SetNotification(false)
	unix.Read(q.kick, q.drain[:])
	for _, fd := range q.wakeFDs {
		if fd >= 0 {
			unix.Read(fd, q.drain[:])
		}
	}
}

// canSleepInFlight reports whether every IO in flight will wake the reactor
// when it completes: each busy channel has a watched completion eventfd.
func (q *queue) canSleepInFlight() bool {
	if q.inflight == 0 {
		return true
	}
	if q.wakeFDs == nil {
		return false
	}
	for i, ch := range q.chans {
		if ch != nil && ch.InFlight() > 0 && q.wakeFDs[i] < 0 {
			return false
		}
	}
	return true
}

// execute parses a chain as a virtio-scsi command and runs it.
func (q *queue) execute(r *request) {
	if r.br != nil {
		q.executeBlk(r)
		return
	}
	c := &r.chain
	rd, wr := c.Readable(), c.Writable()
	if c.ReadLen < reqHdrSize || c.WriteLen < respHdrSize {
		// No room for the request or the response: nothing can be written back.
		q.st.BadRequests++
		q.finish(r, 0)
		return
	}
	var hdr [reqHdrSize]byte
	gather(hdr[:], rd)
	cmd := &r.cmd
	copy(cmd.CDB[:], hdr[19:51])
	cmd.Status, cmd.SenseLen, cmd.Resid = 0, 0, 0
	r.lun, r.start = -1, 0
	cmd.IO.Op = 0

	dataOut := c.ReadLen - reqHdrSize
	dataIn := c.WriteLen - respHdrSize
	switch {
	case dataOut > 0 && dataIn > 0:
		// Bidirectional commands need VIRTIO_SCSI_F_INOUT, which we don't offer.
		q.st.BadRequests++
		q.respond(r, respFailure)
		return
	case dataOut > 0:
		cmd.Dir, cmd.DataLen = scsi.DirOut, dataOut
		cmd.Data = skip(r.data[:0], rd, reqHdrSize)
	case dataIn > 0:
		cmd.Dir, cmd.DataLen = scsi.DirIn, dataIn
		cmd.Data = skip(r.data[:0], wr, respHdrSize)
	default:
		cmd.Dir, cmd.DataLen, cmd.Data = scsi.DirNone, 0, nil
	}

	// LUN addressing (virtio spec 5.6.6.1): byte 0 is 1, byte 1 the target,
	// bytes 2-3 the LUN with the flat-space bit (0x40) that Linux sets.
	if hdr[0] != 1 {
		q.respond(r, respBadTarget)
		return
	}
	// One table version for the whole command (lifecycle.go, "LUN table").
	t := q.s.c.table.Load().targets[hdr[1]]
	if t == nil {
		q.respond(r, respBadTarget)
		return
	}
	if hdr[2] != 0 && hdr[2]&0xc0 != 0x40 {
		q.respond(r, respIncorrectLUN)
		return
	}
	lunID := (uint16(hdr[2])<<8 | uint16(hdr[3])) & 0x3fff
	var ch bdev.Channel
	if ref := t.find(lunID); ref != nil {
		r.lun, ch = ref.slot, q.chans[ref.slot]
		if ua := q.s.takeUA(ref.slot, cmd); ua != 0 {
			cmd.ReportUnitAttention(ua)
			q.respond(r, respOK)
			return
		}
	}
	// Always through the target, present LUN or not: LUN.Execute alone
	// answers REPORT LUNS with that one LUN, and Linux then never finds the
	// target's other LUNs (it scans with REPORT LUNS to LUN 0).
	act := t.t.Execute(lunID, cmd)
	if act == scsi.ActionIO {
		r.start = q.now
		q.lunSt[r.lun].InFlight++
		ch.Submit(&cmd.IO) // completes through IODone, maybe inline
		return
	}
	q.respond(r, respOK)
}

// IODone is called by the bdev on this queue's reactor.
func (r *request) IODone(io *bdev.IO) {
	if r.br != nil {
		r.q.blkDone(r)
		return
	}
	r.cmd.CompleteIO()
	r.q.respond(r, respOK)
}

// respond writes the virtio-scsi response header and completes the request.
func (q *queue) respond(r *request, response byte) {
	cmd := &r.cmd
	b := &r.resp
	sl := uint32(cmd.SenseLen)
	binary.LittleEndian.PutUint32(b[0:], sl)
	binary.LittleEndian.PutUint32(b[4:], cmd.Resid)
	b[8], b[9] = 0, 0
	b[10] = cmd.Status
	b[11] = response
	copy(b[12:], cmd.Sense[:sl])
	clear(b[12+sl:])
	scatter(r.chain.Writable(), b[:])
	written := uint32(respHdrSize)
	if response == respOK && cmd.Dir == scsi.DirIn {
		written += cmd.DataLen - cmd.Resid
	}
	if response == respOK && r.lun >= 0 {
		q.account(r)
	} else if response != respOK {
		q.st.TransportErrors++
	}
	q.finish(r, written)
}

func (q *queue) account(r *request) {
	cmd := &r.cmd
	st := &q.lunSt[r.lun]
	if r.start != 0 {
		st.InFlight--
		d := q.now - r.start
		st.Latency[latencyBucket(d)]++
		st.LatencyNanos += uint64(d)
	}
	if cmd.Status != 0 {
		st.Errors[errorKind(cmd)]++
	}
	switch cmd.IO.Op {
	case bdev.OpRead:
		st.Reads++
		st.ReadBytes += uint64(cmd.DataLen - cmd.Resid)
	case bdev.OpWrite:
		st.Writes++
		st.WriteBytes += uint64(cmd.DataLen - cmd.Resid)
	case bdev.OpFlush:
		st.Flushes++
	case bdev.OpUnmap, bdev.OpWriteZeroes:
		st.Unmaps++
	}
}

func errorKind(c *scsi.Cmd) ErrorKind {
	if c.Status == 0x08 || c.Status == 0x28 { // BUSY, TASK SET FULL
		return ErrBusy
	}
	if c.SenseLen < 3 {
		return ErrOther
	}
	switch c.Sense[2] & 0x0f {
	case 0x05:
		return ErrIllegalRequest
	case 0x03:
		return ErrMedium
	case 0x07:
		return ErrDataProtect
	}
	return ErrOther
}

// finish pushes the used element and recycles the slot.
func (q *queue) finish(r *request, written uint32) {
	if q.log != nil && written > 0 {
		q.markWritten(r, written)
	}
	q.push(r, written)
}

// push pushes the used element (its pages already marked while logging)
// and recycles the slot.
func (q *queue) push(r *request, written uint32) {
	h := r.chain.Head
	q.heads[h/64] &^= 1 << (h % 64)
	q.vq.Push(h, written)
	q.pending++
	q.inflight--
	if r.epoch != q.epoch {
		q.older--
	}
	q.free = append(q.free, r)
	q.st.Requests++
}

// gather copies the first len(dst) bytes of segs into dst.
func gather(dst []byte, segs [][]byte) {
	for _, s := range segs {
		n := copy(dst, s)
		dst = dst[n:]
		if len(dst) == 0 {
			return
		}
	}
}

// scatter copies src over the start of segs.
func scatter(segs [][]byte, src []byte) {
	for _, s := range segs {
		n := copy(s, src)
		src = src[n:]
		if len(src) == 0 {
			return
		}
	}
}

// skip appends to dst the parts of segs after the first off bytes.
func skip(dst [][]byte, segs [][]byte, off uint32) [][]byte {
	for _, s := range segs {
		if off >= uint32(len(s)) {
			off -= uint32(len(s))
			continue
		}
		dst = append(dst, s[off:])
		off = 0
	}
	return dst
}

package frontend

import (
	"encoding/binary"
	"fmt"
	"time"
)

// Command is one synchronous SCSI command for Do.
type Command struct {
	Target    uint8
	LUN       uint16
	CDB       []byte // up to 32 bytes, zero padded
	DataOut   []byte // data-out, copied into guest memory
	DataInLen int    // data-in buffer size
	Queue     int    // request queue 0..NumQueues-1
	Segments  int    // split each data buffer into this many descriptors (default 1)

	Direct   bool     // never use an indirect table (default: indirect whenever negotiated, like Linux)
	RawLUN   *[8]byte // LUN bytes as given instead of LUNBytes(Target, LUN)
	Tag      uint64   // 0: a fresh tag
	TaskAttr uint8    // 0 SIMPLE
	DataGPA  uint64   // place the data buffer here instead of the scratch arena (may straddle regions)
	ReqLen   int      // request descriptor length (default ReqSize)
	RespLen  int      // response descriptor length (default RespSize)
}

// Response is what the device wrote back.
type Response struct {
	Response        byte // virtio-scsi response (0 OK, 3 BAD_TARGET, 12 INCORRECT_LUN...); 0xff: not written
	Status          byte
	StatusQualifier uint16
	SenseLen        uint32 // as reported (may exceed 96)
	Sense           []byte // min(SenseLen, 96) bytes
	Resid           uint32
	DataIn          []byte // the whole DataInLen buffer; the device filled DataInLen-Resid bytes
	UsedLen         uint32 // length in the used element
	Tag             uint64
}

// salloc takes n bytes from the queue's scratch arena.
func (q *Queue) salloc(n, align uint64) (uint64, error) {
	p := (q.scratchCur + align - 1) &^ (align - 1)
	if p+n > q.scratchLen {
		return 0, fmt.Errorf("frontend: vring %d: %d bytes do not fit the %d-byte scratch arena (Options.ScratchSize)",
			q.index, n, q.scratchLen)
	}
	q.scratchCur = p + n
	return q.scratchGPA + p, nil
}

// segments appends k descriptors covering [gpa, gpa+n).
func segments(descs []Desc, gpa uint64, n, k int, flags uint16) []Desc {
	if k < 1 {
		k = 1
	}
	if k > n {
		k = n
	}
	for i := 0; i < k; i++ {
		lo, hi := n*i/k, n*(i+1)/k
		descs = append(descs, Desc{Addr: gpa + uint64(lo), Len: uint32(hi - lo), Flags: flags})
	}
	return descs
}

// submitOne builds a chain from descs (indirect when negotiated unless
// direct), kicks and waits for its completion; the caller holds q.mu.
func (q *Queue) submitOne(descs []Desc, direct bool, what string) (uint32, error) {
	if !q.started {
		return 0, fmt.Errorf("frontend: vring %d not started", q.index)
	}
	var ok bool
	if q.indirect && !direct {
		tgpa, err := q.salloc(uint64(len(descs)*descSize), 16)
		if err != nil {
			return 0, err
		}
		_, ok = q.addIndirect(tgpa, q.d.mem.slice(tgpa, len(descs)*descSize), descs, headDo, nil, 0)
	} else {
		_, ok = q.addChain(descs, headDo, nil, 0)
	}
	if !ok {
		return 0, fmt.Errorf("frontend: vring %d: no free descriptors for %d-descriptor %s", q.index, len(descs), what)
	}
	q.doDone = false
	q.Kick()
	deadline := time.Now().Add(q.d.o.Timeout)
	if q.d.o.InterruptDriven && q.callFD >= 0 {
		for {
			if !q.waitCallUntil(deadline) {
				q.abandon()
				return 0, fmt.Errorf("%s on vring %d: no interrupt: %w", what, q.index, ErrTimeout)
			}
			q.poll(nil)
			if q.doDone {
				return q.doLen, nil
			}
			if q.violation != nil {
				return 0, q.violation
			}
		}
	}
	for spins := 0; ; spins++ {
		q.poll(nil)
		if q.doDone {
			return q.doLen, nil
		}
		if q.violation != nil {
			return 0, q.violation
		}
		if spins > 200 {
			if time.Now().After(deadline) {
				q.abandon()
				return 0, fmt.Errorf("%s on vring %d: %w", what, q.index, ErrTimeout)
			}
			q.waitCall(time.Millisecond)
		}
	}
}

// abandon turns the outstanding Do chain into one that is freed silently if
// it ever completes; its scratch memory stays reserved until then.
func (q *Queue) abandon() {
	for i := range q.heads {
		if q.heads[i].kind == headDo {
			q.heads[i].kind = headAbandoned
			q.abandoned++
		}
	}
}

// beginScratch resets the scratch arena unless a timed-out chain may still
// be written by the device.
func (q *Queue) beginScratch() {
	q.poll(nil)
	if q.abandoned == 0 {
		q.scratchCur = 0
	}
}

// UnitAttention is a unit attention condition the device reported to Do
// while Options.RetryUnitAttention was set.
type UnitAttention struct {
	Target    uint8
	LUN       uint16
	ASC, ASCQ byte
}

// unitAttentionRetries bounds the resubmissions of one command: a device
// keeps at most a few conditions per LUN (Linux retries up to 5 times).
const unitAttentionRetries = 8

// SenseCode returns the sense key, ASC and ASCQ of fixed (0x70, 0x71) or
// descriptor (0x72, 0x73) format sense data; zeroes when there is none.
func (r *Response) SenseCode() (key, asc, ascq byte) {
	s := r.Sense
	switch {
	case len(s) >= 14 && s[0]&0x7e == 0x70:
		return s[2] & 0x0f, s[12], s[13]
	case len(s) >= 4 && s[0]&0x7e == 0x72:
		return s[1] & 0x0f, s[2], s[3]
	}
	return 0, 0, 0
}

// IsUnitAttention reports whether r is CHECK CONDITION with sense key UNIT
// ATTENTION.
func (r *Response) IsUnitAttention() bool {
	key, _, _ := r.SenseCode()
	return r.Response == 0 && r.Status == 0x02 && key == 0x06
}

// UnitAttentions returns the unit attentions Do absorbed (with
// Options.RetryUnitAttention) since the last call, oldest first.
func (d *Device) UnitAttentions() []UnitAttention {
	d.uaMu.Lock()
	defer d.uaMu.Unlock()
	u := d.uas
	d.uas = nil
	return u
}

// Do submits one command and waits for its completion: it busy-polls the
// used ring and, between polls, sleeps on the call eventfd (draining it).
// With Options.RetryUnitAttention a CHECK CONDITION / UNIT ATTENTION answer
// is recorded (UnitAttentions) and the command sent again, as Linux's SCSI
// midlayer retries a command a non-removable disk answered so; otherwise
// the caller sees it.
func (d *Device) Do(c Command) (*Response, error) {
	for i := 0; ; i++ {
		r, err := d.do(c)
		if err != nil || !d.o.RetryUnitAttention || !r.IsUnitAttention() || i == unitAttentionRetries {
			return r, err
		}
		_, asc, ascq := r.SenseCode()
		d.uaMu.Lock()
		d.uas = append(d.uas, UnitAttention{Target: c.Target, LUN: c.LUN, ASC: asc, ASCQ: ascq})
		d.uaMu.Unlock()
		c.Tag = 0
	}
}

func (d *Device) do(c Command) (*Response, error) {
	if c.Queue < 0 || c.Queue >= d.o.NumQueues {
		return nil, fmt.Errorf("frontend: request queue %d of %d", c.Queue, d.o.NumQueues)
	}
	if len(c.CDB) > CDBSize || c.DataInLen < 0 {
		return nil, fmt.Errorf("frontend: cdb of %d bytes, data-in %d", len(c.CDB), c.DataInLen)
	}
	q := d.Queue(c.Queue)
	q.mu.Lock()
	defer q.mu.Unlock()
	q.beginScratch()

	reqLen, respLen := c.ReqLen, c.RespLen
	if reqLen == 0 {
		reqLen = ReqSize
	}
	if respLen == 0 {
		respLen = RespSize
	}
	reqGPA, err := q.salloc(uint64(max(reqLen, ReqSize)), 16)
	if err != nil {
		return nil, err
	}
	respGPA, err := q.salloc(uint64(max(respLen, RespSize)), 16)
	if err != nil {
		return nil, err
	}
	req := d.mem.slice(reqGPA, max(reqLen, ReqSize))
	clear(req)
	l := LUNBytes(c.Target, c.LUN)
	if c.RawLUN != nil {
		l = *c.RawLUN
	}
	copy(req, l[:])
	tag := c.Tag
	if tag == 0 {
		tag = d.nextTag()
	}
	binary.LittleEndian.PutUint64(req[8:], tag)
	req[16] = c.TaskAttr
	copy(req[19:], c.CDB)
	resp := d.mem.slice(respGPA, max(respLen, RespSize))
	clear(resp)
	resp[11] = 0xff

	var outGPA, inGPA uint64
	if n := len(c.DataOut); n > 0 {
		if c.DataGPA != 0 {
			outGPA = c.DataGPA
		} else if outGPA, err = q.salloc(uint64(n), 4096); err != nil {
			return nil, err
		}
		if err := d.mem.copyIn(outGPA, c.DataOut); err != nil {
			return nil, err
		}
	}
	if c.DataInLen > 0 {
		if c.DataGPA != 0 && len(c.DataOut) == 0 {
			inGPA = c.DataGPA
		} else if inGPA, err = q.salloc(uint64(c.DataInLen), 4096); err != nil {
			return nil, err
		}
		// Poison so a short transfer is visible to the caller.
		poison := make([]byte, c.DataInLen)
		for i := range poison {
			poison[i] = 0xa5
		}
		if err := d.mem.copyIn(inGPA, poison); err != nil {
			return nil, err
		}
	}

	descs := make([]Desc, 0, 2+2*max(c.Segments, 1))
	descs = append(descs, Desc{Addr: reqGPA, Len: uint32(reqLen)})
	if len(c.DataOut) > 0 {
		descs = segments(descs, outGPA, len(c.DataOut), c.Segments, 0)
	}
	descs = append(descs, Desc{Addr: respGPA, Len: uint32(respLen), Flags: DescFWrite})
	if c.DataInLen > 0 {
		descs = segments(descs, inGPA, c.DataInLen, c.Segments, DescFWrite)
	}
	used, err := q.submitOne(descs, c.Direct, fmt.Sprintf("CDB %x", c.CDB))
	if err != nil {
		return nil, err
	}
	r := &Response{
		SenseLen:        le32(resp[0:]),
		Resid:           le32(resp[4:]),
		StatusQualifier: binary.LittleEndian.Uint16(resp[8:]),
		Status:          resp[10],
		Response:        resp[11],
		UsedLen:         used,
		Tag:             tag,
	}
	r.Sense = append([]byte(nil), resp[12:12+min(r.SenseLen, SenseSize)]...)
	if c.DataInLen > 0 {
		r.DataIn = make([]byte, c.DataInLen)
		if err := d.mem.copyOut(inGPA, r.DataIn); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// Control sends one raw control-queue request (req device-readable, then a
// respLen device-writable buffer) and returns the response bytes and used
// length. TMF and AN are built on it; hostile tests can send anything.
func (d *Device) Control(req []byte, respLen int) ([]byte, uint32, error) {
	if !d.hasEventQueue() {
		return nil, 0, fmt.Errorf("frontend: a vhost-user-blk device has no control queue")
	}
	q := d.vrings[ControlVring]
	q.mu.Lock()
	defer q.mu.Unlock()
	q.beginScratch()
	reqGPA, err := q.salloc(uint64(max(len(req), 1)), 16)
	if err != nil {
		return nil, 0, err
	}
	respGPA, err := q.salloc(uint64(max(respLen, 1)), 16)
	if err != nil {
		return nil, 0, err
	}
	copy(d.mem.slice(reqGPA, len(req)), req)
	resp := d.mem.slice(respGPA, respLen)
	for i := range resp {
		resp[i] = 0xff
	}
	descs := []Desc{{Addr: reqGPA, Len: uint32(len(req))}, {Addr: respGPA, Len: uint32(respLen), Flags: DescFWrite}}
	used, err := q.submitOne(descs, false, "control request")
	if err != nil {
		return nil, 0, err
	}
	return append([]byte(nil), resp...), used, nil
}

// TMF types and subtypes (virtio 1.2 §5.6.6.2).
const (
	TMFAbortTask        = 0
	TMFAbortTaskSet     = 1
	TMFClearACA         = 2
	TMFClearTaskSet     = 3
	TMFITNexusReset     = 4
	TMFLogicalUnitReset = 5
	TMFQueryTask        = 6
	TMFQueryTaskSet     = 7

	ctrlTMF     = 0
	ctrlANQuery = 1
	ctrlANSub   = 2
)

// TMF sends a task management function on the control queue and returns
// the response byte.
func (d *Device) TMF(target uint8, lun uint16, subtype uint32, tag uint64) (byte, error) {
	req := make([]byte, TMFReqSize)
	binary.LittleEndian.PutUint32(req[0:], ctrlTMF)
	binary.LittleEndian.PutUint32(req[4:], subtype)
	l := LUNBytes(target, lun)
	copy(req[8:], l[:])
	binary.LittleEndian.PutUint64(req[16:], tag)
	resp, _, err := d.Control(req, 1)
	if err != nil {
		return 0, err
	}
	return resp[0], nil
}

// AN sends an asynchronous-notification query (subscribe=false) or
// subscription and returns event_actual and the response byte.
func (d *Device) AN(subscribe bool, target uint8, lun uint16, events uint32) (uint32, byte, error) {
	req := make([]byte, ANReqSize)
	typ := uint32(ctrlANQuery)
	if subscribe {
		typ = ctrlANSub
	}
	binary.LittleEndian.PutUint32(req[0:], typ)
	l := LUNBytes(target, lun)
	copy(req[4:], l[:])
	binary.LittleEndian.PutUint32(req[12:], events)
	resp, _, err := d.Control(req, ANRespSize)
	if err != nil {
		return 0, 0, err
	}
	return le32(resp), resp[4], nil
}

// Event is one completed event-queue buffer (struct virtio_scsi_event).
type Event struct {
	Event   uint32 // 1 TRANSPORT_RESET, 2 ASYNC_NOTIFY, 3 PARAM_CHANGE; bit 31 EVENTS_MISSED
	LUN     [8]byte
	Target  uint8  // LUN[1]
	Lun     uint16 // (LUN[2]<<8 | LUN[3]) & 0x3fff
	Reason  uint32
	UsedLen uint32
}

// PostEvents makes every idle event buffer available to the device.
func (d *Device) PostEvents() error {
	if !d.hasEventQueue() {
		return fmt.Errorf("frontend: a vhost-user-blk device has no event queue")
	}
	q := d.vrings[EventVring]
	if !q.started {
		return fmt.Errorf("frontend: event queue not started")
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	busy := make([]bool, d.o.EventBuffers)
	for _, h := range q.heads {
		if h.kind == headEvent {
			busy[h.aux] = true
		}
	}
	for i := range busy {
		if !busy[i] {
			q.postEvent(i)
		}
	}
	q.Kick()
	return nil
}

func (q *Queue) postEvent(i int) {
	gpa := q.d.eventGPA + uint64(i*EventSize)
	clear(q.d.mem.slice(gpa, EventSize))
	if _, ok := q.addChain([]Desc{{Addr: gpa, Len: EventSize, Flags: DescFWrite}}, headEvent, nil, i); !ok {
		q.violate("no descriptor to repost event buffer %d", i)
	}
}

// WaitEvents collects events (Events) until at least n have arrived, or
// until timeout has passed: it then returns those that came and an error
// wrapping ErrTimeout. n 0 returns at once with what is there.
func (d *Device) WaitEvents(n int, timeout time.Duration) ([]Event, error) {
	if !d.hasEventQueue() {
		return nil, fmt.Errorf("frontend: a vhost-user-blk device has no event queue")
	}
	deadline := time.Now().Add(timeout)
	var evs []Event
	for {
		evs = append(evs, d.Events()...)
		if len(evs) >= n {
			return evs, nil
		}
		if time.Now().After(deadline) {
			return evs, fmt.Errorf("frontend: %d of %d events after %v: %w", len(evs), n, timeout, ErrTimeout)
		}
		d.vrings[EventVring].WaitCallFD(time.Millisecond)
	}
}

// Events returns the events the device has completed since the last call
// and reposts their buffers.
func (d *Device) Events() []Event {
	if !d.hasEventQueue() {
		return nil
	}
	q := d.vrings[EventVring]
	if !q.started {
		return nil
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	q.poll(nil)
	var evs []Event
	for k, i := range q.evDone {
		b := d.mem.slice(d.eventGPA+uint64(i*EventSize), EventSize)
		e := Event{Event: le32(b), Reason: le32(b[12:]), UsedLen: q.evLen[k]}
		copy(e.LUN[:], b[4:12])
		e.Target = e.LUN[1]
		e.Lun = (uint16(e.LUN[2])<<8 | uint16(e.LUN[3])) & 0x3fff
		evs = append(evs, e)
		q.postEvent(i)
	}
	q.evDone, q.evLen = q.evDone[:0], q.evLen[:0]
	q.Kick()
	q.DrainCall()
	return evs
}

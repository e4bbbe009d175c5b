package frontend

import (
	"encoding/binary"
	"fmt"
)

// virtio-scsi structure sizes with cdb_size 32 and sense_size 96 (virtio
// 1.2 §5.6.6; QEMU's defaults, notes B.3/B.4).
const (
	CDBSize      = 32
	SenseSize    = 96
	ReqSize      = 19 + CDBSize    // lun[8] tag(8) task_attr prio crn cdb[32]
	RespSize     = 12 + SenseSize  // sense_len resid status_qualifier status response sense[96]
	TMFReqSize   = 24              // type subtype lun[8] tag
	ANReqSize    = 16              // type lun[8] event_requested
	ANRespSize   = 5               // event_actual response
	EventSize    = 16              // event lun[8] reason
	EventsMissed = uint32(1) << 31 // VIRTIO_SCSI_T_EVENTS_MISSED
)

// Dir is a request's data direction, seen from the guest.
type Dir uint8

const (
	DirNone Dir = iota
	DirIn       // data-in: the device writes Data (reads)
	DirOut      // data-out: the device reads Data (writes)
)

// LUNBytes encodes a virtio-scsi LUN the way Linux and SeaBIOS do:
// 01 target 40|lun>>8 lun&0xff 00 00 00 00 (single level, flat space).
func LUNBytes(target uint8, lun uint16) [8]byte {
	return [8]byte{1, target, 0x40 | byte(lun>>8&0x3f), byte(lun)}
}

// Slot is one preallocated request of the async path: its request header,
// response, indirect table and data buffer live in guest memory for the
// lifetime of the Device, so submitting and reaping allocate nothing.
type Slot struct {
	ID      int    // index within the queue's slots
	Data    []byte // guest data buffer (host view)
	DataGPA uint64 // guest physical address of Data
	Tag     uint64 // request tag written by Prepare
	User    uint64 // free for the caller (e.g. submit time)

	q                       *Queue
	reqGPA, respGPA, indGPA uint64
	req, resp, ind          []byte
	dir                     Dir
	n                       int
	blk                     bool // PrepareBlk: header, data, one status byte
	usedLen                 uint32
	busy                    bool
}

// Response returns the virtio-scsi response byte (0 OK, 3 BAD_TARGET...);
// 0xff means the device did not write it.
func (s *Slot) Response() byte { return s.resp[11] }

// Status returns the SCSI status byte.
func (s *Slot) Status() byte { return s.resp[10] }

// Resid returns the residual byte count.
func (s *Slot) Resid() uint32 { return binary.LittleEndian.Uint32(s.resp[4:]) }

// Sense returns the sense bytes the device reported (a view of guest memory,
// valid until the slot is reused).
func (s *Slot) Sense() []byte {
	n := binary.LittleEndian.Uint32(s.resp[0:])
	if n > SenseSize {
		n = SenseSize
	}
	return s.resp[12 : 12+n]
}

// UsedLen returns the length the device put in the used element.
func (s *Slot) UsedLen() uint32 { return s.usedLen }

// Dir and Len return what Prepare was given.
func (s *Slot) Dir() Dir { return s.dir }
func (s *Slot) Len() int { return s.n }

// Free returns how many slots can be submitted now: limited by the slot pool
// and, without INDIRECT, by free descriptors (3 per request).
func (q *Queue) Free() int {
	n := len(q.pool)
	need := 3
	if q.indirect {
		need = 1
	}
	if f := len(q.free) / need; f < n {
		n = f
	}
	return n
}

// Slots returns the number of slots the queue owns.
func (q *Queue) Slots() int { return len(q.slots) }

// Get takes a slot from the pool, or nil when none is free.
func (q *Queue) Get() *Slot {
	n := len(q.pool)
	if n == 0 {
		return nil
	}
	s := q.pool[n-1]
	q.pool = q.pool[:n-1]
	return s
}

// Put returns a slot that is not in flight to the pool.
func (q *Queue) Put(s *Slot) {
	if s.busy {
		panic("frontend: Put of a slot still in flight")
	}
	q.pool = append(q.pool, s)
}

// Prepare writes the request header for a command of n data bytes in
// direction dir, and marks the response unwritten (response byte 0xff).
func (q *Queue) Prepare(s *Slot, target uint8, lun uint16, cdb []byte, dir Dir, n int) {
	if len(cdb) > CDBSize || n < 0 || n > len(s.Data) {
		panic(fmt.Sprintf("frontend: Prepare: cdb %d bytes, %d data bytes (buffer %d)", len(cdb), n, len(s.Data)))
	}
	l := LUNBytes(target, lun)
	copy(s.req[0:8], l[:])
	s.Tag = q.d.tag.Add(1)
	binary.LittleEndian.PutUint64(s.req[8:], s.Tag)
	s.req[16], s.req[17], s.req[18] = 0, 0, 0 // SIMPLE, prio, crn
	c := s.req[19 : 19+CDBSize]
	clear(c[copy(c, cdb):])
	clear(s.resp[:12])
	s.resp[11] = 0xff
	s.dir, s.n, s.blk = dir, n, false
}

// Submit adds the prepared slot (Prepare: request, data-out, response,
// data-in; PrepareBlk: header, data, status) to the avail ring; the device
// sees it after Kick. It panics when no descriptors are free (check Free first).
func (q *Queue) Submit(s *Slot) {
	descs := q.descBuf[:0]
	if s.blk {
		descs = append(descs, Desc{Addr: s.reqGPA, Len: BlkHeaderSize})
		switch {
		case s.n == 0:
		case s.dir == DirIn:
			descs = append(descs, Desc{Addr: s.DataGPA, Len: uint32(s.n), Flags: DescFWrite})
		case s.dir == DirOut:
			descs = append(descs, Desc{Addr: s.DataGPA, Len: uint32(s.n)})
		}
		descs = append(descs, Desc{Addr: s.respGPA, Len: 1, Flags: DescFWrite})
		q.submitSlot(s, descs)
		return
	}
	descs = append(descs, Desc{Addr: s.reqGPA, Len: ReqSize})
	if s.dir == DirOut && s.n > 0 {
		descs = append(descs, Desc{Addr: s.DataGPA, Len: uint32(s.n)})
	}
	descs = append(descs, Desc{Addr: s.respGPA, Len: RespSize, Flags: DescFWrite})
	if s.dir == DirIn && s.n > 0 {
		descs = append(descs, Desc{Addr: s.DataGPA, Len: uint32(s.n), Flags: DescFWrite})
	}
	q.submitSlot(s, descs)
}

func (q *Queue) submitSlot(s *Slot, descs []Desc) {
	var ok bool
	if q.indirect {
		_, ok = q.addIndirect(s.indGPA, s.ind, descs, headSlot, s, 0)
	} else {
		_, ok = q.addChain(descs, headSlot, s, 0)
	}
	if !ok {
		panic("frontend: Submit with no free descriptors")
	}
	s.busy = true
	s.usedLen = 0
}

// Reap consumes the used ring once and calls fn for every completed slot
// (including completions a concurrent Do saw first); it returns how many.
func (q *Queue) Reap(fn func(*Slot)) int {
	n := 0
	if len(q.pending) > 0 {
		for _, s := range q.pending {
			fn(s)
		}
		n = len(q.pending)
		q.pending = q.pending[:0]
	}
	return n + q.poll(fn)
}

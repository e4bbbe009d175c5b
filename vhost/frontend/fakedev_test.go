package frontend

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// fakeRing is a minimal device side of a split ring, written for these tests
// only: it pops chains (following NEXT and INDIRECT), hands the readable and
// writable buffers to handle, and publishes used elements.
type fakeRing struct {
	vring    int
	size     uint16
	mem      func(gpa uint64, n int) []byte // guest-physical view inside one region
	next     func(gpa uint64) uint64        // end of the region holding gpa (for buffers that straddle)
	desc     []byte
	avail    []byte
	used     []byte
	eventIdx bool
	noNotify bool // keep VIRTQ_USED_F_NO_NOTIFY set
	call     atomic.Int32
	calls    int
	handle   func(vring int, rd, wr [][]byte) uint32
	blk      bool // vhost-user-blk: every vring is a request queue (no event queue)

	lastAvail, usedIdx uint16
	err                error
	events             [][]byte // event-queue payloads waiting for a buffer
}

func (r *fakeRing) word(b []byte, off int) *uint32 { return (*uint32)(unsafe.Pointer(&b[off])) }

func (r *fakeRing) availIdx() uint16 { return uint16(atomic.LoadUint32(r.word(r.avail, 0)) >> 16) }
func (r *fakeRing) availFlags() uint16 {
	return uint16(atomic.LoadUint32(r.word(r.avail, 0)))
}

// process handles every available chain (on the event queue: one chain per
// queued event); it returns how many.
func (r *fakeRing) process() int {
	if r.err != nil {
		return 0
	}
	total := 0
	for {
		n := 0
		for ai := r.availIdx(); r.lastAvail != ai; {
			if r.vring == EventVring && !r.blk && len(r.events) == 0 {
				break
			}
			head := binary.LittleEndian.Uint16(r.avail[4+2*int(r.lastAvail%r.size):])
			r.lastAvail++
			rd, wr, err := r.walk(head)
			var ln uint32
			switch {
			case err != nil:
				r.err = err
			case r.vring == EventVring && !r.blk:
				ln = uint32(scatter(wr, 0, r.events[0]))
				r.events = r.events[1:]
			default:
				ln = r.handle(r.vring, rd, wr)
			}
			e := r.used[4+8*int(r.usedIdx%r.size):]
			binary.LittleEndian.PutUint32(e, uint32(head))
			binary.LittleEndian.PutUint32(e[4:], ln)
			r.usedIdx++
			n++
		}
		if n == 0 {
			return total
		}
		total += n
		flags := uint32(0)
		if r.noNotify {
			flags = UsedFNoNotify
		}
		old := r.usedIdx - uint16(n)
		atomic.StoreUint32(r.word(r.used, 0), flags|uint32(r.usedIdx)<<16)
		if r.eventIdx {
			atomic.StoreUint32(r.word(r.used, 4+8*int(r.size)), uint32(r.lastAvail))
		}
		r.signal(old)
	}
}

func (r *fakeRing) signal(old uint16) {
	var want bool
	if r.eventIdx {
		ue := uint16(atomic.LoadUint32(r.word(r.avail, 4+2*int(r.size))))
		want = needEvent(ue, r.usedIdx, old)
	} else {
		want = r.availFlags()&AvailFNoInterrupt == 0
	}
	if !want {
		return
	}
	r.calls++
	if fd := r.call.Load(); fd > 0 {
		var b [8]byte
		b[0] = 1
		unix.Write(int(fd), b[:])
	}
}

func (r *fakeRing) walk(head uint16) (rd, wr [][]byte, err error) {
	table := r.desc
	tsize := int(r.size)
	i := int(head)
	indirect := false
	for ttl := tsize; ; ttl-- {
		if ttl == 0 {
			return nil, nil, fmt.Errorf("chain loop")
		}
		if i >= tsize {
			return nil, nil, fmt.Errorf("desc index %d >= %d", i, tsize)
		}
		d := table[16*i:]
		addr := binary.LittleEndian.Uint64(d)
		ln := binary.LittleEndian.Uint32(d[8:])
		flags := binary.LittleEndian.Uint16(d[12:])
		next := binary.LittleEndian.Uint16(d[14:])
		if flags&DescFIndirect != 0 {
			if indirect || ln%16 != 0 || ln == 0 {
				return nil, nil, fmt.Errorf("bad indirect")
			}
			table = r.mem(addr, int(ln))
			if table == nil {
				return nil, nil, fmt.Errorf("indirect table %#x+%d outside memory", addr, ln)
			}
			tsize, i, ttl, indirect = int(ln/16), 0, int(ln/16)+1, true
			continue
		}
		if flags&DescFWrite == 0 && len(wr) > 0 {
			return nil, nil, fmt.Errorf("readable after writable")
		}
		for a, left := addr, uint64(ln); left > 0; {
			n := left
			if r.next != nil {
				n = min(n, r.next(a)-a)
			}
			b := r.mem(a, int(n))
			if b == nil {
				return nil, nil, fmt.Errorf("buffer %#x+%d outside memory", addr, ln)
			}
			if flags&DescFWrite != 0 {
				wr = append(wr, b)
			} else {
				rd = append(rd, b)
			}
			a, left = a+n, left-n
		}
		if flags&DescFNext == 0 {
			return rd, wr, nil
		}
		i = int(next)
	}
}

// flatten concatenates buffers.
func flatten(bufs [][]byte) []byte {
	var out []byte
	for _, b := range bufs {
		out = append(out, b...)
	}
	return out
}

// scatter writes src across bufs starting at byte off; it returns bytes written.
func scatter(bufs [][]byte, off int, src []byte) int {
	n := 0
	for _, b := range bufs {
		if off >= len(b) {
			off -= len(b)
			continue
		}
		c := copy(b[off:], src[n:])
		n += c
		off = 0
		if n == len(src) {
			break
		}
	}
	return n
}

// fakeSCSI is the handler used by the tests: a deterministic device whose
// answers are functions of the request so each field can be asserted.
//
//   - request queues: status = cdb[1], response = cdb[2], data-in byte i =
//     byte(i) ^ cdb[3], resid = cdb[4], sense = data-out echoed (sense_len =
//     len(data-out)); used len = 108 + data-in written.
//   - control queue: response byte = 0x80 | subtype, used len 1.
//   - event queue: completes a buffer only for a queued event (fakeRing.events).
func fakeSCSI(vring int, rd, wr [][]byte) uint32 {
	in := flatten(rd)
	switch vring {
	case ControlVring:
		if len(in) < 8 || len(wr) == 0 {
			return 0
		}
		wr[0][0] = 0x80 | byte(binary.LittleEndian.Uint32(in[4:]))
		return 1
	case EventVring:
		return 0
	}
	if len(in) < ReqSize {
		return 0
	}
	cdb := in[19 : 19+CDBSize]
	dataOut := in[ReqSize:]
	var resp [RespSize]byte
	binary.LittleEndian.PutUint32(resp[0:], uint32(len(dataOut)))
	resid := uint32(cdb[4])
	binary.LittleEndian.PutUint32(resp[4:], resid)
	resp[10], resp[11] = cdb[1], cdb[2]
	copy(resp[12:], dataOut)
	if scatter(wr, 0, resp[:]) < RespSize {
		return 0
	}
	total := 0
	for _, b := range wr {
		total += len(b)
	}
	dataIn := make([]byte, max(total-RespSize-int(resid), 0))
	for i := range dataIn {
		dataIn[i] = byte(i) ^ cdb[3]
	}
	return uint32(RespSize + scatter(wr, RespSize, dataIn))
}

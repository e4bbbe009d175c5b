package virtq

import (
	"encoding/binary"
	"errors"
	"math"

	"vhost-target/vhost/guestmem"
)

// Chain is one descriptor chain resolved to host memory. It is large (MaxSegments slices) and meant to live in
// a preallocated request; Pop overwrites it.
type Chain struct {
	Head              uint16
	Segs              [MaxSegments][]byte // device-readable segments first, then device-writable ones
	NRead, NWrite     int                 // Segs[:NRead] readable, Segs[NRead:NRead+NWrite] writable
	ReadLen, WriteLen uint32              // bytes in each part; their sum fits in 32 bits
	// NDesc counts descriptors read: ring table entries (the indirect pointer included) plus indirect entries.
	NDesc uint16
}

// Readable returns the device-readable segments (the driver's request).
func (c *Chain) Readable() [][]byte { return c.Segs[:c.NRead] }

// Writable returns the device-writable segments (where the response goes).
func (c *Chain) Writable() [][]byte { return c.Segs[c.NRead : c.NRead+c.NWrite] }

// desc is one decoded descriptor.
type desc struct {
	addr  uint64
	len   uint32
	flags uint16
	next  uint16
}

// readDesc copies descriptor i of table out of guest memory, then decodes it: each field is read exactly once,
// so the driver cannot change it between our check and our use. i < len(table)/16 is the caller's check.
func readDesc(table []byte, i uint32) desc {
	var raw [descBytes]byte
	copy(raw[:], table[i*descBytes:])
	return desc{
		addr:  binary.LittleEndian.Uint64(raw[0:]),
		len:   binary.LittleEndian.Uint32(raw[8:]),
		flags: binary.LittleEndian.Uint16(raw[12:]),
		next:  binary.LittleEndian.Uint16(raw[14:]),
	}
}

// walk resolves the chain starting at head (< size) into c. The walk is bounded by construction: at most
// size descriptors from the ring table, then (after one indirect pointer) at most the indirect table's entry
// count; both tables are bounds-checked slices, so a hostile chain ends in an error, never a hang or a fault.
func (q *Queue) walk(c *Chain, head uint16) error {
	c.Head, c.NRead, c.NWrite, c.ReadLen, c.WriteLen, c.NDesc = head, 0, 0, 0, 0, 0
	table, n := q.desc, uint32(q.size)
	idx, ttl := uint32(head), n
	inIndirect, writing := false, false
	var total uint64 // ReadLen+WriteLen, checked against 2^32-1 (virtio 1.2 §2.7.5.2)
	nseg := 0
	fail := func(d desc, err, cause error) error {
		return &ChainError{Head: head, Desc: uint16(idx), Indirect: inIndirect, Addr: d.addr, Len: d.len,
			Err: err, Cause: cause}
	}
	for {
		if idx >= n {
			return fail(desc{}, ErrDescIndex, nil)
		}
		if ttl == 0 {
			return fail(desc{}, ErrChainLoop, nil)
		}
		ttl--
		d := readDesc(table, idx)
		c.NDesc++
		if d.flags&descFIndirect != 0 {
			// virtio 1.2 §2.7.5.3: zero or more normal descriptors may precede one indirect descriptor, which
			// ends the ring part of the chain; the device ignores its WRITE flag.
			switch {
			case !q.indirect:
				return fail(d, ErrIndirectNotNegotiated, nil)
			case inIndirect:
				return fail(d, ErrNestedIndirect, nil)
			case d.flags&descFNext != 0:
				return fail(d, ErrIndirectNext, nil)
			case d.len == 0 || d.len%descBytes != 0 || d.len/descBytes > MaxSize:
				return fail(d, ErrIndirectLen, nil)
			}
			t, err := q.mem.GPA(d.addr, uint64(d.len))
			if err != nil {
				return fail(d, ErrIndirectUnmapped, err)
			}
			table, n = t, d.len/descBytes // ≤ MaxSize entries
			idx, ttl, inIndirect = 0, n, true
			continue
		}
		if d.len == 0 {
			return fail(d, ErrZeroLength, nil)
		}
		if d.flags&descFWrite != 0 {
			writing = true
		} else if writing {
			return fail(d, ErrReadAfterWrite, nil)
		}
		if total += uint64(d.len); total > math.MaxUint32 {
			return fail(d, ErrChainBytes, nil)
		}
		if nseg == MaxSegments {
			return fail(d, ErrTooManySegments, nil)
		}
		segs, err := q.mem.AppendGPA(c.Segs[:nseg], d.addr, d.len, MaxSegments-nseg)
		if err != nil {
			if errors.Is(err, guestmem.ErrTooManySegments) {
				return fail(d, ErrTooManySegments, err)
			}
			return fail(d, ErrBufferUnmapped, err)
		}
		added := len(segs) - nseg
		nseg = len(segs)
		if writing {
			c.NWrite += added
			c.WriteLen += d.len
		} else {
			c.NRead += added
			c.ReadLen += d.len
		}
		if d.flags&descFNext == 0 {
			return nil
		}
		idx = uint32(d.next)
	}
}

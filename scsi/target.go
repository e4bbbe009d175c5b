package scsi

import (
	"encoding/binary"
	"fmt"
	"slices"
)

const (
	// MaxLUNID is the largest LUN number: flat-space addressing has 14 bits.
	MaxLUNID = 0x3FFF
	// MaxLUNs bounds the LUNs of one target, so that a full REPORT LUNS
	// response (8-byte header, 8 bytes per LUN) fits in ScratchSize.
	MaxLUNs = (ScratchSize - 8) / 8
)

// Target groups the LUNs a virtio-scsi target id addresses. It is immutable
// after NewTarget; a LUN added or removed means a new Target.
type Target struct {
	id   uint8
	luns []*LUN // sorted by id
}

// NewTarget groups LUNs under a target id (0..255). LUN ids must be unique
// and at most MaxLUNID; at most MaxLUNs LUNs.
func NewTarget(id uint8, luns []*LUN) (*Target, error) {
	if len(luns) > MaxLUNs {
		return nil, fmt.Errorf("scsi: target %d: %d LUNs, at most %d", id, len(luns), MaxLUNs)
	}
	sorted := make([]*LUN, 0, len(luns))
	for i, l := range luns {
		if l == nil {
			return nil, fmt.Errorf("scsi: target %d: LUN %d of the list is nil", id, i)
		}
		if l.id > MaxLUNID {
			return nil, fmt.Errorf("scsi: target %d: LUN id %d above %d", id, l.id, MaxLUNID)
		}
		sorted = append(sorted, l)
	}
	slices.SortFunc(sorted, func(a, b *LUN) int { return int(a.id) - int(b.id) })
	for i := 1; i < len(sorted); i++ {
		if sorted[i].id == sorted[i-1].id {
			return nil, fmt.Errorf("scsi: target %d: duplicate LUN id %d", id, sorted[i].id)
		}
	}
	return &Target{id: id, luns: sorted}, nil
}

// ID returns the target id.
func (t *Target) ID() uint8 { return t.id }

// LUNs returns the target's LUNs sorted by id. The caller must not modify
// the slice.
func (t *Target) LUNs() []*LUN { return t.luns }

// LUN returns the LUN with the given id, or nil. It does not allocate.
func (t *Target) LUN(id uint16) *LUN {
	lo, hi := 0, len(t.luns)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		switch l := t.luns[m]; {
		case l.id == id:
			return l
		case l.id < id:
			lo = m + 1
		default:
			hi = m
		}
	}
	return nil
}

// Execute runs c against LUN lunID of the target. For a LUN that is not
// present it answers as SPC-4 requires of an incorrect logical unit (as SPDK's
// null LUN does): INQUIRY reports peripheral qualifier 3 / device type 0x1F
// so that Linux knows there is no unit but still sends REPORT LUNS, REPORT
// LUNS lists the target's LUNs, REQUEST SENSE returns ILLEGAL REQUEST /
// LOGICAL UNIT NOT SUPPORTED as its parameter data, and anything else is
// CHECK CONDITION ILLEGAL REQUEST / LOGICAL UNIT NOT SUPPORTED.
func (t *Target) Execute(lunID uint16, c *Cmd) Action {
	if l := t.LUN(lunID); l != nil {
		c.target = t
		return l.execute(c)
	}
	c.begin()
	c.target = t
	wrongDir := c.DataLen > 0 && c.Dir != DirIn // all three answers are data-in
	switch c.CDB[0] {
	case opInquiry:
		if wrongDir {
			return c.invalidField()
		}
		if c.CDB[1]&0x03 != 0 { // no VPD pages: there is no unit to describe
			return c.illegalRequest(ascLUNNotSupported)
		}
		alloc := uint32(binary.BigEndian.Uint16(c.CDB[3:5]))
		return c.sendData(standardInquiry(c.Buf, peripheralAbsent), alloc)
	case opReportLUNs:
		if wrongDir {
			return c.invalidField()
		}
		return reportLUNs(c, t.luns)
	case opRequestSense:
		if wrongDir {
			return c.invalidField()
		}
		return requestSense(c, keyIllegalRequest, ascLUNNotSupported)
	}
	return c.illegalRequest(ascLUNNotSupported)
}

// runReportLUNs answers REPORT LUNS with the target's LUNs, or with this LUN
// alone when it is executed outside a target.
func runReportLUNs(l *LUN, c *Cmd) Action {
	if c.target != nil {
		return reportLUNs(c, c.target.luns)
	}
	return reportLUNs(c, l.self[:])
}

// reportLUNs implements REPORT LUNS (SPC-4 6.33). LUNs up to 255 use
// peripheral device addressing (00 nn), larger ones flat-space addressing
// (01b in bits 7-6 of byte 0), as QEMU and Linux expect.
func reportLUNs(c *Cmd, luns []*LUN) Action {
	cdb := &c.CDB
	alloc := binary.BigEndian.Uint32(cdb[6:10])
	if alloc < 16 { // SPC-4 6.33: allocation length below 16 is an invalid field
		return c.invalidField()
	}
	switch cdb[2] { // SELECT REPORT
	case 0x00, 0x02: // logical units; all (we have no well-known LUs)
	case 0x01: // well-known logical units only: none
		luns = nil
	default:
		return c.invalidField()
	}
	n := 8 + 8*len(luns) // <= ScratchSize: NewTarget caps len(luns)
	b := c.Buf[:n]
	clear(b)
	binary.BigEndian.PutUint32(b[0:4], uint32(8*len(luns))) // LUN LIST LENGTH
	for i, l := range luns {
		e := b[8+8*i:]
		if l.id > 0xFF {
			e[0] = 0x40 | byte(l.id>>8) // flat space addressing
		}
		e[1] = byte(l.id)
	}
	return c.sendData(n, alloc)
}

package scsi

import "encoding/binary"

// REPORT SUPPORTED OPERATION CODES reporting options (SPC-4 6.35).
const (
	rsocAll     = 0 // every command
	rsocOpcode  = 1 // one opcode without service actions
	rsocOpcodSA = 2 // one opcode and service action
	rsocAny     = 3 // one opcode, with a service action if it has them (SPC-5)
)

const (
	rsocTimeoutsLen = 12 // command timeouts descriptor
	rsocDescLen     = 8  // command descriptor of the all-commands list
)

// Values of the SUPPORT field of the one-command format.
const (
	supportNo       = 0x1 // not supported
	supportStandard = 0x3 // supported in conformance with a SCSI standard
)

// runReportSupportedOpcodes implements REPORT SUPPORTED OPERATION CODES. The
// answer is read from the dispatch table itself, filtered by the same
// l.supports that Execute uses, so it cannot disagree with what we execute.
func runReportSupportedOpcodes(l *LUN, c *Cmd) Action {
	cdb := &c.CDB
	rctd := cdb[2]&0x80 != 0 // return command timeouts descriptors
	option := cdb[2] & 0x07
	opcode := cdb[3]
	sa := binary.BigEndian.Uint16(cdb[4:6])
	alloc := binary.BigEndian.Uint32(cdb[6:10])
	switch option {
	case rsocAll:
		return c.sendData(l.allCommands(c.Buf, rctd), alloc)
	case rsocOpcode, rsocOpcodSA:
		e, known, hasSA := l.findCommand(opcode, sa)
		if known && hasSA != (option == rsocOpcodSA) {
			// SPC-4 6.35.2: option 1 names an opcode without service
			// actions, option 2 one with them. An opcode we do not support
			// is answered "not supported" under either option.
			return c.invalidField()
		}
		return c.sendData(oneCommand(c.Buf, e, rctd), alloc)
	case rsocAny:
		e, _, hasSA := l.findCommand(opcode, sa)
		if !hasSA && sa != 0 {
			e = nil // SPC-5 6.36.2: a service action for an opcode without them is not supported
		}
		return c.sendData(oneCommand(c.Buf, e, rctd), alloc)
	}
	return c.invalidField()
}

// findCommand returns the entry of opcode/sa that exists on this LUN (nil if
// none), whether the opcode exists on this LUN, and whether it is one with
// service actions.
func (l *LUN) findCommand(opcode byte, sa uint16) (e *command, known, hasSA bool) {
	i := int(commandIndex[opcode])
	if i == 0 || !l.supports(&commands[i-1]) {
		return nil, false, false
	}
	first := &commands[i-1]
	if first.flags&flagSA == 0 {
		return first, true, false
	}
	if sa <= saMask {
		if e, _ := l.lookup(opcode, byte(sa)); e != nil {
			return e, true, true
		}
	}
	return nil, true, true
}

// allCommands builds the all-commands parameter data (SPC-4 6.35.3) into b.
func (l *LUN) allCommands(b []byte, rctd bool) int {
	n := 4
	for i := range commands {
		e := &commands[i]
		if !l.supports(e) {
			continue
		}
		d := b[n : n+rsocDescLen]
		clear(d)
		d[0] = e.opcode
		if e.flags&flagSA != 0 {
			d[3] = e.sa
			d[5] |= 0x01 // SERVACTV
		}
		binary.BigEndian.PutUint16(d[6:8], uint16(len(e.usage))) // CDB LENGTH
		n += rsocDescLen
		if rctd {
			d[5] |= 0x02 // CTDP: a timeouts descriptor follows
			n += timeoutsDescriptor(b[n:])
		}
	}
	binary.BigEndian.PutUint32(b[0:4], uint32(n-4)) // COMMAND DATA LENGTH
	return n
}

// oneCommand builds the one-command parameter data (SPC-4 6.35.4) for e, or
// "not supported" when e is nil.
func oneCommand(b []byte, e *command, rctd bool) int {
	clear(b[:4])
	if e == nil {
		b[1] = supportNo // CDB SIZE 0, no usage data
		return 4
	}
	b[1] = supportStandard
	binary.BigEndian.PutUint16(b[2:4], uint16(len(e.usage))) // CDB SIZE
	n := 4 + copy(b[4:], e.usage)
	if rctd {
		b[1] |= 0x80 // CTDP
		n += timeoutsDescriptor(b[n:])
	}
	return n
}

// timeoutsDescriptor writes a command timeouts descriptor (SPC-4 6.35.5)
// with both timeouts zero: "not specified". A virtual disk's latency is the
// backing store's, which we cannot promise.
func timeoutsDescriptor(b []byte) int {
	d := b[:rsocTimeoutsLen]
	clear(d)
	binary.BigEndian.PutUint16(d[0:2], rsocTimeoutsLen-2) // DESCRIPTOR LENGTH
	return rsocTimeoutsLen
}

package scsi

import (
	"bytes"
	"encoding/binary"
	"testing"

	"vhost-target/bdev"
)

type bdevInfo = bdev.Info

// Goal: REPORT SUPPORTED OPERATION CODES never disagrees with Execute.
// Method: list all commands, then for every opcode (and service action)
// check that Execute rejects exactly the ones not listed, and that the
// one-command forms agree with the list.

func rsocCDB(option byte, rctd bool, opcode byte, sa uint16, alloc uint32) []byte {
	b := make([]byte, 12)
	b[0], b[1], b[2], b[3] = opMaintenanceIn, saReportSupportedOpsIn, option, opcode
	if rctd {
		b[2] |= 0x80
	}
	binary.BigEndian.PutUint16(b[4:6], sa)
	binary.BigEndian.PutUint32(b[6:10], alloc)
	return b
}

type listed struct {
	opcode byte
	sa     uint16
	hasSA  bool
	cdbLen int
}

func listCommands(t *testing.T, l *LUN, rctd bool) []listed {
	t.Helper()
	d := exec(t, l, ScratchSize, rsocCDB(0, rctd, 0, 0, ScratchSize)...)
	if int(binary.BigEndian.Uint32(d[0:4])) != len(d)-4 {
		t.Fatalf("command data length %d, have %d", binary.BigEndian.Uint32(d[0:4]), len(d)-4)
	}
	var out []listed
	for p := d[4:]; len(p) > 0; {
		e := listed{opcode: p[0], sa: binary.BigEndian.Uint16(p[2:4]), hasSA: p[5]&1 != 0,
			cdbLen: int(binary.BigEndian.Uint16(p[6:8]))}
		out = append(out, e)
		ctdp := p[5]&2 != 0
		if ctdp != rctd {
			t.Fatalf("CTDP %v with RCTD %v", ctdp, rctd)
		}
		p = p[8:]
		if ctdp {
			if binary.BigEndian.Uint16(p[0:2]) != 10 {
				t.Fatalf("timeouts descriptor length % x", p[:2])
			}
			p = p[12:]
		}
	}
	return out
}

func TestReportSupportedOpcodesMatchesExecute(t *testing.T) {
	noUnmap := testInfo(512, 1000)
	noUnmap.Unmap = false
	for _, info := range []*bdevInfo{testInfo(512, 1000), noUnmap} {
		l := NewLUN(0, info)
		list := listCommands(t, l, false)
		if withTimeouts := listCommands(t, l, true); len(withTimeouts) != len(list) {
			t.Fatal("RCTD changes the list")
		}
		byOp := map[byte][]listed{}
		for _, e := range list {
			byOp[e.opcode] = append(byOp[e.opcode], e)
			if e.cdbLen != cdbLength(e.opcode) {
				t.Fatalf("opcode %#x: CDB length %d", e.opcode, e.cdbLen)
			}
		}
		if _, ok := byOp[opUnmap]; ok != info.Unmap {
			t.Fatalf("UNMAP listed %v with Unmap %v", ok, info.Unmap)
		}
		for op := 0; op < 256; op++ {
			es := byOp[byte(op)]
			c := newCmd(DirNone, 0, 0)
			run(l, c, byte(op))
			invalidOpcode := c.Status == StatusCheckCondition && c.Sense[12] == 0x20
			if invalidOpcode != (len(es) == 0) {
				t.Fatalf("opcode %#x: listed %d times, Execute says invalid opcode %v", op, len(es), invalidOpcode)
			}
			// One-command forms agree with the list.
			if len(es) == 0 {
				for _, option := range []byte{1, 2, 3} {
					d := exec(t, l, 64, rsocCDB(option, false, byte(op), 0, 64)...)
					if !bytes.Equal(d, []byte{0, supportNo, 0, 0}) {
						t.Fatalf("opcode %#x option %d: % x", op, option, d)
					}
				}
				continue
			}
			if !es[0].hasSA {
				d := exec(t, l, 64, rsocCDB(1, false, byte(op), 0, 64)...)
				e, _ := l.lookup(byte(op), 0)
				if d[1] != supportStandard || int(binary.BigEndian.Uint16(d[2:4])) != es[0].cdbLen ||
					!bytes.Equal(d[4:], e.usage) {
					t.Fatalf("opcode %#x option 1: % x", op, d)
				}
				if d3 := exec(t, l, 64, rsocCDB(3, false, byte(op), 0, 64)...); !bytes.Equal(d3, d) {
					t.Fatalf("opcode %#x option 3: % x", op, d3)
				}
				if d3 := exec(t, l, 64, rsocCDB(3, false, byte(op), 1, 64)...); d3[1] != supportNo {
					t.Fatalf("opcode %#x option 3 with a service action: % x", op, d3)
				}
				c := newCmd(DirIn, 64, 0)
				expectCheck(t, c, run(l, c, rsocCDB(2, false, byte(op), 0, 64)...), keyIllegalRequest, ascInvalidFieldInCDB)
				continue
			}
			c = newCmd(DirIn, 64, 0)
			expectCheck(t, c, run(l, c, rsocCDB(1, false, byte(op), 0, 64)...), keyIllegalRequest, ascInvalidFieldInCDB)
			for sa := uint16(0); sa < 64; sa++ {
				isListed := false
				for _, e := range es {
					isListed = isListed || e.sa == sa
				}
				d := exec(t, l, 64, rsocCDB(2, true, byte(op), sa, 64)...)
				if d3 := exec(t, l, 64, rsocCDB(3, true, byte(op), sa, 64)...); !bytes.Equal(d3, d) {
					t.Fatalf("opcode %#x sa %#x option 3: % x", op, sa, d3)
				}
				if isListed != (d[1]&7 == supportStandard) {
					t.Fatalf("opcode %#x sa %#x: listed %v, support %d", op, sa, isListed, d[1]&7)
				}
				if isListed && (d[1]&0x80 == 0 || len(d) != 4+cdbLength(byte(op))+12 || d[4] != 0xFF || d[5] != byte(sa)) {
					t.Fatalf("opcode %#x sa %#x: % x", op, sa, d)
				}
				// And Execute agrees: an unlisted service action is refused.
				c := newCmd(DirIn, 64, 0)
				cdb := make([]byte, 16)
				cdb[0], cdb[1] = byte(op), byte(sa)
				run(l, c, cdb...)
				refused := c.Status == StatusCheckCondition && c.Sense[12] == 0x24
				if sa <= 0x1F && !isListed && !refused {
					t.Fatalf("opcode %#x sa %#x: not listed but executed", op, sa)
				}
			}
		}
	}
}

func TestReportSupportedOpcodesErrors(t *testing.T) {
	l := newTestLUN(512)
	for _, option := range []byte{4, 7} {
		c := newCmd(DirIn, 64, 0)
		expectCheck(t, c, run(l, c, rsocCDB(option, false, opRead10, 0, 64)...), keyIllegalRequest, ascInvalidFieldInCDB)
	}
	// Truncation: the 4-byte header alone still carries the full length.
	full := exec(t, l, ScratchSize, rsocCDB(0, false, 0, 0, ScratchSize)...)
	d := exec(t, l, ScratchSize, rsocCDB(0, false, 0, 0, 4)...)
	if !bytes.Equal(d, full[:4]) {
		t.Fatalf("header % x", d)
	}
	// WRITE SAME(16), which Linux probes: supported, with the usage bitmap.
	d = exec(t, l, 64, rsocCDB(1, false, opWriteSame16, 0, 64)...)
	if d[1] != supportStandard || d[4] != 0xFF || d[5]&0x08 == 0 {
		t.Fatalf("WRITE SAME(16): % x", d)
	}
}

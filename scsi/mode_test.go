package scsi

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// Goal: MODE SENSE(6/10) return well-formed headers, block descriptors and
// the caching/control pages Linux relies on (WP, WCE); MODE SELECT accepts
// only unchanged parameters. Method: decode the returned data by SPC field;
// feed MODE SENSE output back into MODE SELECT.

func modeSense6(page, sub byte, dbd bool, alloc byte) []byte {
	b := []byte{opModeSense6, 0, page, sub, alloc, 0}
	if dbd {
		b[1] = 0x08
	}
	return b
}

func modeSense10(page, sub byte, dbd, llbaa bool, alloc uint16) []byte {
	b := []byte{opModeSense10, 0, page, sub, 0, 0, 0, byte(alloc >> 8), byte(alloc), 0}
	if dbd {
		b[1] |= 0x08
	}
	if llbaa {
		b[1] |= 0x10
	}
	return b
}

func TestModeSense6(t *testing.T) {
	for _, bs := range blockSizes {
		l := newTestLUN(bs)
		d := exec(t, l, 255, modeSense6(0x3F, 0, false, 255)...)
		if int(d[0]) != len(d)-1 || d[2] != 0 || d[3] != 8 {
			t.Fatalf("header % x", d[:4])
		}
		if binary.BigEndian.Uint32(d[4:8]) != 1000 || binary.BigEndian.Uint32(d[8:12]) != bs {
			t.Fatalf("block descriptor % x", d[4:12])
		}
		pages := d[12:]
		if len(pages) != 20+12 || pages[0] != 0x08 || pages[1] != 18 || pages[2]&0x04 == 0 {
			t.Fatalf("caching page % x", pages)
		}
		if pages[20] != 0x0A || pages[21] != 10 {
			t.Fatalf("control page % x", pages[20:])
		}
		// DBD drops the descriptor.
		d = exec(t, l, 255, modeSense6(0x08, 0, true, 255)...)
		if d[3] != 0 || len(d) != 4+20 || d[4] != 0x08 {
			t.Fatalf("DBD caching: % x", d)
		}
		// Control page alone; subpage 0xFF of a page is the page.
		d = exec(t, l, 255, modeSense6(0x0A, 0xFF, true, 255)...)
		if len(d) != 4+12 || d[4] != 0x0A {
			t.Fatalf("control: % x", d)
		}
		// Truncation keeps the full MODE DATA LENGTH.
		d = exec(t, l, 255, modeSense6(0x3F, 0, false, 4)...)
		if len(d) != 4 || d[0] != 4+8+32-1 {
			t.Fatalf("alloc 4: % x", d)
		}
	}
}

func TestModeSenseFlags(t *testing.T) {
	info := testInfo(512, 1<<30)
	info.ReadOnly, info.WriteCache = true, false
	l := NewLUN(0, info)
	d := exec(t, l, 255, modeSense6(0x3F, 0, false, 255)...)
	if d[2] != 0x80 {
		t.Fatalf("WP: device-specific %#x", d[2])
	}
	if binary.BigEndian.Uint32(d[4:8]) != 0xFFFFFF { // saturated block count
		t.Fatalf("short descriptor blocks % x", d[4:8])
	}
	if d[12+2]&0x04 != 0 {
		t.Fatal("WCE set without a write cache")
	}
	d = exec(t, l, 255, modeSense10(0x08, 0, false, false, 255)...)
	if d[3] != 0x80 {
		t.Fatalf("WP (10): %#x", d[3])
	}
}

func TestModeSense10(t *testing.T) {
	for _, bs := range blockSizes {
		l := NewLUN(0, testInfo(bs, 1<<33))
		d := exec(t, l, 512, modeSense10(0x3F, 0, false, true, 512)...)
		if int(binary.BigEndian.Uint16(d[0:2])) != len(d)-2 || d[4]&1 != 1 || binary.BigEndian.Uint16(d[6:8]) != 16 {
			t.Fatalf("LLBAA header % x", d[:8])
		}
		if binary.BigEndian.Uint64(d[8:16]) != 1<<33 || binary.BigEndian.Uint32(d[20:24]) != bs {
			t.Fatalf("long descriptor % x", d[8:24])
		}
		if len(d) != 8+16+32 || d[24] != 0x08 {
			t.Fatalf("pages: len %d", len(d))
		}
		d = exec(t, l, 512, modeSense10(0x08, 0, false, false, 512)...)
		if d[4] != 0 || binary.BigEndian.Uint16(d[6:8]) != 8 || len(d) != 8+8+20 {
			t.Fatalf("short: % x", d)
		}
		d = exec(t, l, 512, modeSense10(0x0A, 0, true, true, 512)...)
		if binary.BigEndian.Uint16(d[6:8]) != 0 || len(d) != 8+12 {
			t.Fatalf("DBD: % x", d)
		}
	}
}

func TestModeSensePageControl(t *testing.T) {
	l := newTestLUN(512)
	cur := exec(t, l, 255, modeSense6(0x3F, 0, true, 255)...)
	def := exec(t, l, 255, modeSense6(0x3F|pcDefault<<6, 0, true, 255)...)
	if !bytes.Equal(cur, def) {
		t.Fatalf("default differs from current")
	}
	ch := exec(t, l, 255, modeSense6(0x3F|pcChangeable<<6, 0, true, 255)...)
	if len(ch) != len(cur) || ch[4] != 0x08 || ch[5] != 18 || !allZero(ch[6:24]) || !allZero(ch[26:]) {
		t.Fatalf("changeable mask % x", ch)
	}
	c := newCmd(DirIn, 255, 0)
	expectCheck(t, c, run(l, c, modeSense6(0x3F|pcSaved<<6, 0, false, 255)...), keyIllegalRequest, ascSavingNotSupported)
	for _, cdb := range [][]byte{
		modeSense6(0x1C, 0, false, 255),         // informational exceptions: not served
		modeSense6(0x08, 0x01, false, 255),      // a subpage we lack
		modeSense10(0x01, 0, false, false, 255), // read-write error recovery
	} {
		c := newCmd(DirIn, 255, 0)
		expectCheck(t, c, run(l, c, cdb...), keyIllegalRequest, ascInvalidFieldInCDB)
	}
}

func modeSelectCmd(ten bool, list []byte) (*Cmd, []byte) {
	c := newCmd(DirOut, 0, 0)
	setData(c, list, 7)
	if ten {
		return c, []byte{opModeSelect10, 0x10, 0, 0, 0, 0, 0, byte(len(list) >> 8), byte(len(list)), 0}
	}
	return c, []byte{opModeSelect6, 0x10, 0, 0, byte(len(list)), 0}
}

func TestModeSelect(t *testing.T) {
	for _, bs := range blockSizes {
		l := newTestLUN(bs)
		// Echo the current parameters back, as sdparm does: accepted.
		for _, ten := range []bool{false, true} {
			var sense []byte
			if ten {
				sense = exec(t, l, 255, modeSense10(0x3F, 0, false, false, 255)...)
				sense[0], sense[1] = 0, 0 // MODE DATA LENGTH is reserved in MODE SELECT
			} else {
				sense = exec(t, l, 255, modeSense6(0x3F, 0, false, 255)...)
				sense[0] = 0
			}
			c, cdb := modeSelectCmd(ten, sense)
			if a := run(l, c, cdb...); a != ActionDone {
				t.Fatal("action")
			}
			expectGood(t, c)

			hdr := 4
			if ten {
				hdr = 8
			}
			// Toggling WCE is refused.
			bad := bytes.Clone(sense)
			bad[hdr+8+2] ^= 0x04
			c, cdb = modeSelectCmd(ten, bad)
			expectCheck(t, c, run(l, c, cdb...), keyIllegalRequest, ascInvalidFieldInParamList)
			// A different block length is refused.
			bad = bytes.Clone(sense)
			bad[hdr+6] ^= 0x02
			c, cdb = modeSelectCmd(ten, bad)
			expectCheck(t, c, run(l, c, cdb...), keyIllegalRequest, ascInvalidFieldInParamList)
			// A page running past the list: parameter list length error.
			c, cdb = modeSelectCmd(ten, sense[:len(sense)-1])
			expectCheck(t, c, run(l, c, cdb...), keyIllegalRequest, ascParamListLength)
			// Header only: accepted.
			c, cdb = modeSelectCmd(ten, make([]byte, hdr))
			run(l, c, cdb...)
			expectGood(t, c)
			// Shorter than a header.
			c, cdb = modeSelectCmd(ten, make([]byte, hdr-1))
			expectCheck(t, c, run(l, c, cdb...), keyIllegalRequest, ascParamListLength)
			// Unknown page.
			list := append(make([]byte, hdr), 0x1C, 2, 0, 0)
			c, cdb = modeSelectCmd(ten, list)
			expectCheck(t, c, run(l, c, cdb...), keyIllegalRequest, ascInvalidFieldInParamList)
			// Block descriptor length beyond the list.
			list = make([]byte, hdr+4)
			list[hdr-1] = 8
			c, cdb = modeSelectCmd(ten, list)
			expectCheck(t, c, run(l, c, cdb...), keyIllegalRequest, ascParamListLength)
		}
	}
}

func TestModeSelectCDB(t *testing.T) {
	l := newTestLUN(512)
	// Zero-length list: nothing to do.
	c := newCmd(DirNone, 0, 0)
	run(l, c, opModeSelect6, 0x10, 0, 0, 0, 0)
	expectGood(t, c)
	// SP: saving is not supported.
	c, cdb := modeSelectCmd(false, make([]byte, 4))
	cdb[1] |= 0x01
	expectCheck(t, c, run(l, c, cdb...), keyIllegalRequest, ascInvalidFieldInCDB)
	// Buffer shorter than the announced list.
	c, cdb = modeSelectCmd(false, make([]byte, 4))
	cdb[4] = 12
	expectCheck(t, c, run(l, c, cdb...), keyIllegalRequest, ascInvalidFieldInCDB)
	// An absurd length.
	c = newCmd(DirOut, 65535, 0)
	expectCheck(t, c, run(l, c, opModeSelect10, 0x10, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0), keyIllegalRequest, ascParamListLength)
}

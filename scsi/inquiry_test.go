package scsi

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// Goal: INQUIRY data is what Linux's scan and sd expect, every VPD page is
// well formed and listed in page 0x00, and short allocation lengths truncate
// instead of failing. Method: read each page in full and with short
// allocation lengths, checking bytes by SPC/SBC field.

func TestStandardInquiry(t *testing.T) {
	l := newTestLUN(512)
	d := exec(t, l, 255, inquiryCDB(false, 0, 255)...)
	if len(d) != 36 {
		t.Fatalf("length %d, want 36", len(d))
	}
	if d[0] != 0 || d[2] != 5 || d[3]&0x0F != 2 || int(d[4]) != len(d)-5 || d[7]&0x02 == 0 {
		t.Fatalf("header % x", d[:8])
	}
	if string(d[8:16]) != "VHOSTTGT" || string(d[16:32]) != "vhost-target    " || string(d[32:36]) != "0001" {
		t.Fatalf("identification %q", d[8:36])
	}
}

func TestInquiryTruncation(t *testing.T) {
	l := newTestLUN(512)
	full := exec(t, l, 255, inquiryCDB(false, 0, 255)...)
	for _, alloc := range []uint16{0, 1, 4, 5, 35} {
		c := newCmd(DirIn, 255, 0)
		if a := run(l, c, inquiryCDB(false, 0, alloc)...); a != ActionDone {
			t.Fatal("action")
		}
		expectGood(t, c)
		if c.Resid != 255-uint32(alloc) || !bytes.Equal(dataIn(c), full[:alloc]) {
			t.Fatalf("alloc %d: resid %d data % x", alloc, c.Resid, dataIn(c))
		}
	}
	// The buffer, not the allocation length, limits: 4-byte buffer, alloc 255.
	c := newCmd(DirIn, 4, 0)
	run(l, c, inquiryCDB(false, 0, 255)...)
	expectGood(t, c)
	if c.Resid != 0 || !bytes.Equal(dataIn(c), full[:4]) {
		t.Fatalf("short buffer: resid %d", c.Resid)
	}
	// No buffer at all is still GOOD.
	c = newCmd(DirNone, 0, 0)
	run(l, c, inquiryCDB(false, 0, 36)...)
	expectGood(t, c)
}

func TestInquiryErrors(t *testing.T) {
	l := newTestLUN(512)
	for _, cdb := range [][]byte{
		inquiryCDB(false, 0x80, 255),    // EVPD=0 with a page code
		inquiryCDB(true, 0x81, 255),     // unknown page
		inquiryCDB(true, 0x89, 255),     // ATA information: not served
		{opInquiry, 0x02, 0, 0, 255, 0}, // CMDDT
	} {
		c := newCmd(DirIn, 255, 0)
		expectCheck(t, c, run(l, c, cdb...), keyIllegalRequest, ascInvalidFieldInCDB)
	}
	// Data-out buffer on a data-in command.
	c := newCmd(DirOut, 255, 0)
	expectCheck(t, c, run(l, c, inquiryCDB(false, 0, 255)...), keyIllegalRequest, ascInvalidFieldInCDB)
}

// vpd reads a VPD page in full, checking its header.
func vpd(t *testing.T, l *LUN, page byte) []byte {
	t.Helper()
	d := exec(t, l, 4096, inquiryCDB(true, page, 4096)...)
	if len(d) < 4 || d[0] != 0 || d[1] != page || int(binary.BigEndian.Uint16(d[2:4])) != len(d)-4 {
		t.Fatalf("page %#x: bad header % x (len %d)", page, d[:min(len(d), 4)], len(d))
	}
	if len(d) == 4 {
		t.Fatalf("page %#x: empty (Linux treats page length 0 as an error)", page)
	}
	return d
}

func TestVPDSupportedPagesServed(t *testing.T) {
	l := newTestLUN(512)
	d := vpd(t, l, 0x00)
	want := []byte{0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2}
	if !bytes.Equal(d[4:], want) {
		t.Fatalf("supported pages % x, want % x", d[4:], want)
	}
	// Every listed page is served, every other page is refused.
	listed := map[byte]bool{}
	for _, p := range d[4:] {
		listed[p] = true
	}
	for p := 0; p < 256; p++ {
		c := newCmd(DirIn, 4096, 0)
		run(l, c, inquiryCDB(true, byte(p), 4096)...)
		if listed[byte(p)] != (c.Status == StatusGood) {
			t.Fatalf("page %#x: listed %v, status %#x", p, listed[byte(p)], c.Status)
		}
	}
}

func TestVPDHeaderOnlyRead(t *testing.T) {
	// Linux reads a 4-byte header first to learn the page length.
	l := newTestLUN(512)
	for _, page := range []byte{0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2} {
		full := vpd(t, l, page)
		c := newCmd(DirIn, 4, 0)
		run(l, c, inquiryCDB(true, page, 4)...)
		expectGood(t, c)
		if !bytes.Equal(dataIn(c), full[:4]) {
			t.Fatalf("page %#x: header % x, want % x", page, dataIn(c), full[:4])
		}
	}
}

func TestVPDSerialAndDeviceID(t *testing.T) {
	l := newTestLUN(512)
	s := vpd(t, l, 0x80)
	if string(s[4:]) != "123456789abc4def8011223344556677" {
		t.Fatalf("serial %q", s[4:])
	}
	d := vpd(t, l, 0x83)
	// NAA designator first.
	naa := d[4:]
	if naa[0] != 0x01 || naa[1] != 0x03 || naa[3] != 16 || naa[4]>>4 != 6 {
		t.Fatalf("NAA designator header % x", naa[:5])
	}
	wantNAA := []byte{0x61, 0x23, 0x45, 0x67, 0x89, 0xab, 0xc4, 0xde, 0xf8, 0x01, 0x12, 0x23, 0x34, 0x45, 0x56, 0x67}
	if !bytes.Equal(naa[4:20], wantNAA) {
		t.Fatalf("NAA % x", naa[4:20])
	}
	t10 := naa[20:]
	if t10[0] != 0x02 || t10[1] != 0x01 || int(t10[3]) != len(t10)-4 ||
		string(t10[4:]) != "VHOSTTGT123456789abc4def8011223344556677" {
		t.Fatalf("T10 designator % x", t10)
	}
	// Stable for a UUID, different for another.
	if !bytes.Equal(vpd(t, newTestLUN(4096), 0x83), d) {
		t.Fatal("device identification differs for the same UUID")
	}
	info := testInfo(512, 1000)
	info.UUID[15] ^= 0x10
	if bytes.Equal(vpd(t, NewLUN(0, info), 0x83)[8:24], d[8:24]) {
		t.Fatal("NAA identical for different UUIDs")
	}
}

func TestVPDBlockLimits(t *testing.T) {
	for _, bs := range blockSizes {
		for _, unmap := range []bool{false, true} {
			info := testInfo(bs, 1000)
			info.Unmap = unmap
			d := vpd(t, NewLUN(0, info), 0xB0)
			be := binary.BigEndian
			if len(d) != 64 || d[4]&1 != 1 {
				t.Fatalf("length %d WSNZ %d", len(d), d[4]&1)
			}
			if got := be.Uint32(d[8:12]); got != MaxTransferBytes/bs {
				t.Fatalf("max transfer %d", got)
			}
			if got := be.Uint32(d[12:16]); got != 8 {
				t.Fatalf("optimal transfer %d", got)
			}
			maxUnmap, maxDesc := be.Uint32(d[20:24]), be.Uint32(d[24:28])
			if unmap && (maxUnmap != maxUnmapBlocks || maxDesc != 32) || !unmap && (maxUnmap != 0 || maxDesc != 0) {
				t.Fatalf("unmap %v: max unmap %d descriptors %d", unmap, maxUnmap, maxDesc)
			}
			if got := be.Uint64(d[36:44]); got != maxWriteSameBytes/uint64(bs) {
				t.Fatalf("max write same %d", got)
			}
		}
	}
}

func TestVPDCharacteristicsAndProvisioning(t *testing.T) {
	l := newTestLUN(512)
	d := vpd(t, l, 0xB1)
	if len(d) != 64 || binary.BigEndian.Uint16(d[4:6]) != 1 {
		t.Fatalf("B1 % x", d[:8])
	}
	for _, tc := range []struct {
		unmap, zeroes bool
		b5, b6        byte
	}{
		{false, false, 0x00, 0x00},
		{false, true, 0x00, 0x00},
		{true, false, 0xE0, 0x02},
		{true, true, 0xE4, 0x02},
	} {
		info := testInfo(512, 1000)
		info.Unmap, info.UnmapZeroes = tc.unmap, tc.zeroes
		d := vpd(t, NewLUN(0, info), 0xB2)
		if len(d) != 8 || d[5] != tc.b5 || d[6] != tc.b6 {
			t.Fatalf("unmap %v zeroes %v: B2 % x", tc.unmap, tc.zeroes, d)
		}
	}
}

func TestRequestSense(t *testing.T) {
	l := newTestLUN(512)
	d := exec(t, l, 252, opRequestSense, 0, 0, 0, 252, 0)
	want := make([]byte, 18)
	want[0], want[7] = 0x70, 10
	if !bytes.Equal(d, want) {
		t.Fatalf("fixed: % x", d)
	}
	d = exec(t, l, 252, opRequestSense, 0, 0, 0, 4, 0)
	if !bytes.Equal(d, want[:4]) {
		t.Fatalf("alloc 4: % x", d)
	}
	d = exec(t, l, 252, opRequestSense, 1, 0, 0, 252, 0)
	if !bytes.Equal(d, []byte{0x72, 0, 0, 0, 0, 0, 0, 0}) {
		t.Fatalf("descriptor: % x", d)
	}
}

func TestNoDataCommands(t *testing.T) {
	l := newTestLUN(512)
	for _, cdb := range [][]byte{
		{opTestUnitReady, 0, 0, 0, 0, 0},
		{opStartStopUnit, 0, 0, 0, 0x01, 0}, // START
		{opStartStopUnit, 1, 0, 0, 0x00, 0}, // IMMED STOP
	} {
		c := newCmd(DirNone, 0, 0)
		if a := run(l, c, cdb...); a != ActionDone {
			t.Fatal("action")
		}
		expectGood(t, c)
	}
	// A stray buffer on a command without data is ignored, not moved.
	c := newCmd(DirIn, 64, 0)
	run(l, c, opTestUnitReady, 0, 0, 0, 0, 0)
	expectGood(t, c)
	if c.Resid != 64 {
		t.Fatalf("resid %d", c.Resid)
	}
}

func TestUnknownOpcodes(t *testing.T) {
	l := newTestLUN(512)
	for _, op := range []byte{0x01, 0x04, 0x16, 0x4C, 0x4D, 0x5E, 0x5F, 0x85, 0x89, 0xA1, 0xFF} {
		c := newCmd(DirIn, 512, 0)
		expectCheck(t, c, run(l, c, op), keyIllegalRequest, ascInvalidOpcode)
	}
	// Known opcode, unknown service action.
	for _, cdb := range [][]byte{{opServiceActionIn16, 0x12}, {opMaintenanceIn, 0x0A}} {
		c := newCmd(DirIn, 512, 0)
		expectCheck(t, c, run(l, c, cdb...), keyIllegalRequest, ascInvalidFieldInCDB)
	}
}

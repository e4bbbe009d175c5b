package scsi

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"
)

// Goal: a Target answers for its LUNs and, for absent ones, behaves as
// Linux's scan requires (PQ 3 INQUIRY, REPORT LUNS on an absent LUN 0, 0x25
// otherwise). Method: build targets and run the scan commands against them.

func reportLUNsCDB(sel byte, alloc uint32) []byte {
	b := make([]byte, 12)
	b[0], b[2] = opReportLUNs, sel
	binary.BigEndian.PutUint32(b[6:10], alloc)
	return b
}

func mustTarget(t *testing.T, ids ...uint16) *Target {
	t.Helper()
	var luns []*LUN
	for _, id := range ids {
		luns = append(luns, NewLUN(id, testInfo(512, 100)))
	}
	tg, err := NewTarget(3, luns)
	if err != nil {
		t.Fatal(err)
	}
	return tg
}

func texec(t *testing.T, tg *Target, lun uint16, n int, cdb ...byte) *Cmd {
	t.Helper()
	c := newCmd(DirIn, n, 0)
	setCDB(c, cdb...)
	if a := tg.Execute(lun, c); a != ActionDone {
		t.Fatalf("action %d", a)
	}
	return c
}

func TestReportLUNs(t *testing.T) {
	tg := mustTarget(t, 300, 0, 7, 16383)
	want := []byte{
		0, 0, 0, 32, 0, 0, 0, 0,
		0x00, 0, 0, 0, 0, 0, 0, 0,
		0x00, 7, 0, 0, 0, 0, 0, 0,
		0x41, 0x2C, 0, 0, 0, 0, 0, 0, // 300 = 0x12C, flat space
		0x7F, 0xFF, 0, 0, 0, 0, 0, 0, // 16383
	}
	for _, lun := range []uint16{0, 7, 300, 5} { // 5 is absent: still answered
		for _, sel := range []byte{0, 2} {
			c := texec(t, tg, lun, 1024, reportLUNsCDB(sel, 1024)...)
			expectGood(t, c)
			if !bytes.Equal(dataIn(c), want) {
				t.Fatalf("lun %d select %d: % x", lun, sel, dataIn(c))
			}
		}
	}
	c := texec(t, tg, 0, 1024, reportLUNsCDB(1, 1024)...)
	expectGood(t, c)
	if !bytes.Equal(dataIn(c), make([]byte, 8)) {
		t.Fatalf("well-known only: % x", dataIn(c))
	}
	// Truncated to 16 bytes: full list length, first entry.
	c = texec(t, tg, 0, 1024, reportLUNsCDB(0, 16)...)
	expectGood(t, c)
	if !bytes.Equal(dataIn(c), want[:16]) {
		t.Fatalf("alloc 16: % x", dataIn(c))
	}
	for _, cdb := range [][]byte{reportLUNsCDB(0, 15), reportLUNsCDB(3, 1024), reportLUNsCDB(0xFF, 1024)} {
		for _, lun := range []uint16{0, 5} {
			c := texec(t, tg, lun, 1024, cdb...)
			expectCheck(t, c, ActionDone, keyIllegalRequest, ascInvalidFieldInCDB)
		}
	}
	// A LUN executed on its own reports itself.
	l := NewLUN(260, testInfo(512, 100))
	d := exec(t, l, 64, reportLUNsCDB(0, 64)...)
	if !bytes.Equal(d, []byte{0, 0, 0, 8, 0, 0, 0, 0, 0x41, 0x04, 0, 0, 0, 0, 0, 0}) {
		t.Fatalf("lone LUN: % x", d)
	}
}

func TestAbsentLUN(t *testing.T) {
	tg := mustTarget(t, 1)
	// INQUIRY on absent LUN 0: PQ 3 / type 0x1F, rest standard.
	c := texec(t, tg, 0, 96, inquiryCDB(false, 0, 96)...)
	expectGood(t, c)
	d := dataIn(c)
	if len(d) != 36 || d[0] != 0x7F || d[2] != 5 || string(d[8:16]) != "VHOSTTGT" {
		t.Fatalf("absent INQUIRY % x", d)
	}
	c = texec(t, tg, 0, 96, inquiryCDB(false, 0, 1)...)
	if !bytes.Equal(dataIn(c), []byte{0x7F}) {
		t.Fatalf("absent INQUIRY alloc 1: % x", dataIn(c))
	}
	// Present LUN: PQ 0.
	c = texec(t, tg, 1, 96, inquiryCDB(false, 0, 96)...)
	if dataIn(c)[0] != 0 {
		t.Fatal("present LUN reports PQ")
	}
	// REQUEST SENSE: GOOD, with LOGICAL UNIT NOT SUPPORTED as data.
	c = texec(t, tg, 0, 96, opRequestSense, 0, 0, 0, 96, 0)
	expectGood(t, c)
	if d := dataIn(c); len(d) != 18 || d[0] != 0x70 || d[2] != 5 || d[12] != 0x25 {
		t.Fatalf("absent REQUEST SENSE % x", d)
	}
	// Anything else: CHECK CONDITION 0x25.
	for _, cdb := range [][]byte{
		{opTestUnitReady}, cdb10(opRead10, 0, 0, 1), inquiryCDB(true, 0, 96), rc16CDB(32),
		{opReadCapacity10}, {0xFF},
	} {
		c := texec(t, tg, 2, 512, cdb...)
		expectCheck(t, c, ActionDone, keyIllegalRequest, ascLUNNotSupported)
	}
	// Wrong direction on the absent path.
	c = newCmd(DirOut, 96, 0)
	setCDB(c, inquiryCDB(false, 0, 96)...)
	expectCheck(t, c, tg.Execute(0, c), keyIllegalRequest, ascInvalidFieldInCDB)
}

func TestNewTarget(t *testing.T) {
	a, b := NewLUN(4, testInfo(512, 10)), NewLUN(2, testInfo(512, 10))
	tg, err := NewTarget(255, []*LUN{a, b})
	if err != nil {
		t.Fatal(err)
	}
	if tg.ID() != 255 || tg.LUN(4) != a || tg.LUN(2) != b || tg.LUN(3) != nil || tg.LUN(0) != nil || tg.LUN(5) != nil {
		t.Fatal("lookup")
	}
	if ls := tg.LUNs(); ls[0] != b || ls[1] != a {
		t.Fatal("LUNs not sorted")
	}
	if n := testing.AllocsPerRun(100, func() { tg.LUN(4) }); n != 0 {
		t.Fatalf("LUN lookup allocates %v", n)
	}
	for _, tc := range []struct {
		luns []*LUN
		want string
	}{
		{[]*LUN{a, NewLUN(4, testInfo(512, 10))}, "duplicate LUN id 4"},
		{[]*LUN{a, nil}, "nil"},
		{[]*LUN{NewLUN(16384, testInfo(512, 10))}, "above 16383"},
		{make([]*LUN, MaxLUNs+1), "at most"},
	} {
		if _, err := NewTarget(0, tc.luns); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Fatalf("want error %q, got %v", tc.want, err)
		}
	}
	// The largest target's REPORT LUNS fits the scratch buffer.
	luns := make([]*LUN, MaxLUNs)
	for i := range luns {
		luns[i] = NewLUN(uint16(i*16), testInfo(512, 10))
	}
	big, err := NewTarget(0, luns)
	if err != nil {
		t.Fatal(err)
	}
	c := texec(t, big, 0, ScratchSize, reportLUNsCDB(0, ScratchSize)...)
	expectGood(t, c)
	if d := dataIn(c); len(d) != 8+8*MaxLUNs || d[len(d)-8] != 0x40|byte((MaxLUNs-1)*16>>8) {
		t.Fatalf("big REPORT LUNS: %d bytes", len(d))
	}
}

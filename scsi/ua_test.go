package scsi

import (
	"testing"
)

// TestUnitAttention: which commands report a pending unit attention
// (SAM-5 5.14: not INQUIRY, not REPORT LUNS), the CHECK CONDITION sense of
// each condition, REQUEST SENSE returning it as parameter data (fixed and
// descriptor format), the order conditions are reported in, and no
// allocation.
func TestUnitAttention(t *testing.T) {
	for _, op := range []byte{opInquiry, opReportLUNs} {
		if ReportsUnitAttention(op) {
			t.Errorf("opcode %#x reports a unit attention", op)
		}
	}
	for _, op := range []byte{opTestUnitReady, opRead10, opWrite16, opReadCapacity10, opServiceActionIn16, opRequestSense, opSyncCache10} {
		if !ReportsUnitAttention(op) {
			t.Errorf("opcode %#x does not report a unit attention", op)
		}
	}
	if got := (UACapacityChanged | UAReportedLUNsChanged).Next(); got != UACapacityChanged {
		t.Errorf("Next of both = %d, want capacity first", got)
	}
	if got := UAReportedLUNsChanged.Next(); got != UAReportedLUNsChanged {
		t.Errorf("Next = %d", got)
	}
	if got := UnitAttention(0).Next(); got != 0 {
		t.Errorf("Next of none = %d", got)
	}

	for _, tc := range []struct {
		ua        UnitAttention
		asc, ascq byte
	}{{UACapacityChanged, 0x2a, 0x09}, {UAReportedLUNsChanged, 0x3f, 0x0e}} {
		c := newCmd(DirIn, 4096, 0)
		setCDB(c, opRead10, 0, 0, 0, 0, 0, 0, 0, 8, 0)
		c.Status, c.Resid = 0xff, 7 // leftovers of a previous command
		if a := c.ReportUnitAttention(tc.ua); a != ActionDone {
			t.Fatalf("action %d", a)
		}
		if c.Status != StatusCheckCondition || c.SenseLen != SenseSize || c.Sense[0] != 0x70 || c.Sense[2] != 0x6 ||
			c.Sense[12] != tc.asc || c.Sense[13] != tc.ascq || c.Resid != 4096 {
			t.Errorf("ua %d: status %#x sense % x resid %d", tc.ua, c.Status, c.Sense[:c.SenseLen], c.Resid)
		}

		// REQUEST SENSE: GOOD, the UA as parameter data.
		c = newCmd(DirIn, 252, 0)
		setCDB(c, opRequestSense, 0, 0, 0, 252, 0)
		c.ReportUnitAttention(tc.ua)
		d := dataIn(c)
		if c.Status != StatusGood || len(d) != SenseSize || d[0] != 0x70 || d[2] != 0x6 || d[12] != tc.asc || d[13] != tc.ascq {
			t.Errorf("ua %d: REQUEST SENSE status %#x data % x", tc.ua, c.Status, d)
		}
		setCDB(c, opRequestSense, 1, 0, 0, 252, 0) // DESC=1
		c.ReportUnitAttention(tc.ua)
		d = dataIn(c)
		if c.Status != StatusGood || len(d) != 8 || d[0] != 0x72 || d[1] != 0x6 || d[2] != tc.asc || d[3] != tc.ascq {
			t.Errorf("ua %d: REQUEST SENSE (descriptor) data % x", tc.ua, d)
		}
	}

	c := newCmd(DirNone, 0, 0)
	setCDB(c, opTestUnitReady)
	if n := testing.AllocsPerRun(100, func() { c.ReportUnitAttention(UACapacityChanged) }); n != 0 {
		t.Errorf("ReportUnitAttention allocates %v", n)
	}
}

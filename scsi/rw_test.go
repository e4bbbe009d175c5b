package scsi

import (
	"testing"

	"vhost-target/bdev"
)

// Goal: every READ/WRITE size goes through one range checker. Method: for
// each opcode and both block sizes, walk the LBA edges (last block, one past,
// whole disk, one too many), zero length, the transfer limit and buffer
// mismatches, and check the prepared IO or the sense.

type rwOp struct {
	name  string
	write bool
	cdb   func(lba uint64, n uint32) []byte
	maxN  uint32 // largest length the CDB can carry
}

var rwOps = []rwOp{
	{"READ(10)", false, func(lba uint64, n uint32) []byte { return cdb10(opRead10, 0, uint32(lba), uint16(n)) }, 0xFFFF},
	{"WRITE(10)", true, func(lba uint64, n uint32) []byte { return cdb10(opWrite10, 0x08, uint32(lba), uint16(n)) }, 0xFFFF},
	{"READ(12)", false, func(lba uint64, n uint32) []byte { return cdb12(opRead12, 0x10, uint32(lba), n) }, 1 << 31},
	{"WRITE(12)", true, func(lba uint64, n uint32) []byte { return cdb12(opWrite12, 0, uint32(lba), n) }, 1 << 31},
	{"READ(16)", false, func(lba uint64, n uint32) []byte { return cdb16(opRead16, 0x08, lba, n) }, 1 << 31},
	{"WRITE(16)", true, func(lba uint64, n uint32) []byte { return cdb16(opWrite16, 0, lba, n) }, 1 << 31},
	{"READ(6)", false, func(lba uint64, n uint32) []byte { return cdb6(opRead6, uint32(lba), byte(n)) }, 256},
	{"WRITE(6)", true, func(lba uint64, n uint32) []byte { return cdb6(opWrite6, uint32(lba), byte(n)) }, 256},
}

func TestReadWriteRanges(t *testing.T) {
	const blocks = 1000
	for _, bs := range blockSizes {
		l := newTestLUN(bs)
		for _, op := range rwOps {
			dir, bop := DirIn, bdev.OpRead
			if op.write {
				dir, bop = DirOut, bdev.OpWrite
			}
			maxN := min(uint32(MaxTransferBytes)/bs, op.maxN)
			whole := uint32(blocks)
			for _, tc := range []struct {
				name   string
				lba    uint64
				n      uint32
				wantOK bool
			}{
				{"first block", 0, 1, true},
				{"last block", blocks - 1, 1, true},
				{"one past", blocks, 1, false},
				{"last two", blocks - 2, 2, true},
				{"crossing end", blocks - 1, 2, false},
				{"whole disk", 0, min(whole, maxN), whole <= maxN},
				{"one too many", 0, whole + 1, false},
				{"huge lba", 1<<63 + 5, 1, false},
			} {
				wideLBA := op.name == "READ(16)" || op.name == "WRITE(16)"
				if tc.n > op.maxN || (tc.lba > 0xFFFFFFFF && !wideLBA) {
					continue
				}
				if tc.name == "whole disk" && !tc.wantOK {
					continue
				}
				c := newCmd(dir, int(tc.n*bs), 0)
				a := run(l, c, op.cdb(tc.lba, tc.n)...)
				if !tc.wantOK {
					expectCheck(t, c, a, keyIllegalRequest, ascLBAOutOfRange)
					continue
				}
				if a != ActionIO {
					t.Fatalf("bs %d %s %s: action %d sense % x", bs, op.name, tc.name, a, c.Sense)
				}
				if c.IO.Op != bop || c.IO.Offset != tc.lba*uint64(bs) || c.IO.Len != uint64(tc.n*bs) {
					t.Fatalf("bs %d %s %s: io %v off %d len %d", bs, op.name, tc.name, c.IO.Op, c.IO.Offset, c.IO.Len)
				}
				if &c.IO.Iov[0][0] != &c.Data[0][0] {
					t.Fatalf("%s: Iov does not alias Data", op.name)
				}
				c.CompleteIO()
				expectGood(t, c)
				if c.Resid != 0 {
					t.Fatalf("%s: resid %d", op.name, c.Resid)
				}
			}
			// Transfer limit: max passes, max+1 is an invalid field.
			if op.maxN > maxN {
				c := newCmd(dir, int(maxN*bs), 0)
				l2 := NewLUN(0, testInfo(bs, 1<<40))
				if a := run(l2, c, op.cdb(0, maxN)...); a != ActionIO {
					t.Fatalf("%s: max transfer refused", op.name)
				}
				c = newCmd(dir, int((maxN+1)*bs), 0)
				expectCheck(t, c, run(l2, c, op.cdb(0, maxN+1)...), keyIllegalRequest, ascInvalidFieldInCDB)
			}
		}
	}
}

func TestReadWrite6ZeroMeans256(t *testing.T) {
	for _, bs := range blockSizes {
		l := newTestLUN(bs)
		c := newCmd(DirIn, int(256*bs), 0)
		if a := run(l, c, cdb6(opRead6, 10, 0)...); a != ActionIO || c.IO.Len != uint64(256*bs) {
			t.Fatalf("READ(6) length 0: action %d len %d", a, c.IO.Len)
		}
		// 256 blocks from block 745 end exactly at 1001: out of range.
		c = newCmd(DirOut, int(256*bs), 0)
		expectCheck(t, c, run(l, c, cdb6(opWrite6, 745, 0)...), keyIllegalRequest, ascLBAOutOfRange)
	}
}

func TestReadWriteZeroLength(t *testing.T) {
	l := newTestLUN(512)
	for _, cdb := range [][]byte{
		cdb10(opRead10, 0, 5, 0), cdb10(opWrite10, 0, 999, 0), cdb12(opRead12, 0, 0, 0), cdb16(opWrite16, 0, 0, 0),
	} {
		c := newCmd(DirNone, 0, 0)
		if a := run(l, c, cdb...); a != ActionDone {
			t.Fatalf("% x: zero length did I/O", cdb)
		}
		expectGood(t, c)
	}
	// A zero-length transfer must still start inside the device.
	c := newCmd(DirNone, 0, 0)
	expectCheck(t, c, run(l, c, cdb10(opRead10, 0, 1000, 0)...), keyIllegalRequest, ascLBAOutOfRange)
}

func TestReadWriteBuffers(t *testing.T) {
	for _, bs := range blockSizes {
		l := newTestLUN(bs)
		// Smaller buffer than the transfer: invalid field.
		c := newCmd(DirIn, int(2*bs-1), 0)
		expectCheck(t, c, run(l, c, cdb10(opRead10, 0, 0, 2)...), keyIllegalRequest, ascInvalidFieldInCDB)
		// No buffer at all.
		c = newCmd(DirNone, 0, 0)
		expectCheck(t, c, run(l, c, cdb10(opRead10, 0, 0, 2)...), keyIllegalRequest, ascInvalidFieldInCDB)
		// Wrong direction.
		c = newCmd(DirOut, int(2*bs), 0)
		expectCheck(t, c, run(l, c, cdb10(opRead10, 0, 0, 2)...), keyIllegalRequest, ascInvalidFieldInCDB)
		c = newCmd(DirIn, int(2*bs), 0)
		expectCheck(t, c, run(l, c, cdb10(opWrite10, 0, 0, 2)...), keyIllegalRequest, ascInvalidFieldInCDB)
		// DataLen claiming more than the buffers hold: refused.
		c = newCmd(DirIn, int(2*bs), 0)
		c.DataLen = 4 * bs
		expectCheck(t, c, run(l, c, cdb10(opRead10, 0, 0, 4)...), keyIllegalRequest, ascInvalidFieldInCDB)
		// Larger buffer in odd segments: the prefix holding exactly the
		// blocks goes to the bdev, the rest is residual.
		c = newCmd(DirIn, int(3*bs+100), 300)
		if a := run(l, c, cdb10(opRead10, 0, 7, 2)...); a != ActionIO {
			t.Fatalf("larger buffer: action %d", a)
		}
		var sum uint64
		for _, v := range c.IO.Iov {
			sum += uint64(len(v))
		}
		if sum != c.IO.Len || c.IO.Len != uint64(2*bs) || c.IO.Offset != uint64(7*bs) {
			t.Fatalf("larger buffer: iov sum %d len %d", sum, c.IO.Len)
		}
		c.CompleteIO()
		expectGood(t, c)
		if c.Resid != bs+100 {
			t.Fatalf("larger buffer: resid %d, want %d", c.Resid, bs+100)
		}
	}
}

func TestReadWriteProtectFields(t *testing.T) {
	l := newTestLUN(512)
	for _, cdb := range [][]byte{
		cdb10(opRead10, 0x20, 0, 1), cdb12(opWrite12, 0x40, 0, 1), cdb16(opRead16, 0x80, 0, 1),
	} {
		dir := DirIn
		if cdb[0] == opWrite12 {
			dir = DirOut
		}
		c := newCmd(dir, 512, 0)
		expectCheck(t, c, run(l, c, cdb...), keyIllegalRequest, ascInvalidFieldInCDB)
	}
}

func TestReadOnlyLUN(t *testing.T) {
	info := testInfo(512, 1000)
	info.ReadOnly = true
	l := NewLUN(0, info)
	for _, cdb := range [][]byte{
		cdb6(opWrite6, 0, 1), cdb10(opWrite10, 0, 0, 1), cdb12(opWrite12, 0, 0, 1), cdb16(opWrite16, 0, 0, 1),
		cdb10(opWriteSame10, 0, 0, 1), cdb16(opWriteSame16, 0x01, 0, 1), cdb10(opUnmap, 0, 0, 24),
	} {
		c := newCmd(DirOut, 512, 0)
		expectCheck(t, c, run(l, c, cdb...), keyDataProtect, ascWriteProtected)
	}
	c := newCmd(DirIn, 512, 0)
	if a := run(l, c, cdb10(opRead10, 0, 0, 1)...); a != ActionIO {
		t.Fatalf("read on a read-only LUN refused")
	}
}

func TestSyncCache(t *testing.T) {
	for _, bs := range blockSizes {
		l := newTestLUN(bs)
		for _, tc := range []struct {
			cdb      []byte
			ok       bool
			off, len uint64
		}{
			{cdb10(opSyncCache10, 0, 0, 0), true, 0, 1000},
			{cdb10(opSyncCache10, 0x02, 10, 0), true, 10, 990},
			{cdb10(opSyncCache10, 0, 999, 1), true, 999, 1},
			{cdb10(opSyncCache10, 0, 999, 2), false, 0, 0},
			{cdb10(opSyncCache10, 0, 1000, 0), false, 0, 0},
			{cdb16(opSyncCache16, 0, 0, 1000), true, 0, 1000},
			{cdb16(opSyncCache16, 0, 0, 1001), false, 0, 0},
			{cdb16(opSyncCache16, 0, 1<<63, 0), false, 0, 0},
		} {
			c := newCmd(DirNone, 0, 0)
			a := run(l, c, tc.cdb...)
			if !tc.ok {
				expectCheck(t, c, a, keyIllegalRequest, ascLBAOutOfRange)
				continue
			}
			if a != ActionIO || c.IO.Op != bdev.OpFlush || c.IO.Offset != tc.off*uint64(bs) || c.IO.Len != tc.len*uint64(bs) {
				t.Fatalf("% x: action %d op %v off %d len %d", tc.cdb, a, c.IO.Op, c.IO.Offset, c.IO.Len)
			}
			c.CompleteIO()
			expectGood(t, c)
		}
	}
}

func TestVerify(t *testing.T) {
	l := newTestLUN(4096)
	for _, tc := range []struct {
		cdb  []byte
		want asc // ascNone = GOOD
	}{
		{cdb10(opVerify10, 0, 0, 1000), ascNone},
		{cdb10(opVerify10, 0x10, 999, 1), ascNone},
		{cdb10(opVerify10, 0, 999, 2), ascLBAOutOfRange},
		{cdb10(opVerify10, 0x02, 0, 1), ascInvalidFieldInCDB}, // BYTCHK=1
		{cdb10(opVerify10, 0x04, 0, 1), ascInvalidFieldInCDB}, // BYTCHK=2
		{cdb10(opVerify10, 0x20, 0, 1), ascInvalidFieldInCDB}, // VRPROTECT
		{cdb16(opVerify16, 0, 0, 1000), ascNone},
		{cdb16(opVerify16, 0, 1000, 1), ascLBAOutOfRange},
		{cdb16(opVerify16, 0, 0, 0), ascNone},
	} {
		c := newCmd(DirNone, 0, 0)
		a := run(l, c, tc.cdb...)
		if tc.want == ascNone {
			if a != ActionDone {
				t.Fatalf("% x: VERIFY did I/O", tc.cdb)
			}
			expectGood(t, c)
			continue
		}
		expectCheck(t, c, a, keyIllegalRequest, tc.want)
	}
}

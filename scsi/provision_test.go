package scsi

import (
	"encoding/binary"
	"testing"

	"vhost-target/bdev"
)

// Goal: UNMAP and WRITE SAME become the right bdev op with exact ranges,
// and every malformed parameter list gets its own sense code. Method: build
// parameter lists by hand, break one field per case.

type desc struct {
	lba    uint64
	blocks uint32
}

// unmapList builds an UNMAP parameter list.
func unmapList(ds ...desc) []byte {
	b := make([]byte, 8+16*len(ds))
	binary.BigEndian.PutUint16(b[0:2], uint16(6+16*len(ds)))
	binary.BigEndian.PutUint16(b[2:4], uint16(16*len(ds)))
	for i, d := range ds {
		binary.BigEndian.PutUint64(b[8+16*i:], d.lba)
		binary.BigEndian.PutUint32(b[16+16*i:], d.blocks)
	}
	return b
}

func unmapCmd(list []byte, listLen int) (*Cmd, []byte) {
	c := newCmd(DirOut, 0, 0)
	setData(c, list, 5) // odd segments: the list must be gathered
	return c, []byte{opUnmap, 0, 0, 0, 0, 0, 0, byte(listLen >> 8), byte(listLen), 0}
}

func TestUnmap(t *testing.T) {
	for _, bs := range blockSizes {
		l := newTestLUN(bs)
		list := unmapList(desc{0, 1}, desc{999, 1}, desc{500, 0}, desc{10, 490})
		c, cdb := unmapCmd(list, len(list))
		if a := run(l, c, cdb...); a != ActionIO || c.IO.Op != bdev.OpUnmap || c.IO.NRanges != 3 {
			t.Fatalf("action %d op %v ranges %d sense % x", a, c.IO.Op, c.IO.NRanges, c.Sense)
		}
		want := []bdev.Range{
			{Offset: 0, Len: uint64(bs)},
			{Offset: 999 * uint64(bs), Len: uint64(bs)},
			{Offset: 10 * uint64(bs), Len: 490 * uint64(bs)},
		}
		for i, r := range want {
			if c.IO.Ranges[i] != r {
				t.Fatalf("range %d: %+v, want %+v", i, c.IO.Ranges[i], r)
			}
		}
		c.CompleteIO()
		expectGood(t, c)
		if c.Resid != 0 {
			t.Fatalf("resid %d", c.Resid)
		}
		// Whole disk in one descriptor, and 32 descriptors (the maximum).
		for _, ds := range [][]desc{{{0, 1000}}, make([]desc, 32)} {
			for i := range ds {
				if ds[i].blocks == 0 {
					ds[i] = desc{uint64(i), 1}
				}
			}
			list := unmapList(ds...)
			c, cdb := unmapCmd(list, len(list))
			if a := run(l, c, cdb...); a != ActionIO || c.IO.NRanges != len(ds) {
				t.Fatalf("%d descriptors: action %d", len(ds), a)
			}
		}
		// Only zero-length descriptors, or none: GOOD without I/O.
		for _, list := range [][]byte{unmapList(desc{5, 0}), unmapList()} {
			c, cdb := unmapCmd(list, len(list))
			if a := run(l, c, cdb...); a != ActionDone {
				t.Fatal("empty UNMAP did I/O")
			}
			expectGood(t, c)
		}
		c = newCmd(DirNone, 0, 0)
		run(l, c, opUnmap, 0, 0, 0, 0, 0, 0, 0, 0, 0)
		expectGood(t, c)
	}
}

func TestUnmapErrors(t *testing.T) {
	l := newTestLUN(512)
	ok := unmapList(desc{0, 1})
	tooMany := make([]desc, 33)
	for i := range tooMany {
		tooMany[i] = desc{uint64(i), 1}
	}
	overMax := unmapList(desc{0, maxUnmapBlocks / 2}, desc{0, maxUnmapBlocks/2 + 1})
	big := NewLUN(0, testInfo(512, 1<<40))
	for _, tc := range []struct {
		name    string
		lun     *LUN
		list    []byte
		listLen int
		key     byte
		want    asc
	}{
		{"out of range", l, unmapList(desc{999, 2}), -1, keyIllegalRequest, ascLBAOutOfRange},
		{"lba past end", l, unmapList(desc{1000, 1}), -1, keyIllegalRequest, ascLBAOutOfRange},
		{"huge lba", l, unmapList(desc{1<<64 - 1, 1}), -1, keyIllegalRequest, ascLBAOutOfRange},
		{"33 descriptors", l, unmapList(tooMany...), -1, keyIllegalRequest, ascInvalidFieldInParamList},
		{"over max LBA count", big, overMax, -1, keyIllegalRequest, ascInvalidFieldInParamList},
		{"list shorter than header", l, ok[:7], 7, keyIllegalRequest, ascParamListLength},
		{"descriptors past list", l, ok, 20, keyIllegalRequest, ascParamListLength},
		{"partial descriptor", l, func() []byte { b := unmapList(desc{0, 1}); b[3] = 15; return b }(), -1,
			keyIllegalRequest, ascParamListLength},
		{"data length too small", l, func() []byte { b := unmapList(desc{0, 1}); b[1] = 5; return b }(), -1,
			keyIllegalRequest, ascParamListLength},
		{"buffer shorter than list", l, ok, 40, keyIllegalRequest, ascInvalidFieldInCDB},
	} {
		listLen := tc.listLen
		if listLen < 0 {
			listLen = len(tc.list)
		}
		c, cdb := unmapCmd(tc.list, listLen)
		t.Run(tc.name, func(t *testing.T) {
			expectCheck(t, c, run(tc.lun, c, cdb...), tc.key, tc.want)
		})
	}
	// ANCHOR.
	c, cdb := unmapCmd(ok, len(ok))
	cdb[1] = 1
	expectCheck(t, c, run(l, c, cdb...), keyIllegalRequest, ascInvalidFieldInCDB)
	// No unmap support: the opcode does not exist.
	info := testInfo(512, 1000)
	info.Unmap = false
	c, cdb = unmapCmd(ok, len(ok))
	expectCheck(t, c, run(NewLUN(0, info), c, cdb...), keyIllegalRequest, ascInvalidOpcode)
}

func writeSameCmd(ten bool, b1 byte, lba uint64, blocks uint32, block []byte) (*Cmd, []byte) {
	c := newCmd(DirNone, 0, 0)
	if block != nil {
		c.Dir = DirOut
		setData(c, block, 100)
	}
	if ten {
		return c, cdb10(opWriteSame10, b1, uint32(lba), uint16(blocks))
	}
	return c, cdb16(opWriteSame16, b1, lba, blocks)
}

func TestWriteSame(t *testing.T) {
	for _, bs := range blockSizes {
		zero := make([]byte, bs)
		pattern := make([]byte, bs)
		pattern[bs-1] = 0xA5
		noUnmap := testInfo(bs, 1000)
		noUnmap.Unmap = false
		noZeroes := testInfo(bs, 1000)
		noZeroes.UnmapZeroes = false
		for _, tc := range []struct {
			name  string
			info  *bdev.Info
			ten   bool
			b1    byte
			block []byte
			want  bdev.Op
		}{
			{"WS10 zero", nil, true, 0, zero, bdev.OpWriteZeroes},
			{"WS16 zero", nil, false, 0, zero, bdev.OpWriteZeroes},
			{"WS10 pattern", nil, true, 0, pattern, bdev.OpWriteSame},
			{"WS16 pattern", nil, false, 0, pattern, bdev.OpWriteSame},
			{"WS16 unmap zero", nil, false, 0x08, zero, bdev.OpUnmap},
			{"WS10 unmap zero", nil, true, 0x08, zero, bdev.OpUnmap},
			{"WS16 unmap pattern", nil, false, 0x08, pattern, bdev.OpWriteSame},
			{"WS16 unmap, no unmap support", noUnmap, false, 0x08, zero, bdev.OpWriteZeroes},
			{"WS16 unmap, unmap not zeroing", noZeroes, false, 0x08, zero, bdev.OpWriteZeroes},
			{"WS16 NDOB", nil, false, 0x01, nil, bdev.OpWriteZeroes},
			{"WS16 NDOB unmap", nil, false, 0x09, nil, bdev.OpUnmap},
		} {
			info := tc.info
			if info == nil {
				info = testInfo(bs, 1000)
			}
			l := NewLUN(0, info)
			c, cdb := writeSameCmd(tc.ten, tc.b1, 10, 990, tc.block)
			a := run(l, c, cdb...)
			if a != ActionIO || c.IO.Op != tc.want {
				t.Fatalf("bs %d %s: action %d op %v sense % x", bs, tc.name, a, c.IO.Op, c.Sense)
			}
			off, n := 10*uint64(bs), 990*uint64(bs)
			switch tc.want {
			case bdev.OpUnmap:
				if c.IO.NRanges != 1 || c.IO.Ranges[0] != (bdev.Range{Offset: off, Len: n}) {
					t.Fatalf("%s: ranges %v", tc.name, c.IO.Ranges[:c.IO.NRanges])
				}
			case bdev.OpWriteSame:
				if len(c.IO.Iov) != 1 || len(c.IO.Iov[0]) != int(bs) || c.IO.Iov[0][bs-1] != 0xA5 {
					t.Fatalf("%s: pattern iov", tc.name)
				}
				// The pattern lives in the Cmd, not in the shared Buf.
				clear(c.Buf)
				if c.IO.Iov[0][bs-1] != 0xA5 {
					t.Fatalf("%s: pattern points into Buf", tc.name)
				}
				fallthrough
			default:
				if c.IO.Offset != off || c.IO.Len != n {
					t.Fatalf("%s: off %d len %d", tc.name, c.IO.Offset, c.IO.Len)
				}
			}
			c.CompleteIO()
			expectGood(t, c)
			if tc.block != nil && c.Resid != 0 {
				t.Fatalf("%s: resid %d", tc.name, c.Resid)
			}
		}
	}
}

func TestWriteSameErrors(t *testing.T) {
	for _, bs := range blockSizes {
		l := newTestLUN(bs)
		zero := make([]byte, bs)
		maxWS := uint32(maxWriteSameBytes / bs)
		big := NewLUN(0, testInfo(bs, 1<<40))
		for _, tc := range []struct {
			name   string
			lun    *LUN
			ten    bool
			b1     byte
			lba    uint64
			blocks uint32
			block  []byte
			want   asc
		}{
			{"last block ok", l, false, 0, 999, 1, zero, ascNone},
			{"one past", l, false, 0, 1000, 1, zero, ascLBAOutOfRange},
			{"crossing end", l, true, 0, 999, 2, zero, ascLBAOutOfRange},
			{"zero blocks (WSNZ)", l, false, 0, 0, 0, zero, ascInvalidFieldInCDB},
			{"max length", big, false, 0, 0, maxWS, zero, ascNone},
			{"max length + 1", big, false, 0, 0, maxWS + 1, zero, ascInvalidFieldInCDB},
			{"anchor", l, false, 0x10, 0, 1, zero, ascInvalidFieldInCDB},
			{"wrprotect", l, false, 0x20, 0, 1, zero, ascInvalidFieldInCDB},
			{"WS10 pbdata", l, true, 0x04, 0, 1, zero, ascInvalidFieldInCDB},
			{"WS10 lbdata", l, true, 0x02, 0, 1, zero, ascInvalidFieldInCDB},
			{"short block", l, false, 0, 0, 1, zero[:bs-1], ascInvalidFieldInCDB},
			{"no block", l, true, 0, 0, 1, nil, ascInvalidFieldInCDB},
		} {
			c, cdb := writeSameCmd(tc.ten, tc.b1, tc.lba, tc.blocks, tc.block)
			a := run(tc.lun, c, cdb...)
			if tc.want == ascNone {
				if a != ActionIO {
					t.Fatalf("%s: refused: % x", tc.name, c.Sense)
				}
				continue
			}
			expectCheck(t, c, a, keyIllegalRequest, tc.want)
		}
		// A larger buffer than one block: the excess is residual.
		c, cdb := writeSameCmd(false, 0, 0, 4, make([]byte, 2*bs))
		if a := run(l, c, cdb...); a != ActionIO {
			t.Fatal("two-block buffer refused")
		}
		c.CompleteIO()
		if c.Resid != bs {
			t.Fatalf("resid %d", c.Resid)
		}
	}
}

package scsi

import (
	"errors"
	"testing"

	"vhost-target/bdev"
)

// Goal: no CDB, data length, direction or parameter list can panic the core
// or make it report impossible results or an IO outside the device. Method:
// run random input through Target.Execute (present and absent LUNs, both
// block sizes, read-only and unmap-less LUNs), check every invariant, then
// complete any IO with a random error and check again.

var fuzzErrors = []error{nil, bdev.ErrIO, bdev.ErrBusy, bdev.ErrRange, bdev.ErrNoSpace, bdev.ErrReadOnly,
	bdev.ErrNotSup, errors.New("other")}

func FuzzExecute(f *testing.F) {
	f.Add([]byte{opRead10, 0, 0, 0, 0, 1, 0, 0, 1, 0}, uint8(1), uint8(0), uint16(512), uint16(0), []byte(nil), uint8(0))
	f.Add([]byte{opInquiry, 1, 0x83, 0, 4, 0}, uint8(1), uint8(0), uint16(255), uint16(3), []byte(nil), uint8(0))
	f.Add(cdb16(opWriteSame16, 0x08, 0, 8), uint8(2), uint8(2), uint16(0), uint16(0), make([]byte, 512), uint8(1))
	f.Add([]byte{opUnmap, 0, 0, 0, 0, 0, 0, 0, 24, 0}, uint8(2), uint8(0), uint16(0), uint16(5),
		unmapList(desc{0, 8}), uint8(3))
	f.Add([]byte{opModeSelect10, 0x10, 0, 0, 0, 0, 0, 0, 28, 0}, uint8(2), uint8(1), uint16(0), uint16(0),
		[]byte{0, 0, 0, 0, 0, 0, 0, 0, 8, 18, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, uint8(0))
	f.Add(rsocCDB(0, true, 0, 0, 4096), uint8(1), uint8(4), uint16(4096), uint16(100), []byte(nil), uint8(0))
	f.Add(reportLUNsCDB(0, 64), uint8(1), uint8(8), uint16(64), uint16(0), []byte(nil), uint8(0))
	f.Fuzz(func(t *testing.T, cdb []byte, dirSel, flags uint8, inLen, seg uint16, out []byte, errSel uint8) {
		bs := uint32(512)
		if flags&1 != 0 {
			bs = 4096
		}
		info := testInfo(bs, 1000)
		info.ReadOnly = flags&2 != 0
		info.Unmap = flags&4 == 0
		info.UnmapZeroes = flags&16 == 0
		if flags&32 != 0 {
			info.NumBlocks = 1<<32 + 7
		}
		lunID := uint16(0)
		if flags&8 != 0 {
			lunID = 1 // absent
		}
		tg, err := NewTarget(0, []*LUN{NewLUN(0, info), NewLUN(300, info)})
		if err != nil {
			t.Fatal(err)
		}
		c := &Cmd{Buf: make([]byte, ScratchSize)}
		copy(c.CDB[:], cdb)
		switch dirSel % 3 {
		case 1:
			c.Dir = DirIn
			setData(c, make([]byte, inLen), int(seg))
		case 2:
			c.Dir = DirOut
			if len(out) > 1<<20 {
				out = out[:1<<20]
			}
			setData(c, out, int(seg))
		}
		dataLen := c.DataLen
		a := tg.Execute(lunID, c)
		check(t, c, dataLen)
		if a == ActionDone {
			return
		}
		if a != ActionIO {
			t.Fatalf("action %d", a)
		}
		checkIO(t, c, info)
		c.IO.Err = fuzzErrors[int(errSel)%len(fuzzErrors)]
		c.CompleteIO()
		check(t, c, dataLen)
	})
}

// check asserts the invariants of a finished (or IO-pending) command.
func check(t *testing.T, c *Cmd, dataLen uint32) {
	t.Helper()
	if c.DataLen != dataLen {
		t.Fatalf("DataLen changed")
	}
	if c.Resid > c.DataLen {
		t.Fatalf("resid %d > data length %d", c.Resid, c.DataLen)
	}
	if c.SenseLen > SenseSize {
		t.Fatalf("sense length %d", c.SenseLen)
	}
	switch c.Status {
	case StatusGood, StatusBusy:
		if c.SenseLen != 0 {
			t.Fatalf("status %#x with sense", c.Status)
		}
	case StatusCheckCondition:
		if c.SenseLen != SenseSize || c.Sense[0] != 0x70 || c.Sense[7] != 10 {
			t.Fatalf("bad sense % x", c.Sense)
		}
	default:
		t.Fatalf("status %#x", c.Status)
	}
}

// checkIO asserts a prepared IO lies inside the device and is well formed.
func checkIO(t *testing.T, c *Cmd, info *bdev.Info) {
	t.Helper()
	bs := uint64(info.BlockSize)
	capacity := info.NumBlocks * bs
	inside := func(off, n uint64) {
		if off%bs != 0 || n%bs != 0 || n == 0 || off >= capacity || capacity-off < n {
			t.Fatalf("op %v: range [%d,+%d) outside %d-byte device", c.IO.Op, off, n, capacity)
		}
	}
	if info.ReadOnly && c.IO.Op != bdev.OpRead && c.IO.Op != bdev.OpFlush {
		t.Fatalf("op %v on a read-only LUN", c.IO.Op)
	}
	switch c.IO.Op {
	case bdev.OpRead, bdev.OpWrite:
		inside(c.IO.Offset, c.IO.Len)
		var sum uint64
		for _, v := range c.IO.Iov {
			sum += uint64(len(v))
		}
		if sum != c.IO.Len || c.IO.Len > MaxTransferBytes {
			t.Fatalf("iov sum %d, len %d", sum, c.IO.Len)
		}
	case bdev.OpWriteSame:
		inside(c.IO.Offset, c.IO.Len)
		if len(c.IO.Iov) != 1 || uint64(len(c.IO.Iov[0])) != bs {
			t.Fatalf("write same pattern")
		}
	case bdev.OpWriteZeroes, bdev.OpFlush:
		inside(c.IO.Offset, c.IO.Len)
	case bdev.OpUnmap:
		if !info.Unmap || c.IO.NRanges < 1 || c.IO.NRanges > bdev.MaxRanges {
			t.Fatalf("unmap with %d ranges (unmap %v)", c.IO.NRanges, info.Unmap)
		}
		for _, r := range c.IO.Ranges[:c.IO.NRanges] {
			inside(r.Offset, r.Len)
		}
	default:
		t.Fatalf("op %v", c.IO.Op)
	}
}

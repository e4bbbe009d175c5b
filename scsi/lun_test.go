package scsi

import (
	"bytes"
	"encoding/binary"
	"testing"

	"vhost-target/bdev"
)

// Goal: LUN construction checks its geometry and degenerate geometries stay
// safe. Method: construct edge LUNs and run commands against them.

func TestNewLUN(t *testing.T) {
	info := testInfo(4096, 10)
	l := NewLUN(42, info)
	if l.ID() != 42 || l.Info() != info {
		t.Fatal("accessors")
	}
	for _, bad := range []*bdev.Info{nil, {BlockSize: 0}, {BlockSize: 256}, {BlockSize: 1000}, {BlockSize: 8192}} {
		func() {
			defer func() {
				if recover() == nil {
					t.Fatalf("NewLUN(%+v) did not panic", bad)
				}
			}()
			NewLUN(0, bad)
		}()
	}
	for _, bs := range []uint32{1024, 2048} {
		NewLUN(0, testInfo(bs, 10))
	}
}

func TestEmptyDevice(t *testing.T) {
	l := NewLUN(0, testInfo(512, 0))
	d := exec(t, l, 8, opReadCapacity10, 0, 0, 0, 0, 0, 0, 0, 0, 0)
	if binary.BigEndian.Uint32(d[0:4]) != 0 {
		t.Fatalf("RC10 % x", d)
	}
	for _, cdb := range [][]byte{cdb10(opRead10, 0, 0, 1), cdb10(opRead10, 0, 0, 0), cdb10(opSyncCache10, 0, 0, 0)} {
		c := newCmd(DirIn, 512, 0)
		expectCheck(t, c, run(l, c, cdb...), keyIllegalRequest, ascLBAOutOfRange)
	}
}

func TestHugeDeviceClamped(t *testing.T) {
	// NumBlocks beyond what byte offsets can express is clamped, so
	// Offset = lba*blockSize never overflows.
	l := NewLUN(0, testInfo(4096, 1<<63))
	c := newCmd(DirIn, 4096, 0)
	last := uint64(1<<52 - 2) // numBlocks is (2^64-1) >> 12 = 2^52-1
	if a := run(l, c, cdb16(opRead16, 0, last, 1)...); a != ActionIO || c.IO.Offset != last<<12 {
		t.Fatalf("last block: action %d offset %d", a, c.IO.Offset)
	}
	c = newCmd(DirIn, 4096, 0)
	expectCheck(t, c, run(l, c, cdb16(opRead16, 0, last+1, 1)...), keyIllegalRequest, ascLBAOutOfRange)
}

func TestModeSelectLongDescriptor(t *testing.T) {
	l := NewLUN(0, testInfo(4096, 1<<33))
	sense := exec(t, l, 255, modeSense10(0x08, 0, false, true, 255)...)
	sense[0], sense[1] = 0, 0
	c, cdb := modeSelectCmd(true, sense)
	run(l, c, cdb...)
	expectGood(t, c)
	// Block count zero means "unchanged".
	zeroed := bytes.Clone(sense)
	clear(zeroed[8:16])
	c, cdb = modeSelectCmd(true, zeroed)
	run(l, c, cdb...)
	expectGood(t, c)
	// A different count is a resize we do not do.
	bad := bytes.Clone(sense)
	bad[15]++
	c, cdb = modeSelectCmd(true, bad)
	expectCheck(t, c, run(l, c, cdb...), keyIllegalRequest, ascInvalidFieldInParamList)
	// A long descriptor with the wrong length.
	bad = bytes.Clone(sense)
	bad[7] = 8
	c, cdb = modeSelectCmd(true, bad)
	expectCheck(t, c, run(l, c, cdb...), keyIllegalRequest, ascInvalidFieldInParamList)
	// A subpage-format page.
	list := append(make([]byte, 8), 0x48, 0x01, 0, 2, 0, 0)
	c, cdb = modeSelectCmd(true, list)
	expectCheck(t, c, run(l, c, cdb...), keyIllegalRequest, ascInvalidFieldInParamList)
}

func TestWriteSame16ReservedBits(t *testing.T) {
	l := newTestLUN(512)
	c, cdb := writeSameCmd(false, 0x02, 0, 1, make([]byte, 512))
	expectCheck(t, c, run(l, c, cdb...), keyIllegalRequest, ascInvalidFieldInCDB)
}

func TestAbsentLUNWrongDirection(t *testing.T) {
	tg := mustTarget(t, 1)
	for _, cdb := range [][]byte{reportLUNsCDB(0, 64), {opRequestSense, 0, 0, 0, 18, 0}} {
		c := newCmd(DirOut, 64, 0)
		setCDB(c, cdb...)
		expectCheck(t, c, tg.Execute(0, c), keyIllegalRequest, ascInvalidFieldInCDB)
	}
}

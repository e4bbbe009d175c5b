package scsi

import (
	"bytes"
	"encoding/binary"
	"testing"

	"vhost-target/bdev"
)

// Test method throughout this package: build a LUN over a bdev.Info (no bdev
// is needed, the core is pure), run one CDB through Execute with the data
// buffers a transport would pass, and check the exact status, sense bytes,
// data-in bytes, Resid and prepared bdev.IO.

var testUUID = [16]byte{0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0x4d, 0xef, 0x80, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77}

// blockSizes are the two logical block sizes every geometry test runs with.
var blockSizes = []uint32{512, 4096}

// testInfo returns the Info of a writable disk of blocks blocks.
func testInfo(bs uint32, blocks uint64) *bdev.Info {
	return &bdev.Info{Name: "test", Type: "malloc", BlockSize: bs, NumBlocks: blocks, UUID: testUUID,
		Unmap: true, UnmapZeroes: true, WriteZeroes: true, WriteCache: true, OptimalIOBlocks: 8}
}

// newTestLUN returns LUN 0 over a 1000-block disk.
func newTestLUN(bs uint32) *LUN { return NewLUN(0, testInfo(bs, 1000)) }

// newCmd returns a Cmd with a data buffer of n bytes in direction dir, split
// into segments of at most seg bytes (seg 0: one segment).
func newCmd(dir Dir, n int, seg int) *Cmd {
	c := &Cmd{Buf: make([]byte, ScratchSize), Dir: dir}
	if dir == DirNone {
		return c
	}
	setData(c, make([]byte, n), seg)
	return c
}

// setData splits buf into c.Data segments of at most seg bytes.
func setData(c *Cmd, buf []byte, seg int) {
	c.Data = c.Data[:0]
	c.DataLen = uint32(len(buf))
	if seg <= 0 {
		seg = len(buf)
	}
	for len(buf) > 0 {
		k := min(seg, len(buf))
		c.Data = append(c.Data, buf[:k])
		buf = buf[k:]
	}
}

// setCDB sets the CDB of c to b.
func setCDB(c *Cmd, b ...byte) {
	c.CDB = [32]byte{}
	copy(c.CDB[:], b)
}

// dataIn returns the bytes transferred into c.Data (DataLen - Resid).
func dataIn(c *Cmd) []byte {
	var out []byte
	for _, d := range c.Data {
		out = append(out, d...)
	}
	return out[:c.DataLen-c.Resid]
}

// exec runs cdb on l with a data-in buffer of n bytes and expects GOOD
// completion without I/O; it returns the data transferred.
func exec(t *testing.T, l *LUN, n int, cdb ...byte) []byte {
	t.Helper()
	c := newCmd(DirIn, n, 0)
	setCDB(c, cdb...)
	if a := l.Execute(c); a != ActionDone {
		t.Fatalf("cdb % x: action %d, want done", cdb, a)
	}
	expectGood(t, c)
	return dataIn(c)
}

func expectGood(t *testing.T, c *Cmd) {
	t.Helper()
	if c.Status != StatusGood || c.SenseLen != 0 {
		t.Fatalf("cdb % x: status %#x sense % x, want GOOD", c.CDB[:16], c.Status, c.Sense[:c.SenseLen])
	}
}

// expectCheck checks c ended in CHECK CONDITION with the given sense.
func expectCheck(t *testing.T, c *Cmd, a Action, key byte, code asc) {
	t.Helper()
	if a != ActionDone {
		t.Fatalf("cdb % x: action %d, want done", c.CDB[:16], a)
	}
	if c.Status != StatusCheckCondition || c.SenseLen != SenseSize {
		t.Fatalf("cdb % x: status %#x senselen %d, want CHECK CONDITION", c.CDB[:16], c.Status, c.SenseLen)
	}
	want := make([]byte, SenseSize)
	want[0], want[2], want[7], want[12], want[13] = 0x70, key, 10, byte(code>>8), byte(code)
	if !bytes.Equal(c.Sense[:], want) {
		t.Fatalf("cdb % x: sense % x, want % x", c.CDB[:16], c.Sense[:], want)
	}
	if c.Resid != c.DataLen {
		t.Fatalf("cdb % x: resid %d after CHECK CONDITION, want %d", c.CDB[:16], c.Resid, c.DataLen)
	}
}

// run executes cdb on l with c and returns the action.
func run(l *LUN, c *Cmd, cdb ...byte) Action {
	setCDB(c, cdb...)
	return l.Execute(c)
}

// CDB builders.

func cdb10(op byte, b1 byte, lba uint32, n uint16) []byte {
	b := make([]byte, 10)
	b[0], b[1] = op, b1
	binary.BigEndian.PutUint32(b[2:6], lba)
	binary.BigEndian.PutUint16(b[7:9], n)
	return b
}

func cdb12(op byte, b1 byte, lba uint32, n uint32) []byte {
	b := make([]byte, 12)
	b[0], b[1] = op, b1
	binary.BigEndian.PutUint32(b[2:6], lba)
	binary.BigEndian.PutUint32(b[6:10], n)
	return b
}

func cdb16(op byte, b1 byte, lba uint64, n uint32) []byte {
	b := make([]byte, 16)
	b[0], b[1] = op, b1
	binary.BigEndian.PutUint64(b[2:10], lba)
	binary.BigEndian.PutUint32(b[10:14], n)
	return b
}

func cdb6(op byte, lba uint32, n byte) []byte {
	return []byte{op, byte(lba>>16) & 0x1F, byte(lba >> 8), byte(lba), n, 0}
}

func inquiryCDB(evpd bool, page byte, alloc uint16) []byte {
	b := []byte{opInquiry, 0, page, byte(alloc >> 8), byte(alloc), 0}
	if evpd {
		b[1] = 1
	}
	return b
}

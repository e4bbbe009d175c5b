package blk

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"vhost-target/bdev"
)

func hdr(typ uint32, sector uint64) []byte {
	b := make([]byte, HeaderSize)
	binary.LittleEndian.PutUint32(b[0:], typ)
	binary.LittleEndian.PutUint64(b[8:], sector)
	return b
}

func seg(sector uint64, num, flags uint32) []byte {
	b := make([]byte, segmentSize)
	binary.LittleEndian.PutUint64(b[0:], sector)
	binary.LittleEndian.PutUint32(b[8:], num)
	binary.LittleEndian.PutUint32(b[12:], flags)
	return b
}

func disk(bs uint32, blocks uint64, mod func(*bdev.Info)) *Disk {
	info := &bdev.Info{Name: "d", BlockSize: bs, NumBlocks: blocks, Unmap: true, WriteZeroes: true,
		UUID: [16]byte{0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6, 7, 8}}
	if mod != nil {
		mod(info)
	}
	return NewDisk(info, false)
}

func newReq() *Request { return &Request{Iov: make([][]byte, 0, 8)} }

// TestPrepare drives the decoder through each request type and each way a
// request can be malformed; every case checks the action, the error, the
// status and what would be submitted.
func TestPrepare(t *testing.T) {
	d512 := disk(512, 2048, nil) // 1 MiB
	d4k := disk(4096, 256, nil)  // 1 MiB
	ro := NewDisk(d512.Info(), true)
	noDiscard := disk(512, 2048, func(i *bdev.Info) { i.Unmap, i.WriteZeroes = false, false })
	cat := func(bs ...[]byte) []byte { return bytes.Join(bs, nil) }
	for _, tc := range []struct {
		name   string
		d      *Disk
		rd, wr [][]byte
		act    Action
		err    error
		status byte // after Complete with no IO error, or as answered
		op     bdev.Op
		off    uint64
		n      uint64 // IO length, or ranges for unmap
		used   uint32 // Finish's length
	}{
		{name: "read", d: d512, rd: [][]byte{hdr(TypeIn, 8)}, wr: [][]byte{make([]byte, 4096), {0xff}},
			act: Submit, op: bdev.OpRead, off: 4096, n: 4096, used: 4097},
		{name: "read, status in the data's segment", d: d512, rd: [][]byte{hdr(TypeIn, 0)}, wr: [][]byte{make([]byte, 1025)},
			act: Submit, op: bdev.OpRead, n: 1024, used: 1025},
		{name: "read, header split", d: d512, rd: [][]byte{hdr(TypeIn, 2)[:8], hdr(TypeIn, 2)[8:]}, wr: [][]byte{make([]byte, 512), {0}},
			act: Submit, op: bdev.OpRead, off: 1024, n: 512, used: 513},
		{name: "read of nothing", d: d512, rd: [][]byte{hdr(TypeIn, 0)}, wr: [][]byte{{0}}, used: 1},
		{name: "write", d: d512, rd: [][]byte{hdr(TypeOut, 1), make([]byte, 512), make([]byte, 1024)}, wr: [][]byte{{0}},
			act: Submit, op: bdev.OpWrite, off: 512, n: 1536, used: 1},
		{name: "write, data after the header in its segment", d: d512, rd: [][]byte{cat(hdr(TypeOut, 0), make([]byte, 512))}, wr: [][]byte{{0}},
			act: Submit, op: bdev.OpWrite, n: 512, used: 1},
		{name: "write, read-only", d: ro, rd: [][]byte{hdr(TypeOut, 0), make([]byte, 512)}, wr: [][]byte{{0}},
			err: ErrReadOnly, status: StatusIOErr, used: 1},
		{name: "read, read-only", d: ro, rd: [][]byte{hdr(TypeIn, 0)}, wr: [][]byte{make([]byte, 512), {0}},
			act: Submit, op: bdev.OpRead, n: 512, used: 513},
		{name: "4k: aligned", d: d4k, rd: [][]byte{hdr(TypeIn, 8)}, wr: [][]byte{make([]byte, 8192), {0}},
			act: Submit, op: bdev.OpRead, off: 4096, n: 8192, used: 8193},
		{name: "4k: sector not aligned", d: d4k, rd: [][]byte{hdr(TypeIn, 1)}, wr: [][]byte{make([]byte, 4096), {0}},
			err: ErrAlign, status: StatusIOErr, used: 1}, // nothing written but the status
		{name: "4k: length not aligned", d: d4k, rd: [][]byte{hdr(TypeOut, 8), make([]byte, 512)}, wr: [][]byte{{0}},
			err: ErrAlign, status: StatusIOErr, used: 1},
		{name: "512: length not a sector", d: d512, rd: [][]byte{hdr(TypeOut, 8), make([]byte, 100)}, wr: [][]byte{{0}},
			err: ErrAlign, status: StatusIOErr, used: 1},
		{name: "past the end", d: d512, rd: [][]byte{hdr(TypeIn, 2047)}, wr: [][]byte{make([]byte, 1024), {0}},
			err: ErrRange, status: StatusIOErr, used: 1},
		{name: "last sector", d: d512, rd: [][]byte{hdr(TypeIn, 2047)}, wr: [][]byte{make([]byte, 512), {0}},
			act: Submit, op: bdev.OpRead, off: 2047 * 512, n: 512, used: 513},
		{name: "sector overflowing the offset", d: d512, rd: [][]byte{hdr(TypeIn, 1<<62)}, wr: [][]byte{make([]byte, 512), {0}},
			err: ErrRange, status: StatusIOErr, used: 1},
		{name: "short header", d: d512, rd: [][]byte{hdr(TypeIn, 0)[:15]}, wr: [][]byte{{0}},
			err: ErrShortHdr, status: StatusIOErr, used: 1},
		{name: "no status byte", d: d512, rd: [][]byte{hdr(TypeOut, 0)}, wr: [][]byte{{}},
			err: ErrNoStatus, used: 0},
		{name: "too many segments", d: d512, rd: [][]byte{hdr(TypeIn, 0)},
			wr: [][]byte{make([]byte, 512), make([]byte, 512), make([]byte, 512), make([]byte, 512), make([]byte, 512),
				make([]byte, 512), make([]byte, 512), make([]byte, 512), make([]byte, 512), {0}},
			err: ErrTooMany, status: StatusIOErr, used: 1},
		{name: "unknown type", d: d512, rd: [][]byte{hdr(99, 0)}, wr: [][]byte{{0}}, err: ErrUnsupp, status: StatusUnsupp, used: 1},
		{name: "flush", d: d512, rd: [][]byte{hdr(TypeFlush, 0)}, wr: [][]byte{{0}}, act: Submit, op: bdev.OpFlush, used: 1},
		{name: "flush, read-only", d: ro, rd: [][]byte{hdr(TypeFlush, 0)}, wr: [][]byte{{0}}, act: Submit, op: bdev.OpFlush, used: 1},
		{name: "get id", d: d512, rd: [][]byte{hdr(TypeGetID, 0)}, wr: [][]byte{make([]byte, 20), {0}}, used: 21},
		{name: "get id, short buffer", d: d512, rd: [][]byte{hdr(TypeGetID, 0)}, wr: [][]byte{make([]byte, 5), make([]byte, 4), {0}}, used: 10},
		{name: "discard", d: d512, rd: [][]byte{hdr(TypeDiscard, 0), cat(seg(0, 8, 0), seg(100, 16, 0))}, wr: [][]byte{{0}},
			act: Submit, op: bdev.OpUnmap, n: 2, used: 1},
		{name: "discard, segment split", d: d512, rd: [][]byte{hdr(TypeDiscard, 0), seg(4, 4, 0)[:5], seg(4, 4, 0)[5:]}, wr: [][]byte{{0}},
			act: Submit, op: bdev.OpUnmap, n: 1, used: 1},
		{name: "discard with the unmap flag", d: d512, rd: [][]byte{hdr(TypeDiscard, 0), seg(0, 8, flagUnmap)}, wr: [][]byte{{0}},
			err: ErrFlags, status: StatusUnsupp, used: 1},
		{name: "discard of 0 sectors", d: d512, rd: [][]byte{hdr(TypeDiscard, 0), seg(0, 0, 0)}, wr: [][]byte{{0}},
			err: ErrSegments, status: StatusIOErr, used: 1},
		{name: "discard, no segment", d: d512, rd: [][]byte{hdr(TypeDiscard, 0)}, wr: [][]byte{{0}},
			err: ErrSegments, status: StatusIOErr, used: 1},
		{name: "discard, partial segment", d: d512, rd: [][]byte{hdr(TypeDiscard, 0), seg(0, 8, 0)[:12]}, wr: [][]byte{{0}},
			err: ErrSegments, status: StatusIOErr, used: 1},
		{name: "discard past the end", d: d512, rd: [][]byte{hdr(TypeDiscard, 0), seg(2040, 16, 0)}, wr: [][]byte{{0}},
			err: ErrRange, status: StatusIOErr, used: 1},
		{name: "4k: discard not aligned", d: d4k, rd: [][]byte{hdr(TypeDiscard, 0), seg(4, 8, 0)}, wr: [][]byte{{0}},
			err: ErrAlign, status: StatusIOErr, used: 1},
		{name: "discard unsupported", d: noDiscard, rd: [][]byte{hdr(TypeDiscard, 0), seg(0, 8, 0)}, wr: [][]byte{{0}},
			err: ErrUnsupp, status: StatusUnsupp, used: 1},
		{name: "discard, read-only", d: ro, rd: [][]byte{hdr(TypeDiscard, 0), seg(0, 8, 0)}, wr: [][]byte{{0}},
			err: ErrReadOnly, status: StatusIOErr, used: 1},
		{name: "write zeroes", d: d512, rd: [][]byte{hdr(TypeWriteZeroes, 0), seg(16, 32, flagUnmap)}, wr: [][]byte{{0}},
			act: Submit, op: bdev.OpWriteZeroes, off: 16 * 512, n: 32 * 512, used: 1},
		{name: "write zeroes, two segments", d: d512, rd: [][]byte{hdr(TypeWriteZeroes, 0), cat(seg(0, 8, 0), seg(8, 8, 0))}, wr: [][]byte{{0}},
			err: ErrSegments, status: StatusIOErr, used: 1},
		{name: "write zeroes, unknown flag", d: d512, rd: [][]byte{hdr(TypeWriteZeroes, 0), seg(0, 8, 2)}, wr: [][]byte{{0}},
			err: ErrFlags, status: StatusUnsupp, used: 1},
		{name: "write zeroes unsupported", d: noDiscard, rd: [][]byte{hdr(TypeWriteZeroes, 0), seg(0, 8, 0)}, wr: [][]byte{{0}},
			err: ErrUnsupp, status: StatusUnsupp, used: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newReq()
			act, err := tc.d.Prepare(r, tc.rd, tc.wr)
			if act != tc.act || !errors.Is(err, tc.err) {
				t.Fatalf("Prepare = %v, %v; want %v, %v", act, err, tc.act, tc.err)
			}
			if act == Submit {
				if r.IO.Op != tc.op {
					t.Fatalf("op %v, want %v", r.IO.Op, tc.op)
				}
				switch tc.op {
				case bdev.OpUnmap:
					if uint64(r.IO.NRanges) != tc.n {
						t.Fatalf("%d ranges, want %d", r.IO.NRanges, tc.n)
					}
				case bdev.OpRead, bdev.OpWrite:
					var n uint64
					for _, s := range r.IO.Iov {
						n += uint64(len(s))
					}
					if r.IO.Offset != tc.off || r.IO.Len != tc.n || n != tc.n {
						t.Fatalf("IO at %d, %d bytes (%d in Iov); want %d, %d", r.IO.Offset, r.IO.Len, n, tc.off, tc.n)
					}
				case bdev.OpWriteZeroes:
					if r.IO.Offset != tc.off || r.IO.Len != tc.n {
						t.Fatalf("IO at %d, %d bytes; want %d, %d", r.IO.Offset, r.IO.Len, tc.off, tc.n)
					}
				}
				r.Complete() // IO.Err nil
			}
			used := r.Finish()
			if used != tc.used {
				t.Fatalf("used length %d, want %d", used, tc.used)
			}
			if tc.err == ErrNoStatus {
				return
			}
			lastSeg := tc.wr[len(tc.wr)-1]
			if got := lastSeg[len(lastSeg)-1]; got != tc.status {
				t.Fatalf("status byte %d, want %d", got, tc.status)
			}
		})
	}
}

// TestGetID: the ID is the UUID's first 20 hex digits, the same for every
// Disk over the same bdev, and a short buffer gets its first bytes.
func TestGetID(t *testing.T) {
	d := disk(512, 8, nil)
	want := "123456789abcdef00102"
	if id := d.ID(); string(id[:]) != want {
		t.Fatalf("ID %q, want %q", id, want)
	}
	r := newReq()
	a, b := make([]byte, 5), make([]byte, 4)
	d.Prepare(r, [][]byte{hdr(TypeGetID, 0)}, [][]byte{a, b, {9}})
	if r.Finish(); string(a)+string(b) != want[:9] {
		t.Fatalf("short GET_ID %q%q", a, b)
	}
}

// TestDiscardRanges: each segment becomes one range, in bytes.
func TestDiscardRanges(t *testing.T) {
	d := disk(512, 2048, nil)
	r := newReq()
	rd := [][]byte{hdr(TypeDiscard, 0), bytes.Join([][]byte{seg(0, 8, 0), seg(100, 16, 0)}, nil)}
	if act, err := d.Prepare(r, rd, [][]byte{{0}}); act != Submit || err != nil {
		t.Fatal(act, err)
	}
	want := []bdev.Range{{Offset: 0, Len: 4096}, {Offset: 51200, Len: 8192}}
	for i, w := range want {
		if r.IO.Ranges[i] != w {
			t.Fatalf("range %d: %+v, want %+v", i, r.IO.Ranges[i], w)
		}
	}
	if l := d.Limits(); l.MaxDiscardSeg != bdev.MaxRanges || l.DiscardSectorAlignment != 1 || l.MaxWriteZeroesSeg != 1 {
		t.Fatalf("limits %+v", l)
	}
	if l := disk(4096, 8, nil).Limits(); l.DiscardSectorAlignment != 8 {
		t.Fatalf("4k limits %+v", l)
	}
}

// TestComplete maps IO errors to statuses.
func TestComplete(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want byte
	}{{nil, StatusOK}, {bdev.ErrIO, StatusIOErr}, {bdev.ErrRange, StatusIOErr}, {bdev.ErrNotSup, StatusUnsupp}} {
		r := newReq()
		r.IO.Err = tc.err
		r.Complete()
		if r.Status != tc.want {
			t.Errorf("%v: status %d, want %d", tc.err, r.Status, tc.want)
		}
	}
}

// TestNoAllocs: decoding, completing and finishing a request allocate
// nothing.
func TestNoAllocs(t *testing.T) {
	d := disk(512, 2048, nil)
	r := newReq()
	rd := [][]byte{hdr(TypeIn, 8)}
	wr := [][]byte{make([]byte, 4096), {0}}
	drd := [][]byte{hdr(TypeDiscard, 0), seg(0, 8, 0)}
	st := [][]byte{{0}}
	if n := testing.AllocsPerRun(1000, func() {
		d.Prepare(r, rd, wr)
		r.Complete()
		r.Finish()
		d.Prepare(r, drd, st)
		r.Complete()
		r.Finish()
	}); n != 0 {
		t.Fatalf("%v allocations per request", n)
	}
}

// FuzzPrepare: any segments decode without a panic, a submitted IO stays
// inside the disk, and the used length never exceeds the writable bytes.
func FuzzPrepare(f *testing.F) {
	f.Add(hdr(TypeIn, 8), uint16(4097), uint8(2))
	f.Add(append(hdr(TypeOut, 1), make([]byte, 512)...), uint16(1), uint8(1))
	f.Add(append(hdr(TypeDiscard, 0), seg(0, 8, 0)...), uint16(1), uint8(1))
	f.Add(append(hdr(TypeWriteZeroes, 0), seg(0, 8, 1)...), uint16(1), uint8(3))
	f.Add(hdr(TypeGetID, 0), uint16(21), uint8(2))
	d := disk(4096, 64, nil)
	r := &Request{Iov: make([][]byte, 0, 4)}
	f.Fuzz(func(t *testing.T, readable []byte, writable uint16, parts uint8) {
		// Split the readable bytes and the writable length into parts.
		np := int(parts%6) + 1
		var rd, wr [][]byte
		for i := 0; i < np; i++ {
			a, b := len(readable)*i/np, len(readable)*(i+1)/np
			rd = append(rd, readable[a:b])
			wa, wb := int(writable)*i/np, int(writable)*(i+1)/np
			wr = append(wr, make([]byte, wb-wa))
		}
		act, _ := d.Prepare(r, rd, wr)
		if act == Submit {
			size := d.Info().NumBlocks * uint64(d.Info().BlockSize)
			if r.IO.Op != bdev.OpUnmap && r.IO.Op != bdev.OpFlush && (r.IO.Offset+r.IO.Len > size || r.IO.Offset%4096 != 0 || r.IO.Len%4096 != 0) {
				t.Fatalf("IO %v at %d, %d bytes on a %d-byte disk", r.IO.Op, r.IO.Offset, r.IO.Len, size)
			}
			for i := 0; i < r.IO.NRanges; i++ {
				if g := r.IO.Ranges[i]; g.Offset+g.Len > size {
					t.Fatalf("range %+v on a %d-byte disk", g, size)
				}
			}
			r.Complete()
		}
		if used := r.Finish(); used > uint32(writable) {
			t.Fatalf("used length %d with %d writable bytes", used, writable)
		}
	})
}

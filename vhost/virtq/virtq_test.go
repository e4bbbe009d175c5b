// Goal: Pop resolves every well-formed chain shape exactly and rejects each malformation with its own error;
// Push/Publish/SetNotification follow the split-ring protocol (batching, wrap-around, EVENT_IDX); the I/O path
// does not allocate. Method: a driver-side mock (virtqtest) builds rings in byte-slice guest memory; each
// malformation test starts from a valid chain and breaks one thing.
package virtq_test

import (
	"errors"
	"math"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"vhost-target/vhost/dirtylog"
	"vhost-target/vhost/guestmem"
	"vhost-target/vhost/virtq"
	vt "vhost-target/vhost/virtq/virtqtest"
)

func newQueue(t testing.TB, d *vt.Driver) *virtq.Queue {
	t.Helper()
	q, err := virtq.New(d.Table, d.Config())
	if err != nil {
		t.Fatal(err)
	}
	return q
}

func mustPop(t testing.TB, q *virtq.Queue, c *virtq.Chain) {
	t.Helper()
	ok, err := q.Pop(c)
	if err != nil || !ok {
		t.Fatalf("Pop = %v, %v; want a chain", ok, err)
	}
}

func mustEmpty(t testing.TB, q *virtq.Queue) {
	t.Helper()
	var c virtq.Chain
	if ok, err := q.Pop(&c); ok || err != nil {
		t.Fatalf("Pop on an empty ring = %v, %v", ok, err)
	}
}

// same reports whether a and b are the same host bytes.
func same(a, b []byte) bool { return len(a) == len(b) && (len(a) == 0 || &a[0] == &b[0]) }

func TestPopDirect(t *testing.T) {
	d := vt.New(8, 1<<16)
	q := newQueue(t, d)
	mustEmpty(t, q)
	req := d.Alloc(19, 'r')
	resp := d.Alloc(96, 0)
	head := d.Add(vt.Desc{Addr: req, Len: 19}, vt.Desc{Addr: resp, Len: 96, Flags: vt.FWrite})
	if !q.HasAvail() {
		t.Fatal("HasAvail false with a chain waiting")
	}
	var c virtq.Chain
	mustPop(t, q, &c)
	if c.Head != head || c.NRead != 1 || c.NWrite != 1 || c.ReadLen != 19 || c.WriteLen != 96 || c.NDesc != 2 {
		t.Fatalf("chain %+v", c)
	}
	if !same(c.Readable()[0], d.Bytes(req, 19)) || !same(c.Writable()[0], d.Bytes(resp, 96)) {
		t.Fatal("segments are not the guest buffers")
	}
	if cap(c.Readable()[0]) != 19 {
		t.Fatal("segment capacity reaches past the buffer")
	}
	mustEmpty(t, q)
	if q.HasAvail() || q.LastAvail() != 1 {
		t.Fatalf("HasAvail %v, LastAvail %d", q.HasAvail(), q.LastAvail())
	}
}

func TestPopMultiSegment(t *testing.T) {
	d := vt.New(16, 1<<16)
	q := newQueue(t, d)
	var descs []vt.Desc
	for i := range 5 {
		flags := uint16(0)
		if i >= 3 {
			flags = vt.FWrite
		}
		descs = append(descs, vt.Desc{Addr: d.Alloc(100+i, byte(i)), Len: uint32(100 + i), Flags: flags})
	}
	d.Add(descs...)
	var c virtq.Chain
	mustPop(t, q, &c)
	if c.NRead != 3 || c.NWrite != 2 || c.ReadLen != 100+101+102 || c.WriteLen != 103+104 || c.NDesc != 5 {
		t.Fatalf("chain %+v", c)
	}
	for i, s := range append(c.Readable(), c.Writable()...) {
		if !same(s, d.Bytes(descs[i].Addr, int(descs[i].Len))) {
			t.Fatalf("segment %d wrong", i)
		}
	}
}

func TestPopSplitAcrossRegions(t *testing.T) {
	d := vt.New(8, 1<<16)
	q := newQueue(t, d)
	// A readable buffer straddling the region-0/region-1 boundary, then a writable one inside region 1.
	d.Add(vt.Desc{Addr: d.Boundary - 8, Len: 24}, vt.Desc{Addr: d.Alloc(512, 0), Len: 512, Flags: vt.FWrite})
	var c virtq.Chain
	mustPop(t, q, &c)
	if c.NRead != 2 || c.NWrite != 1 || c.ReadLen != 24 {
		t.Fatalf("chain %+v", c)
	}
	if !same(c.Segs[0], d.Bytes(d.Boundary-8, 8)) || !same(c.Segs[1], d.Bytes(d.Boundary, 16)) {
		t.Fatal("split segments wrong")
	}
}

func TestPopIndirect(t *testing.T) {
	d := vt.New(8, 1<<16)
	d.Features.Indirect = true
	q := newQueue(t, d)
	a, b, w := d.Alloc(51, 1), d.Alloc(4096, 2), d.Alloc(96, 0)
	head := d.AddIndirect(nil, []vt.Desc{{Addr: a, Len: 51}, {Addr: b, Len: 4096}, {Addr: w, Len: 96, Flags: vt.FWrite}})
	var c virtq.Chain
	mustPop(t, q, &c)
	if c.Head != head || c.NRead != 2 || c.NWrite != 1 || c.ReadLen != 51+4096 || c.WriteLen != 96 || c.NDesc != 4 {
		t.Fatalf("chain %+v", c)
	}
	if !same(c.Segs[1], d.Bytes(b, 4096)) || !same(c.Segs[2], d.Bytes(w, 96)) {
		t.Fatal("indirect segments wrong")
	}
}

// TestPopDirectThenIndirect: virtio 1.2 §2.7.5.3.2, the device MUST handle zero or more normal chained
// descriptors followed by one indirect descriptor; the WRITE flag of the indirect descriptor is ignored.
func TestPopDirectThenIndirect(t *testing.T) {
	d := vt.New(8, 1<<16)
	d.Features.Indirect = true
	q := newQueue(t, d)
	hdr, data, resp := d.Alloc(51, 1), d.Alloc(512, 2), d.Alloc(108, 0)
	tbl := d.Scratch(32)
	d.WriteTable(tbl, vt.Chain(0, vt.Desc{Addr: data, Len: 512}, vt.Desc{Addr: resp, Len: 108, Flags: vt.FWrite}))
	d.Add(vt.Desc{Addr: hdr, Len: 51}, vt.Desc{Addr: tbl, Len: 32, Flags: vt.FIndirect | vt.FWrite})
	var c virtq.Chain
	mustPop(t, q, &c)
	if c.NRead != 2 || c.NWrite != 1 || c.ReadLen != 51+512 || c.WriteLen != 108 || c.NDesc != 4 {
		t.Fatalf("chain %+v", c)
	}
	if !same(c.Segs[0], d.Bytes(hdr, 51)) || !same(c.Segs[1], d.Bytes(data, 512)) || !same(c.Segs[2], d.Bytes(resp, 108)) {
		t.Fatal("segments wrong")
	}
	// The chain inside an indirect table starts at entry 0 and follows next links, skipping unused entries.
	tbl = d.Scratch(48)
	d.WriteTable(tbl, []vt.Desc{{Addr: data, Len: 512, Flags: vt.FNext, Next: 2}, {Addr: 1, Len: 1},
		{Addr: resp, Len: 108, Flags: vt.FWrite}})
	d.Add(vt.Desc{Addr: tbl, Len: 48, Flags: vt.FIndirect})
	mustPop(t, q, &c)
	if c.NRead != 1 || c.NWrite != 1 || c.NDesc != 3 || !same(c.Segs[1], d.Bytes(resp, 108)) {
		t.Fatalf("chain %+v", c)
	}
}

// sparse maps n bytes of anonymous memory that is never touched (for buffers of gigabytes).
func sparse(t *testing.T, n int) []byte {
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANON|unix.MAP_NORESERVE)
	if err != nil {
		t.Skipf("mmap %d sparse bytes: %v", n, err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

// TestMalformed builds one bad chain per case, checks the exact error and that the head can be completed and
// the queue goes on serving the next (valid) chain.
func TestMalformed(t *testing.T) {
	type build func(d *vt.Driver) (head uint16)
	buf := func(d *vt.Driver) uint64 { return d.Alloc(64, 0) }
	cases := []struct {
		name     string
		indirect bool
		data     []byte // region 1 backing; nil: 64 KiB
		build    build
		want     error
		cause    error // guestmem error expected under the virtq one
	}{
		{"next out of range", false, nil, func(d *vt.Driver) uint16 {
			d.SetDesc(0, vt.Desc{Addr: buf(d), Len: 64, Flags: vt.FNext, Next: 8})
			d.Expose(0)
			return 0
		}, virtq.ErrDescIndex, nil},
		{"loop", false, nil, func(d *vt.Driver) uint16 {
			b := buf(d)
			d.SetDesc(0, vt.Desc{Addr: b, Len: 64, Flags: vt.FNext, Next: 1})
			d.SetDesc(1, vt.Desc{Addr: b, Len: 64, Flags: vt.FNext, Next: 0})
			d.Expose(0)
			return 0
		}, virtq.ErrChainLoop, nil},
		{"self loop", false, nil, func(d *vt.Driver) uint16 {
			d.SetDesc(3, vt.Desc{Addr: buf(d), Len: 1, Flags: vt.FNext, Next: 3})
			d.Expose(3)
			return 3
		}, virtq.ErrChainLoop, nil},
		{"indirect not negotiated", false, nil, func(d *vt.Driver) uint16 {
			return d.AddIndirect(nil, []vt.Desc{{Addr: buf(d), Len: 64}})
		}, virtq.ErrIndirectNotNegotiated, nil},
		{"indirect len 0", true, nil, func(d *vt.Driver) uint16 {
			return d.Add(vt.Desc{Addr: d.Scratch(16), Len: 0, Flags: vt.FIndirect})
		}, virtq.ErrIndirectLen, nil},
		{"indirect len not x16", true, nil, func(d *vt.Driver) uint16 {
			return d.Add(vt.Desc{Addr: d.Scratch(32), Len: 24, Flags: vt.FIndirect})
		}, virtq.ErrIndirectLen, nil},
		{"indirect too large", true, nil, func(d *vt.Driver) uint16 {
			return d.Add(vt.Desc{Addr: d.Boundary, Len: 16 * (virtq.MaxSize + 1), Flags: vt.FIndirect})
		}, virtq.ErrIndirectLen, nil},
		{"nested indirect", true, nil, func(d *vt.Driver) uint16 {
			inner := d.Scratch(16)
			d.WriteTable(inner, []vt.Desc{{Addr: buf(d), Len: 64}})
			return d.AddIndirect(nil, []vt.Desc{{Addr: inner, Len: 16, Flags: vt.FIndirect}})
		}, virtq.ErrNestedIndirect, nil},
		{"indirect with next", true, nil, func(d *vt.Driver) uint16 {
			tbl := d.Scratch(16)
			d.WriteTable(tbl, []vt.Desc{{Addr: buf(d), Len: 64}})
			d.SetDesc(0, vt.Desc{Addr: tbl, Len: 16, Flags: vt.FIndirect | vt.FNext, Next: 1})
			d.SetDesc(1, vt.Desc{Addr: buf(d), Len: 64})
			d.Expose(0)
			return 0
		}, virtq.ErrIndirectNext, nil},
		{"indirect table unmapped", true, nil, func(d *vt.Driver) uint16 {
			return d.Add(vt.Desc{Addr: 0x1000, Len: 32, Flags: vt.FIndirect})
		}, virtq.ErrIndirectUnmapped, guestmem.ErrUnmapped},
		{"indirect table across regions", true, nil, func(d *vt.Driver) uint16 {
			return d.Add(vt.Desc{Addr: d.Boundary - 16, Len: 32, Flags: vt.FIndirect})
		}, virtq.ErrIndirectUnmapped, guestmem.ErrUnmapped},
		{"read after write", false, nil, func(d *vt.Driver) uint16 {
			return d.Add(vt.Desc{Addr: buf(d), Len: 64}, vt.Desc{Addr: buf(d), Len: 64, Flags: vt.FWrite},
				vt.Desc{Addr: buf(d), Len: 64})
		}, virtq.ErrReadAfterWrite, nil},
		{"read after write across indirect", true, nil, func(d *vt.Driver) uint16 {
			return d.AddIndirect([]vt.Desc{{Addr: buf(d), Len: 64, Flags: vt.FWrite}}, []vt.Desc{{Addr: buf(d), Len: 64}})
		}, virtq.ErrReadAfterWrite, nil},
		{"zero length", false, nil, func(d *vt.Driver) uint16 {
			return d.Add(vt.Desc{Addr: buf(d), Len: 64}, vt.Desc{Addr: buf(d), Len: 0, Flags: vt.FWrite})
		}, virtq.ErrZeroLength, nil},
		{"buffer unmapped", false, nil, func(d *vt.Driver) uint16 {
			return d.Add(vt.Desc{Addr: 0x2000, Len: 64})
		}, virtq.ErrBufferUnmapped, guestmem.ErrUnmapped},
		{"buffer past region end", false, nil, func(d *vt.Driver) uint16 {
			return d.Add(vt.Desc{Addr: d.Boundary + 1<<16 - 8, Len: 9})
		}, virtq.ErrBufferUnmapped, guestmem.ErrUnmapped},
		{"buffer addr+len overflow", false, nil, func(d *vt.Driver) uint16 {
			return d.Add(vt.Desc{Addr: math.MaxUint64 - 8, Len: 64})
		}, virtq.ErrBufferUnmapped, guestmem.ErrOverflow},
		{"chain over 4 GiB", false, nil, func(d *vt.Driver) uint16 {
			return d.Add(vt.Desc{Addr: d.Boundary, Len: math.MaxUint32}, vt.Desc{Addr: d.Boundary, Len: 1, Flags: vt.FWrite})
		}, virtq.ErrChainBytes, nil},
		{"too many segments (splits)", false, nil, func(d *vt.Driver) uint16 {
			// 66 descriptors each straddling the region boundary: 132 segments > MaxSegments.
			var ds []vt.Desc
			for range 66 {
				ds = append(ds, vt.Desc{Addr: d.Boundary - 1, Len: 2})
			}
			return d.Add(ds...)
		}, virtq.ErrTooManySegments, nil},
		{"too many segments (indirect)", true, nil, func(d *vt.Driver) uint16 {
			var ds []vt.Desc
			for range virtq.MaxSegments + 1 {
				ds = append(ds, vt.Desc{Addr: d.Boundary, Len: 1})
			}
			return d.AddIndirect(nil, ds)
		}, virtq.ErrTooManySegments, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var d *vt.Driver
			switch {
			case c.name == "chain over 4 GiB":
				d = vt.NewWith(128, sparse(t, 1<<32+4096))
			default:
				d = vt.New(128, 1<<16)
			}
			if c.name == "next out of range" || c.name == "loop" || c.name == "self loop" {
				d = vt.New(8, 1<<16)
			}
			d.Features.Indirect = c.indirect
			q := newQueue(t, d)
			head := c.build(d)
			var ch virtq.Chain
			ok, err := q.Pop(&ch)
			var ce *virtq.ChainError
			if ok || !errors.As(err, &ce) || !errors.Is(err, c.want) {
				t.Fatalf("Pop = %v, %v; want ChainError %v", ok, err, c.want)
			}
			if c.cause != nil && !errors.Is(err, c.cause) {
				t.Fatalf("error %v lacks cause %v", err, c.cause)
			}
			if ce.Head != head {
				t.Fatalf("ChainError head %d, want %d", ce.Head, head)
			}
			// The head is consumed: complete it and serve the next chain.
			q.Push(ce.Head, 0)
			q.Publish()
			if u := d.PopUsed(); len(u) != 1 || u[0] != (vt.Used{ID: uint32(head), Len: 0}) {
				t.Fatalf("used %v", u)
			}
			d.SetDesc(5, vt.Desc{Addr: d.Boundary, Len: 8})
			d.Expose(5)
			mustPop(t, q, &ch)
			if ch.Head != 5 || ch.ReadLen != 8 {
				t.Fatalf("next chain %+v", ch)
			}
		})
	}
}

func TestBrokenRing(t *testing.T) {
	t.Run("avail idx ahead", func(t *testing.T) {
		d := vt.New(8, 1<<16)
		q := newQueue(t, d)
		d.SetAvailIdx(9)
		var c virtq.Chain
		for range 2 { // sticky
			if ok, err := q.Pop(&c); ok || !errors.Is(err, virtq.ErrAvailAhead) {
				t.Fatalf("Pop = %v, %v", ok, err)
			}
		}
		if !q.HasAvail() {
			t.Fatal("HasAvail must report a broken ring so the caller's Pop sees it")
		}
	})
	t.Run("exactly size ahead is fine", func(t *testing.T) {
		d := vt.New(8, 1<<16)
		q := newQueue(t, d)
		for i := range uint16(8) {
			d.SetDesc(i, vt.Desc{Addr: d.Boundary, Len: 1})
			d.Expose(i)
		}
		var c virtq.Chain
		for range 8 {
			mustPop(t, q, &c)
		}
		mustEmpty(t, q)
	})
	t.Run("avail idx moved back", func(t *testing.T) {
		d := vt.New(8, 1<<16)
		q := newQueue(t, d)
		d.SetDesc(0, vt.Desc{Addr: d.Boundary, Len: 1})
		d.Expose(0, 0)
		var c virtq.Chain
		mustPop(t, q, &c)
		mustPop(t, q, &c)
		d.SetAvailIdx(1)
		if ok, err := q.Pop(&c); ok || !errors.Is(err, virtq.ErrAvailAhead) {
			t.Fatalf("Pop = %v, %v", ok, err)
		}
	})
	t.Run("head out of range", func(t *testing.T) {
		d := vt.New(8, 1<<16)
		q := newQueue(t, d)
		d.Expose(8)
		var c virtq.Chain
		ok, err := q.Pop(&c)
		var ce *virtq.ChainError
		if ok || !errors.Is(err, virtq.ErrHeadIndex) || errors.As(err, &ce) {
			t.Fatalf("Pop = %v, %v", ok, err)
		}
	})
}

func TestNewValidation(t *testing.T) {
	d := vt.New(8, 1<<16)
	good := d.Config()
	cases := []struct {
		name string
		mod  func(c *virtq.Config)
		want error
	}{
		{"size 0", func(c *virtq.Config) { c.Size = 0 }, virtq.ErrQueueSize},
		{"size 3", func(c *virtq.Config) { c.Size = 3 }, virtq.ErrQueueSize},
		{"size 65536", func(c *virtq.Config) { c.Size = 65536 }, virtq.ErrQueueSize},
		{"desc align", func(c *virtq.Config) { c.DescUVA += 8 }, virtq.ErrDescAlign},
		{"avail align", func(c *virtq.Config) { c.AvailUVA += 2 }, virtq.ErrAvailAlign},
		{"used align", func(c *virtq.Config) { c.UsedUVA += 2 }, virtq.ErrUsedAlign},
		{"desc unmapped", func(c *virtq.Config) { c.DescUVA = 0x1000 }, virtq.ErrRingUnmapped},
		{"used unmapped", func(c *virtq.Config) { c.UsedUVA = d.Boundary }, virtq.ErrRingUnmapped}, // a GPA, not a UVA
		{"avail runs off region", func(c *virtq.Config) { c.AvailUVA = d.UVA(d.Boundary - 8) }, virtq.ErrRingUnmapped},
		{"size too big for rings", func(c *virtq.Config) { c.Size = virtq.MaxSize }, virtq.ErrRingUnmapped},
	}
	for _, c := range cases {
		cfg := good
		c.mod(&cfg)
		if _, err := virtq.New(d.Table, cfg); !errors.Is(err, c.want) {
			t.Errorf("%s: err = %v, want %v", c.name, err, c.want)
		}
	}
	if _, err := virtq.New(d.Table, good); err != nil {
		t.Fatal(err)
	}
	// A ring whose UVA is 4-aligned but whose host address is not (mmap_offset 2).
	mem := make([]byte, 1<<16)
	tb, err := guestmem.FromBytes([]guestmem.Region{{GPA: 0, Size: 0x1000, UVA: 0x10000, MmapOffset: 2}}, [][]byte{mem})
	if err != nil {
		t.Fatal(err)
	}
	_, err = virtq.New(tb, virtq.Config{Size: 4, DescUVA: 0x10000, AvailUVA: 0x10040, UsedUVA: 0x10100})
	if !errors.Is(err, virtq.ErrHostAlign) {
		t.Fatalf("host misalignment: %v", err)
	}
	// EVENT_IDX needs the 2 bytes after the used ring mapped (the avail_event word); without it they are not.
	tb, err = guestmem.FromBytes([]guestmem.Region{{GPA: 0, Size: 0x100 + 6 + 8*4, UVA: 0x10000}}, [][]byte{mem})
	if err != nil {
		t.Fatal(err)
	}
	cfg := virtq.Config{Size: 4, DescUVA: 0x10000, AvailUVA: 0x10040, UsedUVA: 0x10100}
	if _, err := virtq.New(tb, cfg); err != nil {
		t.Fatalf("used ring ending at the region end: %v", err)
	}
	cfg.EventIdx = true
	if _, err := virtq.New(tb, cfg); !errors.Is(err, virtq.ErrRingUnmapped) {
		t.Fatalf("EVENT_IDX word past the region: %v", err)
	}
}

func TestPublishBatching(t *testing.T) {
	d := vt.New(8, 1<<16)
	q := newQueue(t, d)
	var c virtq.Chain
	var heads []uint16
	for range 3 {
		d.Add(vt.Desc{Addr: d.Boundary, Len: 1})
	}
	for range 3 {
		mustPop(t, q, &c)
		heads = append(heads, c.Head)
	}
	for i, h := range heads {
		q.Push(h, uint32(10*i))
		if d.UsedIdx() != 0 {
			t.Fatal("used->idx moved before Publish")
		}
	}
	if !q.Publish() {
		t.Fatal("first Publish after New must notify")
	}
	if d.UsedIdx() != 3 {
		t.Fatalf("used idx %d", d.UsedIdx())
	}
	u := d.PopUsed()
	for i, h := range heads {
		if u[i] != (vt.Used{ID: uint32(h), Len: uint32(10 * i)}) {
			t.Fatalf("used %v", u)
		}
	}
	if q.Publish() || d.UsedIdx() != 3 {
		t.Fatal("empty Publish notified or moved used idx")
	}
	// Without EVENT_IDX: NO_INTERRUPT suppresses, its absence notifies.
	d.SetAvailFlags(1)
	q.Push(heads[0], 1)
	if q.Publish() {
		t.Fatal("notified despite VRING_AVAIL_F_NO_INTERRUPT")
	}
	d.SetAvailFlags(0)
	q.Push(heads[1], 1)
	if !q.Publish() {
		t.Fatal("no notification without NO_INTERRUPT")
	}
}

func TestPushOverflowFlushes(t *testing.T) {
	d := vt.New(4, 1<<16)
	q := newQueue(t, d)
	q.Publish()
	for i := range 6 { // more than Size elements before one Publish
		q.Push(uint16(i%4), uint32(i))
	}
	if d.UsedIdx() != 4 {
		t.Fatalf("used idx %d after Size+2 pushes, want an early flush at 4", d.UsedIdx())
	}
	d.PopUsed()
	q.Publish()
	if u := d.PopUsed(); len(u) != 2 || u[0].Len != 4 || u[1].Len != 5 {
		t.Fatalf("used %v", u)
	}
}

func TestNeedEvent(t *testing.T) {
	cases := []struct {
		event, new, old uint16
		want            bool
	}{
		{0, 1, 0, true},         // first element crosses used_event 0
		{1, 1, 0, false},        // driver wants a notification only after entry 1
		{1, 2, 0, true},         // batch 0..2 crosses 1
		{5, 5, 4, false},        // event 5 not reached yet
		{4, 5, 4, true},         // exactly the element the driver waits for
		{3, 5, 4, false},        // already passed before this batch
		{65535, 0, 65535, true}, // wrap: entry 65535 published, new idx wrapped to 0
		{65535, 2, 65534, true},
		{0, 2, 65534, true},
		{1, 2, 65534, true},
		{2, 2, 65534, false},
		{65533, 2, 65534, false},
		{7, 7, 7, false}, // nothing new
	}
	for _, c := range cases {
		if got := virtq.NeedEvent(c.event, c.new, c.old); got != c.want {
			t.Errorf("need_event(event %d, new %d, old %d) = %v, want %v", c.event, c.new, c.old, got, c.want)
		}
	}
}

// pusher returns a function that makes n one-descriptor chains available,
// takes them and pushes them as used (not published).
func pusher(t *testing.T, d *vt.Driver, q *virtq.Queue) func(n int) {
	var c virtq.Chain
	return func(n int) {
		for range n {
			d.Add(vt.Desc{Addr: d.Boundary, Len: 1})
			mustPop(t, q, &c)
			q.Push(c.Head, 0)
		}
	}
}

func TestEventIdxNotify(t *testing.T) {
	d := vt.New(8, 1<<16)
	d.Features.EventIdx = true
	q := newQueue(t, d)
	pushN := pusher(t, d, q)
	pushN(1)
	if !q.Publish() { // used idx 1; first publish always notifies
		t.Fatal("first Publish must notify")
	}
	d.SetAvailFlags(1) // ignored with EVENT_IDX
	d.SetUsedEvent(1)  // interrupt when used idx passes 1, i.e. after element 1
	pushN(1)
	if !q.Publish() { // used idx 2: crosses event 1
		t.Fatal("crossing used_event must notify (avail->flags is ignored with EVENT_IDX)")
	}
	d.SetUsedEvent(4)
	pushN(1) // idx 3
	if q.Publish() {
		t.Fatal("notified before used_event")
	}
	pushN(2) // idx 5: crosses 4
	if !q.Publish() {
		t.Fatal("batch crossing used_event did not notify")
	}
	pushN(1) // idx 6: event 4 is behind
	if q.Publish() {
		t.Fatal("notified for an event already passed")
	}
}

// TestUnnotified: a driver whose used_event store became visible only after
// Publish read the old one (a missing barrier on its side) waits for
// elements it was never notified of; Unnotified reports that state, and
// only that one.
func TestUnnotified(t *testing.T) {
	for _, eventIdx := range []bool{true, false} {
		d := vt.New(8, 1<<16)
		d.Features.EventIdx = eventIdx
		q := newQueue(t, d)
		pushN := pusher(t, d, q)
		if q.Unnotified() {
			t.Fatal("nothing published yet")
		}
		pushN(1)
		q.Publish() // the first one notifies: used idx 1
		if q.Unnotified() {
			t.Fatalf("event_idx %v: everything published was notified", eventIdx)
		}
		// The driver suppresses interrupts while it works: used_event left
		// behind (0) or NO_INTERRUPT set.
		d.SetUsedEvent(0)
		d.SetAvailFlags(1)
		pushN(2)
		if q.Publish() {
			t.Fatalf("event_idx %v: notified while suppressed", eventIdx)
		}
		if q.Unnotified() {
			t.Fatalf("event_idx %v: the driver has not asked yet", eventIdx)
		}
		// It asks now, for elements already published (used_event 1: it has
		// seen 1 of the 3), and then misses used->idx 3.
		d.SetUsedEvent(1)
		d.SetAvailFlags(0)
		if !q.Unnotified() {
			t.Fatalf("event_idx %v: a driver waiting for published elements was not seen", eventIdx)
		}
		q.Renotify()
		if q.Unnotified() {
			t.Fatalf("event_idx %v: still unnotified after Renotify", eventIdx)
		}
		if eventIdx {
			// A driver that has seen everything (used_event = used idx) waits
			// for nothing.
			pushN(1)
			d.SetUsedEvent(0)
			q.Publish()
			d.SetUsedEvent(4)
			if q.Unnotified() {
				t.Fatal("used_event at used idx: nothing to notify")
			}
			st := q.State()
			if len(st.Decisions) == 0 || st.Decisions[len(st.Decisions)-1] != (virtq.Decision{UsedEvent: 0, Old: 3, New: 4}) {
				t.Fatalf("decisions: %+v", st.Decisions)
			}
		}
	}
}

// TestUnnotifiedAtStart: a ring started over a used ring whose elements an
// earlier ring published (a device stop, a restart, the source of a live
// migration) does not know whether the driver was notified of them: a
// driver whose used_event lies among them (it waits for them) is reported,
// one that has seen them all is not, and neither is a new ring.
func TestUnnotifiedAtStart(t *testing.T) {
	for _, tc := range []struct {
		usedIdx, usedEvent uint16
		want               bool
	}{
		{0, 0, false},         // a new ring
		{40, 37, true},        // the driver has seen 37 of 40 and waits
		{40, 39, true},        // ... 39 of 40
		{40, 40, false},       // it has seen all
		{3, 0xfff0, true},     // across the wrap
		{40, 40 + 100, false}, // it asks for one far ahead (suppression)
	} {
		d := vt.New(8, 1<<16)
		d.Features.EventIdx = true
		d.SetUsedIdx(tc.usedIdx)
		d.SetUsedEvent(tc.usedEvent)
		q := newQueue(t, d)
		if got := q.Unnotified(); got != tc.want {
			t.Errorf("used idx %d, used_event %d: Unnotified = %v, want %v", tc.usedIdx, tc.usedEvent, got, tc.want)
		}
		if tc.want {
			q.Renotify()
			if q.Unnotified() {
				t.Errorf("used idx %d, used_event %d: still unnotified after Renotify", tc.usedIdx, tc.usedEvent)
			}
		}
	}
}

func TestSetNotification(t *testing.T) {
	d := vt.New(8, 1<<16)
	d.SetUsedIdx(5)
	q := newQueue(t, d)
	q.SetNotification(false)
	if d.UsedFlags() != 1 || d.UsedIdx() != 5 {
		t.Fatalf("disable: flags %d idx %d", d.UsedFlags(), d.UsedIdx())
	}
	q.SetNotification(true)
	if d.UsedFlags() != 0 || d.UsedIdx() != 5 {
		t.Fatalf("enable: flags %d idx %d", d.UsedFlags(), d.UsedIdx())
	}

	// EVENT_IDX: enable writes avail_event = avail->idx and leaves the 2 bytes after it alone.
	d = vt.New(8, 1<<16)
	d.Features.EventIdx = true
	q = newQueue(t, d)
	after := d.Bytes(d.UsedGPA+4+8*8+2, 2)
	after[0], after[1] = 0xef, 0xbe
	d.SetAvailIdx(0) // nothing yet
	d.Add(vt.Desc{Addr: d.Boundary, Len: 1})
	d.Add(vt.Desc{Addr: d.Boundary, Len: 1})
	q.SetNotification(true)
	if d.AvailEvent() != 2 || after[0] != 0xef || after[1] != 0xbe || d.UsedFlags() != 0 {
		t.Fatalf("avail_event %d, neighbours %x, flags %d", d.AvailEvent(), after, d.UsedFlags())
	}
	if !q.HasAvail() {
		t.Fatal("re-check after enabling misses waiting chains")
	}
	q.SetNotification(false) // no-op with EVENT_IDX
	if d.AvailEvent() != 2 || d.UsedFlags() != 0 {
		t.Fatal("disable with EVENT_IDX changed the ring")
	}
}

func TestWrapAround(t *testing.T) {
	d := vt.New(4, 1<<16)
	d.SetAvailIdx(65534)
	d.SetUsedIdx(65534)
	cfg := d.Config()
	cfg.LastAvail = 65534
	q, err := virtq.New(d.Table, cfg)
	if err != nil {
		t.Fatal(err)
	}
	var c virtq.Chain
	var heads []uint16
	for i := range 4 {
		heads = append(heads, d.Add(vt.Desc{Addr: d.Boundary + uint64(i), Len: 1}))
	}
	if d.AvailIdx() != 2 {
		t.Fatalf("driver idx %d", d.AvailIdx())
	}
	for i := range 4 {
		mustPop(t, q, &c)
		if c.Head != heads[i] || !same(c.Segs[0], d.Bytes(d.Boundary+uint64(i), 1)) {
			t.Fatalf("pop %d: head %d", i, c.Head)
		}
		q.Push(c.Head, uint32(i))
	}
	mustEmpty(t, q)
	if q.LastAvail() != 2 {
		t.Fatalf("LastAvail %d", q.LastAvail())
	}
	q.Publish()
	if d.UsedIdx() != 2 {
		t.Fatalf("used idx %d", d.UsedIdx())
	}
	u := d.PopUsed()
	if len(u) != 4 || u[3] != (vt.Used{ID: uint32(heads[3]), Len: 3}) {
		t.Fatalf("used %v", u)
	}
}

func TestUsedIdxContinuesFromGuest(t *testing.T) {
	d := vt.New(8, 1<<16)
	d.SetUsedIdx(100) // left by a previous back-end before GET_VRING_BASE
	d.SetAvailIdx(100)
	cfg := d.Config()
	cfg.LastAvail = 100
	q, err := virtq.New(d.Table, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if q.LastAvail() != 100 || q.Size() != 8 {
		t.Fatalf("LastAvail %d Size %d", q.LastAvail(), q.Size())
	}
	head := d.Add(vt.Desc{Addr: d.Boundary, Len: 1})
	var c virtq.Chain
	mustPop(t, q, &c)
	q.Push(c.Head, 7)
	q.Publish()
	if d.UsedIdx() != 101 {
		t.Fatalf("used idx %d, want 101", d.UsedIdx())
	}
	if u := d.PopUsed(); len(u) != 1 || u[0] != (vt.Used{ID: uint32(head), Len: 7}) {
		t.Fatalf("used %v (slot 100%%8 = 4)", u)
	}
}

// setupCycle returns a function that re-exposes one chain (a header, then an indirect table of data, a data
// buffer split across regions, and a response) and runs Pop, Push, Publish and a notification toggle.
func setupCycle(t testing.TB, eventIdx bool) (func(), *virtq.Chain) {
	return setupCycleWith(t, eventIdx, false)
}

// setupCycleWith is setupCycle, with inflight tracking when inflight is set.
func setupCycleWith(t testing.TB, eventIdx, inflight bool) (func(), *virtq.Chain) {
	d := vt.New(256, 1<<20)
	d.Features.EventIdx = eventIdx
	d.Features.Indirect = true
	cfg := d.Config()
	if inflight {
		cfg.Inflight = newRegion(256)
	}
	q, err := virtq.New(d.Table, cfg)
	if err != nil {
		t.Fatal(err)
	}
	head := d.AddIndirect([]vt.Desc{{Addr: d.Alloc(51, 0), Len: 51}},
		[]vt.Desc{{Addr: d.Alloc(4096, 0), Len: 4096}, {Addr: d.Boundary - 2048, Len: 4096},
			{Addr: d.Alloc(108, 0), Len: 108, Flags: vt.FWrite}})
	c := new(virtq.Chain)
	mustPop(t, q, c)
	q.Push(c.Head, 0)
	q.Publish()
	return func() {
		d.Expose(head)
		if ok, err := q.Pop(c); !ok || err != nil {
			panic(err)
		}
		q.Push(c.Head, 108)
		q.Publish()
		q.SetNotification(false)
		q.SetNotification(true)
		q.HasAvail()
	}, c
}

func TestNoAllocs(t *testing.T) {
	for _, ev := range []bool{false, true} {
		for _, inflight := range []bool{false, true} {
			cycle, c := setupCycleWith(t, ev, inflight)
			if n := testing.AllocsPerRun(1000, cycle); n != 0 {
				t.Fatalf("eventIdx=%v inflight=%v: Pop/Push/Publish allocate %v per run", ev, inflight, n)
			}
			if c.NRead != 4 || c.NWrite != 1 {
				t.Fatalf("chain %+v", c)
			}
		}
	}
}

func BenchmarkPopPushInflight(b *testing.B) {
	cycle, _ := setupCycleWith(b, true, true)
	b.ReportAllocs()
	for b.Loop() {
		cycle()
	}
}

func BenchmarkPopPush(b *testing.B) {
	cycle, _ := setupCycle(b, true)
	b.ReportAllocs()
	for b.Loop() {
		cycle()
	}
}

// TestUsedRingLogged: with a dirty page log, every write of the used ring
// (elements, flags and index, avail_event) marks its pages, at the ring's
// guest-physical address, without allocating.
func TestUsedRingLogged(t *testing.T) {
	d := vt.New(1024, 1<<16) // a used ring of 8 KiB: three pages
	d.Features.EventIdx = true
	bits := make([]uint64, 1<<10)
	log := dirtylog.FromBytes(unsafe.Slice((*byte)(unsafe.Pointer(&bits[0])), len(bits)*8))
	cfg := d.Config()
	cfg.Log, cfg.UsedLogGPA = log, d.UsedGPA
	q, err := virtq.New(d.Table, cfg)
	if err != nil {
		t.Fatal(err)
	}
	page := func(gpa uint64) uint64 { return gpa / dirtylog.PageSize }
	marked := func() []uint64 {
		var out []uint64
		for p := uint64(0); p < log.Pages(); p++ {
			if log.Marked(p) {
				out = append(out, p)
			}
		}
		return out
	}
	if m := marked(); len(m) != 0 {
		t.Fatalf("marked before any write: %v", m)
	}
	// Take 1000 chains and complete the last one: used idx is 0, so its
	// element is the ring's first.
	var c virtq.Chain
	var last uint16
	for range 1000 {
		d.Add(vt.Desc{Addr: d.Boundary, Len: 1})
		mustPop(t, q, &c)
		last = c.Head
	}
	q.Push(last, 1)
	elem := d.UsedGPA + 4 + 8*0 // the first used slot: used idx is 0
	want := []uint64{page(elem)}
	if m := marked(); len(m) != 1 || m[0] != want[0] {
		t.Fatalf("after Push: %v, want %v", m, want)
	}
	// Advance the used index so that the next element lands on a later page.
	for range 999 {
		q.Push(last, 1) // the same head: the queue does not check, and only the ring bytes matter here
	}
	q.Publish()
	hdr := page(d.UsedGPA)
	elemLast := page(d.UsedGPA + 4 + 8*999)
	q.SetNotification(true) // avail_event after the 1024 elements
	event := page(d.UsedGPA + 4 + 8*1024)
	m := marked()
	for _, p := range []uint64{hdr, elemLast, event} {
		found := false
		for _, x := range m {
			found = found || x == p
		}
		if !found {
			t.Fatalf("page %d not marked (header %d, last element %d, avail_event %d): %v", p, hdr, elemLast, event, m)
		}
	}
	for _, x := range m {
		if x < hdr || x > event {
			t.Fatalf("page %d marked outside the used ring (%d..%d)", x, hdr, event)
		}
	}
	if n := testing.AllocsPerRun(100, func() { q.Push(last, 1); q.Publish(); q.SetNotification(true) }); n != 0 {
		t.Fatalf("logged used-ring writes allocate %v", n)
	}
}

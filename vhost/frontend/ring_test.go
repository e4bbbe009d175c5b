package frontend

import (
	"bytes"
	"encoding/binary"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// detached builds a Device with guest memory and rings but no socket; the
// rings are marked started with the given ring features.
func detached(t testing.TB, o Options, eventIdx, indirect bool) *Device {
	t.Helper()
	if err := o.fill(); err != nil {
		t.Fatal(err)
	}
	d := &Device{o: o}
	if err := d.layout(); err != nil {
		t.Fatal(err)
	}
	for _, q := range d.vrings {
		q.started, q.eventIdx, q.indirect = true, eventIdx, indirect
	}
	t.Cleanup(d.release)
	return d
}

func fakeFor(d *Device, q *Queue) *fakeRing {
	next := func(gpa uint64) uint64 {
		if r := d.mem.find(gpa); r != nil {
			return r.gpa + r.size
		}
		return gpa + 1
	}
	return &fakeRing{vring: q.index, size: q.size, mem: d.mem.slice, next: next, desc: q.desc, avail: q.avail, used: q.used,
		eventIdx: q.eventIdx, handle: fakeSCSI, lastAvail: q.base, usedIdx: q.base}
}

// runFake runs f in a goroutine until the returned stop is called.
func runFake(f *fakeRing) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			default:
			}
			if f.process() == 0 {
				runtime.Gosched()
			}
		}
	}()
	return func() { close(done); wg.Wait() }
}

func TestNeedEvent(t *testing.T) {
	for _, c := range []struct {
		ev, nw, old uint16
		want        bool
	}{
		{0, 1, 0, true},              // first entry published, event at 0
		{1, 1, 0, false},             // event waits for index 1 to be passed
		{5, 10, 0, true},             // inside the window
		{10, 10, 0, false},           // at new: not yet passed
		{65535, 2, 65534, true},      // wrap
		{3, 2, 65534, false},         // beyond new across wrap
		{65533, 65535, 65534, false}, // before old
	} {
		if got := needEvent(c.ev, c.nw, c.old); got != c.want {
			t.Errorf("needEvent(%d,%d,%d) = %v, want %v", c.ev, c.nw, c.old, got, c.want)
		}
	}
}

func TestLUNBytes(t *testing.T) {
	if got, want := LUNBytes(5, 0), [8]byte{1, 5, 0x40, 0}; got != want {
		t.Errorf("LUNBytes(5,0) = % x, want % x", got, want)
	}
	if got, want := LUNBytes(255, 0x1234), [8]byte{1, 255, 0x52, 0x34}; got != want {
		t.Errorf("LUNBytes(255,0x1234) = % x, want % x", got, want)
	}
}

func TestLayout(t *testing.T) {
	for _, regions := range []int{1, 2} {
		d := detached(t, Options{NumQueues: 3, QueueSize: 256, Regions: regions, MmapOffset: 8192}, false, false)
		tbl := d.MemTable()
		if len(tbl) != regions {
			t.Fatalf("%d regions in table, want %d", len(tbl), regions)
		}
		for i, r := range tbl {
			if r.GPA != uint64(i)*d.o.MemSize/uint64(regions) || r.Size != d.o.MemSize/uint64(regions) {
				t.Errorf("region %d: %+v (mem %d)", i, r, d.o.MemSize)
			}
			if r.UVA == r.GPA || r.MmapOffset != 8192 {
				t.Errorf("region %d: uva %#x gpa %#x offset %d", i, r.UVA, r.GPA, r.MmapOffset)
			}
		}
		if regions == 2 && tbl[1].UVA == tbl[0].UVA+tbl[0].Size {
			t.Errorf("regions are virtually contiguous; the test wants distinct mappings")
		}
		for _, q := range d.vrings {
			desc, avail, used := q.RingGPAs()
			if desc%16 != 0 || avail%4 != 0 || used%4 != 0 || desc < 4096 {
				t.Errorf("vring %d: desc %#x avail %#x used %#x misaligned", q.index, desc, avail, used)
			}
			if len(q.desc) != 16*256 || len(q.avail) != 6+2*256+2 || len(q.used) != 6+8*256+2 {
				t.Errorf("vring %d: ring sizes %d %d %d", q.index, len(q.desc), len(q.avail), len(q.used))
			}
			a := d.VringAddr(q.index)
			if uva, _ := d.UVA(desc); a.Desc != uva || a.Desc == desc || a.Log != used {
				t.Errorf("vring %d: addr %+v", q.index, a)
			}
			for _, s := range q.slots {
				if len(s.Data) != d.o.SlotDataSize || s.DataGPA%4096 != 0 || s.req == nil || s.resp == nil || s.ind == nil {
					t.Fatalf("vring %d slot %d badly placed", q.index, s.ID)
				}
			}
		}
		// Writing through the memfd view is seen through GPA translation.
		q := d.Queue(2)
		q.desc[0] = 0x5a
		if d.Mem(q.descGPA, 1)[0] != 0x5a {
			t.Errorf("Mem view differs from ring view")
		}
	}
}

func TestLayoutAutoGrowAndTooSmall(t *testing.T) {
	d := detached(t, Options{NumQueues: 8, SlotDataSize: 128 << 10}, false, false)
	if d.o.MemSize <= 64<<20 {
		t.Errorf("MemSize %d did not grow for 8 queues of 128 x 128 KiB slots", d.o.MemSize)
	}
	o := Options{MemSize: 1 << 20}
	o.fill()
	if err := (&Device{o: o}).layout(); err == nil {
		t.Errorf("1 MiB layout succeeded")
	}
}

func TestCrossRegionCopy(t *testing.T) {
	d := detached(t, Options{Regions: 2, MemSize: 16 << 20}, false, false)
	half := uint64(8 << 20)
	if d.Mem(half-2, 4) != nil {
		t.Errorf("Mem across regions returned a slice")
	}
	src := []byte{1, 2, 3, 4, 5, 6}
	if err := d.WriteGuest(half-3, src); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 6)
	if err := d.ReadGuest(half-3, got); err != nil || !bytes.Equal(got, src) {
		t.Errorf("cross-region read %v %v", got, err)
	}
	if !bytes.Equal(d.Mem(half, 3), src[3:]) {
		t.Errorf("second region bytes %v", d.Mem(half, 3))
	}
	if d.WriteGuest(16<<20-2, src) == nil {
		t.Errorf("write past RAM succeeded")
	}
}

// asyncRound submits n slots on q, lets f process them, and checks each.
func asyncRound(t *testing.T, d *Device, q *Queue, f *fakeRing, n int) {
	t.Helper()
	var slots []*Slot
	for i := 0; i < n; i++ {
		s := q.Get()
		if s == nil {
			t.Fatalf("no slot %d (free %d)", i, q.Free())
		}
		dir, size := DirIn, 512*(i%4+1)
		if i%3 == 1 {
			dir = DirOut
			for k := 0; k < size; k++ {
				s.Data[k] = byte(k + i)
			}
		} else if i%3 == 2 {
			dir, size = DirNone, 0
		}
		q.Prepare(s, 1, 2, []byte{0x28, byte(i), 0, byte(i * 7), 0}, dir, size)
		if s.Response() != 0xff {
			t.Fatalf("Prepare left response %d", s.Response())
		}
		q.Submit(s)
		slots = append(slots, s)
	}
	q.Kick()
	if got := f.process(); got != n {
		t.Fatalf("device processed %d chains, want %d (err %v)", got, n, f.err)
	}
	seen := 0
	q.Reap(func(s *Slot) {
		seen++
		i := -1
		for k, x := range slots {
			if x == s {
				i = k
			}
		}
		if i < 0 {
			t.Fatalf("reaped unknown slot %d", s.ID)
		}
		if s.Response() != 0 || s.Status() != byte(i) || s.Resid() != 0 {
			t.Errorf("slot %d: response %d status %d resid %d", i, s.Response(), s.Status(), s.Resid())
		}
		switch s.Dir() {
		case DirIn:
			if s.UsedLen() != uint32(RespSize+s.Len()) {
				t.Errorf("slot %d: used len %d, want %d", i, s.UsedLen(), RespSize+s.Len())
			}
			for k := 0; k < s.Len(); k++ {
				if s.Data[k] != byte(k)^byte(i*7) {
					t.Fatalf("slot %d: data-in byte %d = %#x", i, k, s.Data[k])
				}
			}
		case DirOut:
			sense := s.Sense()
			if len(sense) != SenseSize || sense[5] != byte(5+i) {
				t.Errorf("slot %d: data-out echo %v", i, sense[:8])
			}
		}
		q.Put(s)
	})
	if seen != n || q.Inflight() != 0 || q.Err() != nil {
		t.Fatalf("reaped %d of %d, inflight %d, err %v", seen, n, q.Inflight(), q.Err())
	}
}

func TestAsyncAgainstFakeDevice(t *testing.T) {
	for _, c := range []struct {
		name               string
		eventIdx, indirect bool
		base               uint16
	}{
		{"plain", false, false, 0},
		{"indirect", false, true, 0},
		{"eventidx", true, false, 0},
		{"both-wrap", true, true, 65530},
		{"direct-wrap", false, false, 65500},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := detached(t, Options{QueueSize: 16, Slots: 16, VringBase: c.base}, c.eventIdx, c.indirect)
			q := d.Queue(0)
			f := fakeFor(d, q)
			want := 5
			if c.indirect {
				want = 16
			}
			if q.Free() != want {
				t.Fatalf("Free() = %d, want %d", q.Free(), want)
			}
			for round := 0; round < 40; round++ {
				asyncRound(t, d, q, f, 1+round%want)
			}
			if q.UsedIdx() != q.AvailIdx() || q.UsedIdx() == c.base {
				t.Errorf("used %d avail %d", q.UsedIdx(), q.AvailIdx())
			}
			if q.Free() != want || len(q.free) != 16 {
				t.Errorf("leaked: Free %d, free descs %d", q.Free(), len(q.free))
			}
		})
	}
}

func TestAsyncNoAllocs(t *testing.T) {
	d := detached(t, Options{QueueSize: 64}, true, true)
	q := d.Queue(0)
	f := fakeFor(d, q)
	cdb := []byte{0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0}
	reaped := 0
	fn := func(s *Slot) { reaped++; q.Put(s) }
	allocs := testing.AllocsPerRun(100, func() {
		for i := 0; i < 8; i++ {
			s := q.Get()
			q.Prepare(s, 0, 0, cdb, DirIn, 4096)
			q.Submit(s)
		}
		q.Kick()
		echoUsed(f)
		q.Reap(fn)
	})
	if allocs != 0 {
		t.Errorf("%v allocations per round", allocs)
	}
	if reaped != 8*101 {
		t.Errorf("reaped %d", reaped)
	}
}

// echoUsed completes every available head with length 0, allocating
// nothing (the fake device's chain walk allocates).
func echoUsed(f *fakeRing) {
	ai := f.availIdx()
	for f.lastAvail != ai {
		head := binary.LittleEndian.Uint16(f.avail[4+2*int(f.lastAvail%f.size):])
		f.lastAvail++
		binary.LittleEndian.PutUint32(f.used[4+8*int(f.usedIdx%f.size):], uint32(head))
		f.usedIdx++
	}
	atomic.StoreUint32(f.word(f.used, 0), uint32(f.usedIdx)<<16)
	atomic.StoreUint32(f.word(f.used, 4+8*int(f.size)), uint32(f.lastAvail))
}

func TestKickSuppression(t *testing.T) {
	t.Run("no_notify", func(t *testing.T) {
		d := detached(t, Options{QueueSize: 16}, false, true)
		q := d.Queue(0)
		f := fakeFor(d, q)
		asyncRound(t, d, q, f, 2)
		if q.Kicks() != 1 {
			t.Fatalf("kicks %d, want 1", q.Kicks())
		}
		f.noNotify = true
		asyncRound(t, d, q, f, 2) // fake sets NO_NOTIFY when completing this round
		k := q.Kicks()
		asyncRound(t, d, q, f, 2)
		if q.Kicks() != k {
			t.Errorf("kicked with NO_NOTIFY set")
		}
		q.Kick() // nothing queued: no kick
		if q.Kicks() != k {
			t.Errorf("kicked with nothing queued")
		}
	})
	t.Run("event_idx", func(t *testing.T) {
		d := detached(t, Options{QueueSize: 16}, true, true)
		q := d.Queue(0)
		f := fakeFor(d, q)
		asyncRound(t, d, q, f, 3) // avail_event 0: first publish kicks
		if q.Kicks() != 1 || q.AvailEvent() != 3 {
			t.Fatalf("kicks %d avail_event %d", q.Kicks(), q.AvailEvent())
		}
		asyncRound(t, d, q, f, 3) // avail_event 3 is passed by 3 -> 6
		if q.Kicks() != 2 {
			t.Fatalf("kicks %d, want 2", q.Kicks())
		}
		// The device asks for a kick only once the avail index passes 100.
		f.eventIdx = false // stop the fake from moving avail_event
		*q.availEventWord = 100
		for i := 0; i < 3; i++ {
			s := q.Get()
			q.Prepare(s, 0, 0, []byte{0}, DirNone, 0)
			q.Submit(s)
			q.Kick()
		}
		if q.Kicks() != 2 {
			t.Errorf("kicked %d times although avail_event is far ahead", q.Kicks()-2)
		}
	})
}

func TestInterruptSuppression(t *testing.T) {
	for _, ev := range []bool{false, true} {
		d := detached(t, Options{QueueSize: 16}, ev, true)
		q := d.Queue(0)
		f := fakeFor(d, q)
		asyncRound(t, d, q, f, 2)
		if f.calls != 1 {
			t.Fatalf("eventidx=%v: %d signals with interrupts on, want 1", ev, f.calls)
		}
		q.SetInterrupts(false)
		for i := 0; i < 5; i++ {
			asyncRound(t, d, q, f, 3)
		}
		if f.calls != 1 {
			t.Errorf("eventidx=%v: %d signals with interrupts off", ev, f.calls)
		}
		q.SetInterrupts(true)
		asyncRound(t, d, q, f, 2)
		if f.calls != 2 {
			t.Errorf("eventidx=%v: %d signals after re-enabling, want 2", ev, f.calls)
		}
	}
}

func TestDoAgainstFakeDevice(t *testing.T) {
	for _, indirect := range []bool{false, true} {
		d := detached(t, Options{QueueSize: 32, Regions: 2, MemSize: 32 << 20, Timeout: 5 * time.Second}, true, indirect)
		q := d.Queue(0)
		stop := runFake(fakeFor(d, q))
		out := bytes.Repeat([]byte{0xc3, 0x3c}, 3000)
		for _, c := range []Command{
			{CDB: []byte{0x12, 0, 0, 0x11}, DataInLen: 96},
			{CDB: []byte{0x28, 2, 3, 0x22, 10}, DataInLen: 4096, Segments: 7},
			{CDB: []byte{0x2a}, DataOut: out, Segments: 5},
			{CDB: []byte{0x2a}, DataOut: out[:100], Direct: true},
			{CDB: []byte{0x28, 0, 0, 1}, DataInLen: 8192, DataGPA: 16<<20 - 4096}, // straddles the regions
		} {
			r, err := d.Do(c)
			if err != nil {
				t.Fatalf("indirect=%v %x: %v", indirect, c.CDB, err)
			}
			cdb := make([]byte, 32)
			copy(cdb, c.CDB)
			if r.Status != cdb[1] || r.Response != cdb[2] {
				t.Errorf("%x: status %d response %d", c.CDB, r.Status, r.Response)
			}
			var resid uint32
			if len(c.CDB) > 4 {
				resid = uint32(c.CDB[4])
			}
			if r.Resid != resid || r.UsedLen != uint32(RespSize+c.DataInLen)-resid {
				t.Errorf("%x: resid %d used %d", c.CDB, r.Resid, r.UsedLen)
			}
			if c.DataInLen > 0 {
				x := c.CDB[3]
				for k := 0; k < c.DataInLen-int(resid); k++ {
					if r.DataIn[k] != byte(k)^x {
						t.Fatalf("%x: data-in %d = %#x", c.CDB, k, r.DataIn[k])
					}
				}
				for k := c.DataInLen - int(resid); k < c.DataInLen; k++ {
					if r.DataIn[k] != 0xa5 {
						t.Fatalf("%x: residual byte %d written", c.CDB, k)
					}
				}
			}
			if len(c.DataOut) > 0 && (r.SenseLen != uint32(len(c.DataOut)) || !bytes.Equal(r.Sense, c.DataOut[:min(96, len(c.DataOut))])) {
				t.Errorf("%x: sense %d %x", c.CDB, r.SenseLen, r.Sense)
			}
		}
		stop()
		if q.Err() != nil || q.Inflight() != 0 {
			t.Errorf("err %v inflight %d", q.Err(), q.Inflight())
		}
	}
}

func TestDoTimeoutAndLateCompletion(t *testing.T) {
	d := detached(t, Options{QueueSize: 16, Timeout: 50 * time.Millisecond}, false, false)
	q := d.Queue(0)
	f := fakeFor(d, q)
	if _, err := d.Do(Command{CDB: []byte{0}, DataInLen: 512}); err == nil {
		t.Fatal("Do without a device succeeded")
	}
	if q.abandoned != 1 || q.scratchCur == 0 {
		t.Fatalf("abandoned %d scratch %d", q.abandoned, q.scratchCur)
	}
	stop := runFake(f)
	defer stop()
	d.o.Timeout = 5 * time.Second
	r, err := d.Do(Command{CDB: []byte{0, 7}})
	if err != nil || r.Status != 7 {
		t.Fatalf("Do after timeout: %v %+v", err, r)
	}
	if q.abandoned != 0 || q.Inflight() != 0 {
		t.Errorf("abandoned %d inflight %d", q.abandoned, q.Inflight())
	}
}

func TestDeviceViolations(t *testing.T) {
	d := detached(t, Options{QueueSize: 16}, false, false)
	q := d.Queue(0)
	// A used element naming a head that was never made available.
	binary.LittleEndian.PutUint32(q.used[4:], 9)
	*q.usedWord = 1 << 16
	s := q.Get()
	q.Prepare(s, 0, 0, []byte{0}, DirNone, 0)
	q.Submit(s)
	q.Kick()
	q.Reap(func(*Slot) { t.Error("bogus completion delivered") })
	if q.Err() == nil {
		t.Fatal("unknown used id not reported")
	}
	d2 := detached(t, Options{QueueSize: 16}, false, false)
	q2 := d2.Queue(0)
	*q2.usedWord = 3 << 16 // three used with none in flight
	q2.Reap(func(*Slot) {})
	if q2.Err() == nil {
		t.Fatal("used idx jump not reported")
	}
}

func TestRawChain(t *testing.T) {
	d := detached(t, Options{QueueSize: 16}, false, false)
	q := d.Queue(0)
	f := fakeFor(d, q)
	s := q.slots[0]
	head := q.AddRawChain([]Desc{
		{Addr: s.reqGPA, Len: ReqSize, Flags: DescFNext, Next: 1},
		{Addr: s.respGPA, Len: RespSize, Flags: DescFWrite},
	})
	if d := q.ReadDesc(head); d.Next == 1 && head != 0 || d.Flags != DescFNext {
		t.Errorf("relative next not translated: %+v", d)
	}
	q.Kick()
	f.process()
	if l, err := q.WaitRaw(head, time.Second); err != nil || l != RespSize {
		t.Fatalf("raw completion %d %v", l, err)
	}
	// A loop: the fake device must stop walking and complete with 0.
	loop := q.AddRawChain([]Desc{
		{Addr: s.reqGPA, Len: ReqSize, Flags: DescFNext, Next: 1},
		{Addr: s.reqGPA, Len: ReqSize, Flags: DescFNext, Next: 0},
	})
	if q.ReadDesc(q.ReadDesc(loop).Next).Next != loop {
		t.Fatalf("loop not built")
	}
	q.SetAvailIdx(q.shadowAvail)
	f.process()
	if f.err == nil {
		t.Errorf("fake device did not see the loop")
	}
	if len(q.free) != 14 {
		t.Errorf("free %d", len(q.free))
	}
}

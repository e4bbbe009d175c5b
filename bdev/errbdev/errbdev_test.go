// Tests for the error bdev: which IOs each rule hits (op, LBA range edges,
// flush, unmap ranges), delays released by Poll and not before, delay with an
// error, the held-table bound, random I/O through delays over a file bdev,
// and no allocations on Submit/Poll.
package errbdev

import (
	"errors"
	"testing"
	"time"

	"vhost-target/bdev"
	"vhost-target/bdev/file"
	"vhost-target/bdev/kio/kiotest"
	"vhost-target/bdev/malloc"
)

func newDisk(t *testing.T, rules ...Rule) (*Disk, *malloc.Disk) {
	base, err := malloc.New("mem0", 1<<20, 512, [16]byte{1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { base.Close() })
	d, err := New(Config{Name: "err0", Base: base, Rules: rules, UUID: [16]byte{9}})
	if err != nil {
		t.Fatal(err)
	}
	return d, base
}

func TestInfo(t *testing.T) {
	d, _ := newDisk(t)
	i := d.Info()
	if i.Name != "err0" || i.Type != "error" || i.BlockSize != 512 || i.NumBlocks != 2048 || i.UUID != [16]byte{9} || !i.Unmap {
		t.Errorf("info = %+v", i)
	}
}

func TestErrorRules(t *testing.T) {
	d, base := newDisk(t,
		Rule{Op: bdev.OpRead, LBAStart: 100, LBACount: 8, Err: bdev.ErrIO},
		Rule{Op: bdev.OpFlush, Err: bdev.ErrIO},
		Rule{Op: bdev.OpUnmap, LBAStart: 1000, LBACount: 1, Err: bdev.ErrIO},
		Rule{Op: 0, LBAStart: 2000, Err: bdev.ErrIO}, // every op from 2000 to the end
	)
	ch := kiotest.Open(t, d)
	buf := kiotest.Mem(t, 8192)
	io := func(op bdev.Op, lba, blocks uint64) *bdev.IO {
		return &bdev.IO{Op: op, Offset: lba * 512, Len: blocks * 512, Iov: [][]byte{buf[:blocks*512]}}
	}
	unmap := func(ranges ...bdev.Range) *bdev.IO {
		x := &bdev.IO{Op: bdev.OpUnmap, NRanges: len(ranges)}
		copy(x.Ranges[:], ranges)
		return x
	}
	cases := []struct {
		name string
		io   *bdev.IO
		fail bool
	}{
		{"read just before", io(bdev.OpRead, 92, 8), false},
		{"read touching the first block", io(bdev.OpRead, 93, 8), true},
		{"read inside", io(bdev.OpRead, 102, 2), true},
		{"read touching the last block", io(bdev.OpRead, 107, 1), true},
		{"read just after", io(bdev.OpRead, 108, 4), false},
		{"write inside", io(bdev.OpWrite, 100, 8), false},
		{"flush", &bdev.IO{Op: bdev.OpFlush}, true},
		{"unmap elsewhere", unmap(bdev.Range{Offset: 0, Len: 512}, bdev.Range{Offset: 1001 * 512, Len: 512}), false},
		{"unmap second range hits", unmap(bdev.Range{Offset: 0, Len: 512}, bdev.Range{Offset: 999 * 512, Len: 1024}), true},
		{"write zeroes at the open-ended range", io(bdev.OpWriteZeroes, 2047, 1), true},
		{"write zeroes before it", io(bdev.OpWriteZeroes, 1990, 10), false},
	}
	for _, c := range cases {
		err := kiotest.Do(t, ch, c.io)
		if c.fail != errors.Is(err, bdev.ErrIO) || !c.fail && err != nil {
			t.Errorf("%s: err %v, want failure %v", c.name, err, c.fail)
		}
	}
	// A failed write reaches nothing: the base is untouched.
	buf[0] = 0xAB
	kiotest.Do(t, ch, io(bdev.OpWrite, 2000, 1))
	if base.Bytes()[2000*512] != 0 {
		t.Error("an injected write error still wrote the base")
	}
}

func TestDelay(t *testing.T) {
	const delay = 30 * time.Millisecond
	d, base := newDisk(t,
		Rule{Op: bdev.OpWrite, LBAStart: 0, LBACount: 10, Delay: delay},
		Rule{Op: bdev.OpRead, LBAStart: 0, LBACount: 10, Delay: delay, Err: bdev.ErrIO},
	)
	ch := kiotest.Open(t, d)
	buf := kiotest.Mem(t, 512)
	buf[0] = 7
	for _, c := range []struct {
		op      bdev.Op
		wantErr error
	}{{bdev.OpWrite, nil}, {bdev.OpRead, bdev.ErrIO}} {
		var w kiotest.Waiter
		io := &bdev.IO{Op: c.op, Offset: 512, Len: 512, Iov: [][]byte{buf}, Done: &w}
		start := time.Now()
		ch.Submit(io)
		if len(w.Done) != 0 || ch.InFlight() != 1 {
			t.Fatalf("%v: completed inside Submit (done %d, inflight %d)", c.op, len(w.Done), ch.InFlight())
		}
		for len(w.Done) == 0 {
			ch.Poll()
		}
		if el := time.Since(start); el < delay {
			t.Errorf("%v: completed after %v, before the %v delay", c.op, el, delay)
		}
		if !errors.Is(io.Err, c.wantErr) || ch.InFlight() != 0 {
			t.Errorf("%v: err %v inflight %d", c.op, io.Err, ch.InFlight())
		}
	}
	if base.Bytes()[512] != 7 {
		t.Error("the delayed write did not reach the base")
	}
	// Undelayed IOs pass straight through while others are held.
	var w kiotest.Waiter
	held := &bdev.IO{Op: bdev.OpWrite, Offset: 0, Len: 512, Iov: [][]byte{buf}, Done: &w}
	free := &bdev.IO{Op: bdev.OpWrite, Offset: 20 * 512, Len: 512, Iov: [][]byte{buf}, Done: &w}
	ch.Submit(held)
	ch.Submit(free)
	if len(w.Done) != 1 || w.Done[0] != free {
		t.Fatalf("the IO outside the rule was held too")
	}
	for len(w.Done) < 2 {
		ch.Poll()
	}
}

func TestHeldTableFull(t *testing.T) {
	d, _ := newDisk(t, Rule{Op: bdev.OpFlush, Delay: time.Hour})
	ch, err := d.Open()
	if err != nil {
		t.Fatal(err)
	}
	var w kiotest.Waiter
	ios := make([]bdev.IO, DelayedMax+1)
	for i := range ios {
		ios[i] = bdev.IO{Op: bdev.OpFlush, Done: &w}
		ch.Submit(&ios[i])
	}
	if len(w.Done) != 1 || !errors.Is(w.Done[0].Err, bdev.ErrBusy) || ch.InFlight() != DelayedMax {
		t.Fatalf("done %d, inflight %d", len(w.Done), ch.InFlight())
	}
	if ch.Close() == nil {
		t.Error("Close with held IOs succeeded")
	}
}

func TestBadRules(t *testing.T) {
	base, _ := malloc.New("m", 1<<20, 512, [16]byte{1})
	defer base.Close()
	for _, r := range []Rule{{Op: bdev.OpRead}, {Op: 42, Err: bdev.ErrIO}, {Delay: -1, Err: bdev.ErrIO},
		{LBAStart: ^uint64(0), LBACount: 2, Err: bdev.ErrIO}} {
		if _, err := New(Config{Name: "e", Base: base, Rules: []Rule{r}}); err == nil {
			t.Errorf("rule %+v accepted", r)
		}
	}
	if _, err := New(Config{Name: "e"}); err == nil {
		t.Error("no base accepted")
	}
	for _, c := range []struct {
		s  string
		op bdev.Op
		ok bool
	}{{"read", bdev.OpRead, true}, {"write_zeroes", bdev.OpWriteZeroes, true}, {"all", 0, true}, {"invalid", 0, false}, {"READ", 0, false}} {
		if op, ok := ParseOp(c.s); op != c.op || ok != c.ok {
			t.Errorf("ParseOp(%q) = %v %v", c.s, op, ok)
		}
	}
}

// TestRandomThroughDelays runs the model check through small delays on part
// of the disk over a file bdev, so held IOs and asynchronous completions mix.
func TestRandomThroughDelays(t *testing.T) {
	base, err := file.New(file.Config{Name: "f", Path: kiotest.DirectDir(t) + "/f.img", Size: 16 << 20,
		BlockSize: 512, Create: true, UUID: [16]byte{1}})
	if err != nil {
		t.Fatal(err)
	}
	defer base.Close()
	d, err := New(Config{Name: "e", Base: base, UUID: [16]byte{2}, Rules: []Rule{
		{Op: bdev.OpWrite, LBAStart: 0, LBACount: 4096, Delay: 200 * time.Microsecond},
		{LBAStart: 10000, LBACount: 5000, Delay: time.Millisecond},
	}})
	if err != nil {
		t.Fatal(err)
	}
	kiotest.RandomIO(t, d, kiotest.RandomOptions{Goroutines: 2, Ops: 300, Depth: 8, MaxLen: 64 << 10, Seed: 3, Unaligned: 0.3})
}

func TestNoAllocs(t *testing.T) {
	d, _ := newDisk(t,
		Rule{Op: bdev.OpRead, LBAStart: 0, LBACount: 1, Err: bdev.ErrIO},
		Rule{Op: bdev.OpWrite, LBAStart: 0, LBACount: 1, Delay: time.Microsecond},
	)
	ch := kiotest.Open(t, d)
	buf := kiotest.Mem(t, 1024)
	var w kiotest.Waiter
	w.Done = make([]*bdev.IO, 0, 4)
	ios := []bdev.IO{
		{Op: bdev.OpRead, Offset: 0, Len: 512, Iov: [][]byte{buf[:512]}, Done: &w},
		{Op: bdev.OpWrite, Offset: 0, Len: 512, Iov: [][]byte{buf[:512]}, Done: &w},
		{Op: bdev.OpRead, Offset: 512, Len: 512, Iov: [][]byte{buf[512:]}, Done: &w},
	}
	run := func() {
		w.Done = w.Done[:0]
		for i := range ios {
			ch.Submit(&ios[i])
		}
		for len(w.Done) < len(ios) {
			ch.Poll()
		}
	}
	if n := testing.AllocsPerRun(100, run); n != 0 {
		t.Errorf("Submit/Poll allocate %v per run", n)
	}
}

// TestResizeFollowsBase: the error bdev's geometry is its base's, also after
// the base is resized through it or directly, and a shrink through it is
// refused while its channel (which holds one of the base) is open.
func TestResizeFollowsBase(t *testing.T) {
	d, base := newDisk(t)
	before := d.Info()
	if err := d.Resize(2 << 20); err != nil {
		t.Fatal(err)
	}
	if i := d.Info(); i.NumBlocks != 4096 || i.Name != "err0" || i.Type != "error" || before.NumBlocks != 2048 {
		t.Fatalf("after Resize through the error bdev: %+v (before: %d blocks)", i, before.NumBlocks)
	}
	if err := base.Resize(3 << 20); err != nil {
		t.Fatal(err)
	}
	if n := d.Info().NumBlocks; n != 6144 {
		t.Fatalf("after resizing the base: %d blocks", n)
	}
	if d.Info() != d.Info() {
		t.Error("Info makes a new description on every call")
	}
	ch := kiotest.Open(t, d)
	if err := d.Resize(1 << 20); !errors.Is(err, bdev.ErrInUse) {
		t.Errorf("shrink with a channel open: %v, want ErrInUse", err)
	}
	buf := kiotest.Mem(t, 512)
	if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpRead, Offset: 3<<20 - 512, Len: 512, Iov: [][]byte{buf}}); err != nil {
		t.Errorf("read of the grown part: %v", err)
	}
	if _, err := d.Rescan(); err == nil {
		t.Error("rescan of an error bdev over a malloc bdev succeeded")
	}
}

// TestCountedRule: a rule with a Count takes that many matching IOs, over
// all channels, then lets them on to the next rule or the base; IOs it does
// not match do not use it up.
func TestCountedRule(t *testing.T) {
	d, _ := newDisk(t,
		Rule{Op: bdev.OpRead, LBAStart: 10, LBACount: 1, Err: bdev.ErrIO, Count: 3},
		Rule{Op: bdev.OpRead, LBAStart: 10, LBACount: 1, Err: bdev.ErrNoSpace, Count: 1},
	)
	ch1, ch2 := kiotest.Open(t, d), kiotest.Open(t, d)
	buf := kiotest.Mem(t, 512)
	read := func(ch bdev.Channel, lba uint64) error {
		return kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpRead, Offset: lba * 512, Len: 512, Iov: [][]byte{buf}})
	}
	if err := read(ch1, 11); err != nil { // elsewhere: not counted
		t.Fatalf("read elsewhere: %v", err)
	}
	for i, want := range []error{bdev.ErrIO, bdev.ErrIO, bdev.ErrIO, bdev.ErrNoSpace, nil, nil} {
		ch := ch1
		if i%2 == 1 {
			ch = ch2
		}
		if err := read(ch, 10); !errors.Is(err, want) && !(want == nil && err == nil) {
			t.Errorf("read %d: %v, want %v", i, err, want)
		}
	}
	if _, err := New(Config{Name: "x", Base: d, Rules: []Rule{{Err: bdev.ErrIO, Count: 1 << 63}}}); err == nil {
		t.Error("a count over MaxInt64 was accepted")
	}
}

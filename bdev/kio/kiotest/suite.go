package kiotest

import (
	"errors"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"vhost-target/bdev"
	"vhost-target/bdev/kio"
)

// Factory makes the bdev under test over a backing store.
type Factory func(o kio.Options, queueDepth int) (bdev.Bdev, error)

// Suite runs the behaviour tests every kernel-backed bdev must pass.
func Suite(t *testing.T, f Factory) {
	t.Run("RandomIO", func(t *testing.T) { testRandom(t, f) })
	t.Run("OpenErrors", func(t *testing.T) { testOpenErrors(t, f) })
	t.Run("Sizes", func(t *testing.T) { testSizes(t, f) })
	t.Run("ReadOnly", func(t *testing.T) { testReadOnly(t, f) })
	t.Run("Range", func(t *testing.T) { testRange(t, f) })
	t.Run("QueueDepthOne", func(t *testing.T) { testQueueDepthOne(t, f) })
	t.Run("Truncated", func(t *testing.T) { testTruncated(t, f) })
	t.Run("Removed", func(t *testing.T) { testRemoved(t, f) })
	t.Run("UnmapPunchesHoles", func(t *testing.T) { testUnmapHoles(t, f) })
	t.Run("NoAllocs", func(t *testing.T) { testAllocs(t, f) })
}

// New makes a bdev over a fresh sparse file of size bytes.
func New(t testing.TB, f Factory, size uint64, bs uint32, qd int) (bdev.Bdev, string) {
	path := DirectDir(t) + "/disk.img"
	d, err := f(kio.Options{Name: "d0", Path: path, Size: size, BlockSize: bs, Create: true}, qd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d, path
}

// Open opens a channel closed at the end of the test.
func Open(t testing.TB, d bdev.Bdev) bdev.Channel {
	ch, err := d.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := ch.Close(); err != nil {
			t.Error(err)
		}
	})
	return ch
}

func testRandom(t *testing.T, f Factory) {
	for _, c := range []struct {
		name string
		bs   uint32
		qd   int
	}{{"bs512", 512, 64}, {"bs4096", 4096, 64}, {"bs512-qd4", 512, 4}} {
		t.Run(c.name, func(t *testing.T) {
			d, _ := New(t, f, 64<<20, c.bs, c.qd)
			info := d.Info()
			if !info.WriteCache || !info.Unmap || !info.UnmapZeroes || !info.WriteZeroes || info.ReadOnly {
				t.Fatalf("info = %+v", info)
			}
			ops := 800
			if testing.Short() {
				ops = 300
			}
			RandomIO(t, d, RandomOptions{Goroutines: 4, Ops: ops, Depth: 16, MaxLen: 320 << 10,
				Seed: uint64(c.bs), Unaligned: 0.3})
		})
	}
}

func testOpenErrors(t *testing.T, f Factory) {
	dir := DirectDir(t)
	short := dir + "/short.img"
	os.WriteFile(short, make([]byte, 4096), 0o600)
	tiny := dir + "/tiny.img"
	os.WriteFile(tiny, make([]byte, 100), 0o600)
	cases := []struct {
		name string
		o    kio.Options
		want string
	}{
		{"missing", kio.Options{Path: dir + "/nope.img", BlockSize: 512}, "no such file"},
		{"directory", kio.Options{Path: dir, BlockSize: 512}, "is a directory"},
		{"shorter", kio.Options{Path: short, Size: 1 << 20, BlockSize: 512}, "less than the configured size"},
		{"less than a block", kio.Options{Path: tiny, BlockSize: 512}, "less than one 512-byte block"},
		{"char device", kio.Options{Path: "/dev/null", BlockSize: 512}, "character device"},
		{"block size", kio.Options{Path: short, BlockSize: 1024}, "not 512 or 4096"},
		{"create without size", kio.Options{Path: dir + "/new.img", BlockSize: 512, Create: true}, "size is required"},
	}
	if os.Geteuid() != 0 {
		noperm := dir + "/noperm.img"
		os.WriteFile(noperm, make([]byte, 4096), 0o000)
		cases = append(cases, struct {
			name string
			o    kio.Options
			want string
		}{"no permission", kio.Options{Path: noperm, BlockSize: 512}, "permission denied"})
	}
	for _, c := range cases {
		c.o.Name = "bad0"
		d, err := f(c.o, 8)
		if err == nil {
			d.Close()
			t.Errorf("%s: opened", c.name)
			continue
		}
		if !strings.Contains(err.Error(), `"bad0"`) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %q does not name the bdev and say %q", c.name, err, c.want)
		}
	}
}

func testSizes(t *testing.T, f Factory) {
	dir := DirectDir(t)
	// Create makes a sparse file.
	path := dir + "/sparse.img"
	d, err := f(kio.Options{Name: "s", Path: path, Size: 1 << 30, BlockSize: 4096, Create: true}, 8)
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil || st.Size != 1<<30 || st.Blocks > 16 {
		t.Fatalf("created file: size %d, %d blocks, err %v; want 1 GiB, sparse", st.Size, st.Blocks, err)
	}
	// Size 0 takes the file's size, rounded down to the block size.
	odd := dir + "/odd.img"
	os.WriteFile(odd, make([]byte, 3*4096+100), 0o600)
	for _, bs := range []uint32{512, 4096} {
		d, err := f(kio.Options{Name: "o", Path: odd, BlockSize: bs}, 8)
		if err != nil {
			t.Fatal(err)
		}
		if got := d.Info().NumBlocks * uint64(bs); got != 3*4096 {
			t.Errorf("bs %d: size %d, want %d", bs, got, 3*4096)
		}
		d.Close()
	}
	// A configured size smaller than the file serves only that much.
	d, err = f(kio.Options{Name: "o", Path: path, Size: 8192, BlockSize: 512}, 8)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Info().NumBlocks != 16 {
		t.Errorf("NumBlocks = %d, want 16", d.Info().NumBlocks)
	}
}

func testReadOnly(t *testing.T, f Factory) {
	path := DirectDir(t) + "/ro.img"
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i / 512)
	}
	os.WriteFile(path, data, 0o400)
	d, err := f(kio.Options{Name: "ro", Path: path, BlockSize: 512, ReadOnly: true}, 8)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	info := d.Info()
	if !info.ReadOnly || info.Unmap || info.WriteZeroes {
		t.Errorf("info = %+v", info)
	}
	ch := Open(t, d)
	buf := Mem(t, 4096)
	for _, op := range []bdev.Op{bdev.OpWrite, bdev.OpWriteZeroes, bdev.OpWriteSame, bdev.OpUnmap} {
		io := &bdev.IO{Op: op, Offset: 0, Len: 4096, Iov: [][]byte{buf}, NRanges: 1,
			Ranges: [bdev.MaxRanges]bdev.Range{{Offset: 0, Len: 4096}}}
		if err := Do(t, ch, io); !errors.Is(err, bdev.ErrReadOnly) {
			t.Errorf("%v: err %v, want ErrReadOnly", op, err)
		}
	}
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpRead, Offset: 4096, Len: 4096, Iov: [][]byte{buf}}); err != nil {
		t.Fatal(err)
	}
	if buf[0] != 8 || buf[4095] != 15 {
		t.Errorf("read back %d..%d", buf[0], buf[4095])
	}
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpFlush}); err != nil {
		t.Errorf("flush on a read-only device: %v", err)
	}
}

func testRange(t *testing.T, f Factory) {
	d, _ := New(t, f, 1<<20, 512, 8)
	ch := Open(t, d)
	buf := Mem(t, 8192)
	cases := []bdev.IO{
		{Op: bdev.OpRead, Offset: 1 << 20, Len: 512, Iov: [][]byte{buf}},       // one past the end
		{Op: bdev.OpRead, Offset: 1<<20 - 512, Len: 1024, Iov: [][]byte{buf}},  // straddles the end
		{Op: bdev.OpWrite, Offset: 100, Len: 512, Iov: [][]byte{buf}},          // not block aligned
		{Op: bdev.OpWrite, Offset: 0, Len: 8192, Iov: [][]byte{buf[:4096]}},    // buffers shorter than Len
		{Op: bdev.OpWriteZeroes, Offset: ^uint64(0) - 511, Len: 1024},          // wraps
		{Op: bdev.OpWriteSame, Offset: 0, Len: 1024, Iov: [][]byte{buf[:100]}}, // pattern shorter than a block
		{Op: bdev.OpUnmap, NRanges: 1, Ranges: [bdev.MaxRanges]bdev.Range{{Offset: 1 << 20, Len: 512}}},
	}
	for i := range cases {
		if err := Do(t, ch, &cases[i]); !errors.Is(err, bdev.ErrRange) {
			t.Errorf("case %d (%v): err %v, want ErrRange", i, cases[i].Op, err)
		}
	}
	if err := Do(t, ch, &bdev.IO{Op: bdev.Op(99)}); !errors.Is(err, bdev.ErrNotSup) {
		t.Errorf("unknown op: err %v", err)
	}
	// The last block works.
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpWrite, Offset: 1<<20 - 512, Len: 512, Iov: [][]byte{buf[:512]}}); err != nil {
		t.Errorf("last block: %v", err)
	}
	if ch.InFlight() != 0 {
		t.Errorf("InFlight = %d", ch.InFlight())
	}
}

// testQueueDepthOne submits far more IOs than slots at once: the excess
// waits in the FIFO and every IO completes exactly once, in order for each
// non-overlapping block.
func testQueueDepthOne(t *testing.T, f Factory) {
	d, _ := New(t, f, 1<<20, 512, 1)
	ch := Open(t, d)
	mem := Mem(t, 200*4096)
	var w Waiter
	ios := make([]bdev.IO, 200)
	for i := range ios {
		b := mem[i*4096 : (i+1)*4096]
		for j := range b {
			b[j] = byte(i)
		}
		iov := [][]byte{b[:512]}
		if i%3 == 0 {
			iov = [][]byte{b[1:300], b[301:514]} // unaligned: needs a bounce buffer too
		}
		ios[i] = bdev.IO{Op: bdev.OpWrite, Offset: uint64(i) * 512, Len: 512, Iov: iov, Done: &w}
		ch.Submit(&ios[i])
	}
	if ch.InFlight() != 200 {
		t.Fatalf("InFlight = %d after 200 submissions, want 200", ch.InFlight())
	}
	for len(w.Done) < 200 {
		ch.Poll()
	}
	seen := map[*bdev.IO]bool{}
	for _, io := range w.Done {
		if seen[io] || io.Err != nil {
			t.Fatalf("IO completed twice or failed: %v", io.Err)
		}
		seen[io] = true
	}
	buf := Mem(t, 200*512)
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpRead, Len: 200 * 512, Iov: [][]byte{buf}}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 200; i++ {
		want := byte(i)
		got := buf[i*512]
		if i%3 == 0 {
			got = buf[i*512+299] // the byte after the first piece
		}
		if got != want {
			t.Fatalf("block %d = %d, want %d", i, got, want)
		}
	}
}

// testTruncated shrinks the file while the bdev serves it: reads past the
// new end fail with a medium error, the bdev keeps working below it.
func testTruncated(t *testing.T, f Factory) {
	d, path := New(t, f, 1<<20, 512, 8)
	ch := Open(t, d)
	buf := Mem(t, 4096)
	if err := os.Truncate(path, 64<<10); err != nil {
		t.Fatal(err)
	}
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpRead, Offset: 512 << 10, Len: 4096, Iov: [][]byte{buf}}); !errors.Is(err, bdev.ErrIO) {
		t.Errorf("read past the truncated end: %v, want ErrIO", err)
	}
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpRead, Offset: 60 << 10, Len: 4096, Iov: [][]byte{buf}}); err != nil {
		t.Errorf("read below the truncated end: %v", err)
	}
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpRead, Offset: 60 << 10, Len: 4096, Iov: [][]byte{buf[1:], buf[:1]}}); err != nil {
		t.Errorf("bounced read below the truncated end: %v", err)
	}
}

// testRemoved unlinks the file: the open descriptor keeps the data.
func testRemoved(t *testing.T, f Factory) {
	d, path := New(t, f, 1<<20, 512, 8)
	ch := Open(t, d)
	buf := Mem(t, 4096)
	buf[0] = 42
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpWrite, Offset: 4096, Len: 4096, Iov: [][]byte{buf}}); err != nil {
		t.Fatal(err)
	}
	buf[0] = 0
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpRead, Offset: 4096, Len: 4096, Iov: [][]byte{buf}}); err != nil || buf[0] != 42 {
		t.Fatalf("read after unlink: %v, byte %d", err, buf[0])
	}
}

func testUnmapHoles(t *testing.T, f Factory) {
	d, path := New(t, f, 8<<20, 4096, 8)
	ch := Open(t, d)
	buf := Mem(t, 1<<20)
	for i := range buf {
		buf[i] = 1
	}
	for off := uint64(0); off < 8<<20; off += 1 << 20 {
		if err := Do(t, ch, &bdev.IO{Op: bdev.OpWrite, Offset: off, Len: 1 << 20, Iov: [][]byte{buf}}); err != nil {
			t.Fatal(err)
		}
	}
	blocks := func() int64 {
		var st unix.Stat_t
		unix.Stat(path, &st)
		return st.Blocks
	}
	before := blocks()
	io := &bdev.IO{Op: bdev.OpUnmap, NRanges: 3}
	io.Ranges[0] = bdev.Range{Offset: 0, Len: 2 << 20}
	io.Ranges[1] = bdev.Range{Offset: 3 << 20, Len: 0}
	io.Ranges[2] = bdev.Range{Offset: 4 << 20, Len: 2 << 20}
	if err := Do(t, ch, io); err != nil {
		t.Fatal(err)
	}
	if after := blocks(); after > before-(4<<20)/512+64 {
		t.Errorf("unmapping 4 MiB freed only %d of %d sectors", before-after, before)
	}
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpRead, Offset: 1 << 20, Len: 1 << 20, Iov: [][]byte{buf}}); err != nil {
		t.Fatal(err)
	}
	for i, b := range buf {
		if b != 0 {
			t.Fatalf("unmapped byte %d reads %d", i, b)
		}
	}
}

// testAllocs checks that submitting and reaping (aligned, bounced, flush,
// write zeroes) allocates nothing.
func testAllocs(t *testing.T, f Factory) {
	d, _ := New(t, f, 1<<20, 512, 8)
	mem := Mem(t, 16384)
	NoAllocs(t, Open(t, d), []bdev.IO{
		{Op: bdev.OpRead, Offset: 0, Len: 4096, Iov: [][]byte{mem[:4096]}},
		{Op: bdev.OpWrite, Offset: 8192, Len: 4096, Iov: [][]byte{mem[4097:6000], mem[6000:8290]}},
		{Op: bdev.OpRead, Offset: 8192, Len: 4096, Iov: [][]byte{mem[8193:12289]}},
		{Op: bdev.OpWriteZeroes, Offset: 65536, Len: 8192},
		{Op: bdev.OpFlush},
	})
}

// NoAllocs submits ios on ch together and reaps them, again and again, and
// fails the test if a round allocates or an IO fails.
func NoAllocs(t *testing.T, ch bdev.Channel, ios []bdev.IO) {
	t.Helper()
	var w Waiter
	w.Done = make([]*bdev.IO, 0, len(ios))
	for i := range ios {
		ios[i].Done = &w
	}
	run := func() {
		w.Done = w.Done[:0]
		for i := range ios {
			ch.Submit(&ios[i])
		}
		for len(w.Done) < len(ios) {
			ch.Poll()
		}
		for _, io := range w.Done {
			if io.Err != nil {
				t.Fatalf("%v: %v", io.Op, io.Err)
			}
		}
	}
	run()
	if n := testing.AllocsPerRun(50, run); n != 0 {
		t.Errorf("Submit/Poll allocate %v per run of %d IOs", n, len(ios))
	}
}

// Bench drives one channel at queue depth qd from one goroutine with
// aligned bs-byte random reads (or writes) over a size-byte file.
func Bench(b *testing.B, f Factory, write bool, bs, qd int, size uint64) {
	path := os.Getenv("KIOTEST_BENCH_FILE")
	var d bdev.Bdev
	var err error
	if path != "" {
		d, err = f(kio.Options{Name: "bench", Path: path, BlockSize: 512}, qd)
	} else {
		path = DirectDir(b) + "/bench.img"
		d, err = f(kio.Options{Name: "bench", Path: path, Size: size, BlockSize: 512, Create: true}, qd)
		if err == nil && !write {
			// Fill the file so reads hit allocated blocks, as fio's do.
			err = fill(path, size)
		}
	}
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	ch, err := d.Open()
	if err != nil {
		b.Fatal(err)
	}
	defer ch.Close()
	mem := Mem(b, qd*bs)
	ios := make([]bdev.IO, qd)
	var w Waiter
	w.Done = make([]*bdev.IO, 0, qd)
	op := bdev.OpRead
	if write {
		op = bdev.OpWrite
	}
	blocks := d.Info().NumBlocks * 512 / uint64(bs)
	x := uint64(88172645463325252)
	next := func() uint64 { x ^= x << 13; x ^= x >> 7; x ^= x << 17; return x % blocks * uint64(bs) }
	for i := range ios {
		ios[i] = bdev.IO{Op: op, Len: uint64(bs), Iov: [][]byte{mem[i*bs : (i+1)*bs]}, Done: &w}
	}
	b.SetBytes(int64(bs))
	b.ReportAllocs()
	b.ResetTimer()
	submitted := 0
	for i := range ios {
		if submitted == b.N {
			break
		}
		ios[i].Offset = next()
		ch.Submit(&ios[i])
		submitted++
	}
	for done := 0; done < b.N; {
		ch.Poll()
		for _, io := range w.Done {
			if io.Err != nil {
				b.Fatal(io.Err)
			}
			done++
			if submitted < b.N {
				io.Offset = next()
				ch.Submit(io)
				submitted++
			}
		}
		w.Done = w.Done[:0]
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "IOPS")
}

func fill(path string, size uint64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i)
	}
	for off := uint64(0); off < size; off += uint64(len(buf)) {
		if _, err := f.WriteAt(buf, int64(off)); err != nil {
			return err
		}
	}
	return f.Sync()
}

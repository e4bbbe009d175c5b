// Package kiotest drives bdevs in tests: a reference-model random I/O check
// that several goroutines run at once, each on its own channel and its own
// part of the disk, with guest-like buffers (mmapped, and often split into
// misaligned, odd-length iovecs), and a synchronous helper to do one IO.
package kiotest

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"vhost-target/bdev"
)

// Waiter is a Completer that records completions.
type Waiter struct {
	Done []*bdev.IO
}

// IODone records io.
func (w *Waiter) IODone(io *bdev.IO) { w.Done = append(w.Done, io) }

// Do submits io on ch and polls until it completes (or the timeout passes);
// it returns io.Err.
func Do(t testing.TB, ch bdev.Channel, io *bdev.IO) error {
	t.Helper()
	var w Waiter
	io.Done = &w
	ch.Submit(io)
	deadline := time.Now().Add(10 * time.Second)
	for len(w.Done) == 0 {
		if ch.Poll() == 0 {
			if time.Now().After(deadline) {
				t.Fatalf("%v at %d+%d did not complete in 10 s", io.Op, io.Offset, io.Len)
			}
			runtime.Gosched()
		}
	}
	if len(w.Done) != 1 || w.Done[0] != io {
		t.Fatalf("completions = %d, want exactly this IO once", len(w.Done))
	}
	return io.Err
}

// Mem maps n bytes outside the Go heap, as guest memory is.
func Mem(t testing.TB, n int) []byte {
	m, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(m) })
	return m
}

// RandomOptions shape a RandomIO run.
type RandomOptions struct {
	Goroutines int // each with its own channel and region
	Ops        int // IOs per goroutine
	Depth      int // IOs in flight per goroutine
	MaxLen     int // largest transfer in bytes (rounded to blocks)
	Seed       uint64
	// Unaligned is the share of transfers (0..1) split into misaligned,
	// odd-length iovecs.
	Unaligned float64
}

// RandomIO runs random reads, writes, unmaps, write-zeroes, write-sames and
// flushes against d and checks every read, and finally the whole device,
// against a model. In-flight IOs of one goroutine never overlap each other,
// and goroutines own disjoint regions, so the model is exact.
func RandomIO(t *testing.T, d bdev.Bdev, o RandomOptions) {
	info := d.Info()
	bs := uint64(info.BlockSize)
	size := info.NumBlocks * bs
	region := size / uint64(o.Goroutines) / bs * bs
	if region < uint64(o.MaxLen) {
		t.Fatalf("disk of %d bytes too small for %d goroutines of %d-byte IOs", size, o.Goroutines, o.MaxLen)
	}
	model := make([]byte, size)
	var wg sync.WaitGroup
	errs := make(chan error, o.Goroutines)
	for g := 0; g < o.Goroutines; g++ {
		ch, err := d.Open()
		if err != nil {
			t.Fatal(err)
		}
		defer ch.Close()
		r := &runner{
			t: t, ch: ch, info: info, o: o, base: uint64(g) * region, size: region,
			model: model[uint64(g)*region : uint64(g+1)*region],
			rng:   rand.New(rand.NewPCG(o.Seed, uint64(g))),
			mem:   Mem(t, o.Depth*(2*o.MaxLen+8192)),
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- r.run()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	// Read the whole device back through a fresh channel.
	ch, err := d.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	buf := Mem(t, 1<<20)
	for off := uint64(0); off < size; off += uint64(len(buf)) {
		n := min(uint64(len(buf)), size-off)
		io := &bdev.IO{Op: bdev.OpRead, Offset: off, Len: n, Iov: [][]byte{buf[:n]}}
		if err := Do(t, ch, io); err != nil {
			t.Fatalf("final read at %d: %v", off, err)
		}
		if i := firstDiff(buf[:n], model[off:off+n]); i >= 0 {
			t.Fatalf("final read: byte %d differs from the model (got %#x want %#x)", off+uint64(i), buf[i], model[off+uint64(i)])
		}
	}
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return 0
}

type runner struct {
	t     *testing.T
	ch    bdev.Channel
	info  *bdev.Info
	o     RandomOptions
	base  uint64
	size  uint64
	model []byte
	rng   *rand.Rand
	mem   []byte
}

type slot struct {
	io     bdev.IO
	iov    [64][]byte
	buf    []byte // this slot's share of mem
	want   []byte // reads: expected data
	lo, hi uint64 // region-relative byte range in flight (hi = lo: none)
	busy   bool
}

func (r *runner) run() error {
	bs := uint64(r.info.BlockSize)
	slots := make([]slot, r.o.Depth)
	per := len(r.mem) / r.o.Depth
	for i := range slots {
		slots[i].buf = r.mem[i*per : (i+1)*per]
		slots[i].want = make([]byte, r.o.MaxLen)
	}
	var w Waiter
	submitted, completed := 0, 0
	deadline := time.Now().Add(60 * time.Second)
	for completed < r.o.Ops {
		for i := range slots {
			s := &slots[i]
			if s.busy || submitted == r.o.Ops {
				continue
			}
			if !r.prepare(s, slots, bs) {
				continue
			}
			s.busy = true
			s.io.Done = &w
			submitted++
			r.ch.Submit(&s.io)
		}
		r.ch.Poll()
		for _, io := range w.Done {
			s := slotOf(slots, io)
			if err := r.check(s); err != nil {
				return err
			}
			s.busy = false
			s.lo, s.hi = 0, 0
			completed++
		}
		w.Done = w.Done[:0]
		if time.Now().After(deadline) {
			return fmt.Errorf("random I/O: %d of %d IOs done after 60 s (%d in flight)", completed, r.o.Ops, r.ch.InFlight())
		}
		runtime.Gosched()
	}
	if n := r.ch.InFlight(); n != 0 {
		return fmt.Errorf("InFlight = %d after every IO completed", n)
	}
	return nil
}

func slotOf(slots []slot, io *bdev.IO) *slot {
	for i := range slots {
		if &slots[i].io == io {
			return &slots[i]
		}
	}
	panic("kiotest: completion of an unknown IO")
}

// prepare picks a random IO whose range overlaps no IO in flight.
func (r *runner) prepare(s *slot, slots []slot, bs uint64) bool {
	maxBlocks := uint64(r.o.MaxLen) / bs
	n := (1 + r.rng.Uint64N(maxBlocks)) * bs
	if r.rng.IntN(8) == 0 {
		n = bs // many single-block IOs
	}
	lo := r.rng.Uint64N((r.size-n)/bs+1) * bs
	hi := lo + n
	for i := range slots {
		o := &slots[i]
		if o != s && o.busy && lo < o.hi && o.lo < hi {
			return false
		}
	}
	io := &s.io
	*io = bdev.IO{Offset: r.base + lo, Len: n}
	s.lo, s.hi = lo, hi
	switch k := r.rng.IntN(20); {
	case k < 8:
		io.Op = bdev.OpRead
		io.Iov = r.buffers(s, n)
		copy(s.want, r.model[lo:hi])
		for _, v := range io.Iov {
			for j := range v {
				v[j] = 0xEE // a read that transfers nothing is caught
			}
		}
	case k < 15 || !r.info.Unmap && k < 17:
		io.Op = bdev.OpWrite
		io.Iov = r.buffers(s, n)
		p := lo
		for _, v := range io.Iov {
			for j := range v {
				v[j] = byte(r.rng.Uint32())
			}
			copy(r.model[p:], v)
			p += uint64(len(v))
		}
	case k < 17:
		io.Op = bdev.OpUnmap
		io.Ranges[0] = bdev.Range{Offset: io.Offset, Len: n}
		io.NRanges = 1
		if r.info.UnmapZeroes {
			clear(r.model[lo:hi])
		} else {
			// Contents are undefined after a discard: overwrite after.
			io.Op = bdev.OpWriteZeroes
			clear(r.model[lo:hi])
		}
	case k < 18:
		io.Op = bdev.OpWriteZeroes
		clear(r.model[lo:hi])
	case k < 19:
		io.Op = bdev.OpWriteSame
		pat := s.buf[1 : 1+bs] // misaligned on purpose: write same always bounces
		for j := range pat {
			pat[j] = byte(r.rng.Uint32())
		}
		s.iov[0] = pat
		io.Iov = s.iov[:1]
		for p := lo; p < hi; p += bs {
			copy(r.model[p:p+bs], pat)
		}
	default:
		io.Op = bdev.OpFlush
		io.Offset, io.Len = 0, 0
		s.lo, s.hi = 0, 0
	}
	return true
}

// buffers lays n bytes out in s.buf: one aligned buffer, or (with
// probability Unaligned) a split into up to 8 pieces at odd addresses and
// lengths.
func (r *runner) buffers(s *slot, n uint64) [][]byte {
	if r.rng.Float64() >= r.o.Unaligned {
		s.iov[0] = s.buf[:n]
		if r.rng.IntN(2) == 0 && n >= 8192 {
			// Two aligned segments.
			h := n / 2 / 4096 * 4096
			s.iov[0] = s.buf[:h]
			s.iov[1] = s.buf[4096*((n/4096)+2) : 4096*((n/4096)+2)+n-h]
			return s.iov[:2]
		}
		return s.iov[:1]
	}
	pieces := 1 + r.rng.IntN(8)
	pos := 1 + r.rng.IntN(511) // odd start
	left := int(n)
	k := 0
	for left > 0 {
		l := left
		if k < pieces-1 {
			l = 1 + r.rng.IntN(left)
		}
		s.iov[k] = s.buf[pos : pos+l]
		pos += l + r.rng.IntN(3)
		left -= l
		k++
	}
	// A spare zero-length segment and an over-long last one are legal too.
	return s.iov[:k]
}

func (r *runner) check(s *slot) error {
	io := &s.io
	if io.Err != nil {
		return fmt.Errorf("%v at %d+%d: %v", io.Op, io.Offset, io.Len, io.Err)
	}
	if io.Op != bdev.OpRead {
		return nil
	}
	p := uint64(0)
	for _, v := range io.Iov {
		if i := firstDiff(v, s.want[p:p+uint64(len(v))]); i >= 0 {
			return fmt.Errorf("read at %d+%d (%d iovecs): byte %d differs: got %#x want %#x",
				io.Offset, io.Len, len(io.Iov), p+uint64(i), v[i], s.want[p+uint64(i)])
		}
		p += uint64(len(v))
	}
	return nil
}

package malloc

// Resize tests (issue 10, bdev_resize on a malloc bdev). Goal: a disk grows
// in place (its address never changes, so reactors need no message), keeps
// its data, serves zeroes in the part it gained (even where a shrink left
// old data in memory), refuses to shrink while a channel is open and to
// grow past the address space reserved for it, frees memory on a shrink,
// and an IO running during a grow never fails (run under -race). Method:
// disks of each backing this host has; /proc/self/smaps for memory.

import (
	"bytes"
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"unsafe"

	"vhost-target/bdev"
)

func TestResizeModes(t *testing.T) {
	for _, mode := range []string{HugepagesNone, HugepagesTHP, HugepagesHugeTLB} {
		t.Run(mode, func(t *testing.T) {
			if mode == HugepagesHugeTLB {
				needHugetlb(t, 4)
			}
			if mode == HugepagesTHP {
				if s := readTHPSetting(); s == "never" || s == "" {
					t.Skip("THP disabled")
				}
			}
			d, _, err := create(t, mode, oddSize)
			if err != nil {
				t.Fatal(err)
			}
			resizeGrowShrink(t, d)
		})
	}
}

func resizeGrowShrink(t *testing.T, d *Disk) {
	base := unsafe.Pointer(&d.Bytes()[0])
	old := d.Info()
	ch, _ := d.Open()
	var w waiter
	pat := bytes.Repeat([]byte{0xab}, 512)
	wr := &bdev.IO{Op: bdev.OpWrite, Offset: oddSize - 512, Len: 512, Iov: [][]byte{pat}, Done: &w}
	if ch.Submit(wr); wr.Err != nil {
		t.Fatal(wr.Err)
	}
	const grown = 2*oddSize + 512
	if err := d.Resize(grown); err != nil {
		t.Fatal(err)
	}
	if unsafe.Pointer(&d.Bytes()[0]) != base {
		t.Fatal("the disk moved when it grew")
	}
	if old.NumBlocks != oddSize/512 || d.Info().NumBlocks != grown/512 {
		t.Fatalf("Info before %d blocks (must not change), after %d", old.NumBlocks, d.Info().NumBlocks)
	}
	got := make([]byte, 512)
	for _, c := range []struct {
		off  uint64
		want []byte
	}{{oddSize - 512, pat}, {oddSize, make([]byte, 512)}, {grown - 512, make([]byte, 512)}} {
		rd := &bdev.IO{Op: bdev.OpRead, Offset: c.off, Len: 512, Iov: [][]byte{got}, Done: &w}
		if ch.Submit(rd); rd.Err != nil || !bytes.Equal(got, c.want) {
			t.Fatalf("read at %d after the grow: %v, %x", c.off, rd.Err, got[:4])
		}
	}
	wr.Offset = grown - 512
	if ch.Submit(wr); wr.Err != nil {
		t.Fatalf("write to the new last block: %v", wr.Err)
	}
	if err := d.Resize(oddSize); !errors.Is(err, bdev.ErrInUse) {
		t.Fatalf("shrink with a channel open: %v, want ErrInUse", err)
	}
	ch.Close()
	if err := d.Resize(4096); err != nil {
		t.Fatal(err)
	}
	if n := uint64(len(d.mapping)); n != d.pageBytes {
		t.Errorf("after shrinking to 4 KiB, %d bytes stay mapped, want %d", n, d.pageBytes)
	}
	// Growing again: what the shrink cut off reads as zeroes, also the
	// bytes that stayed mapped in the last page.
	if err := d.Resize(grown); err != nil {
		t.Fatal(err)
	}
	if i := bytes.IndexFunc(d.Bytes()[4096:], func(r rune) bool { return r != 0 }); i >= 0 {
		t.Fatalf("byte %d of a regrown disk is not zero", 4096+i)
	}
	if unsafe.Pointer(&d.Bytes()[0]) != base {
		t.Fatal("the disk moved when it grew again")
	}
}

func TestResizeLimits(t *testing.T) {
	d, err := Create(Config{Name: "m", Size: 1 << 20, BlockSize: 4096, MaxSize: 4 << 20, Hugepages: HugepagesNone})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for _, size := range []uint64{0, 1<<20 + 512} {
		if err := d.Resize(size); err == nil {
			t.Errorf("Resize(%d) of a 4096-byte-block disk succeeded", size)
		}
	}
	if err := d.Resize(4<<20 + 4096); err == nil {
		t.Error("grew past MaxSize")
	}
	if err := d.Resize(4 << 20); err != nil {
		t.Errorf("grow to MaxSize: %v", err)
	}
	if _, err := Create(Config{Name: "m", Size: 1 << 20, BlockSize: 4096, MaxSize: 4096}); err == nil {
		t.Error("MaxSize below Size accepted")
	}
}

// TestResizeUnderIO grows a disk while another goroutine (a reactor) keeps
// writing its last block as each Info it loads says: under -race, the size
// and memory are published without a race, and no IO fails.
func TestResizeUnderIO(t *testing.T) {
	d, _, err := create(t, HugepagesNone, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	var stop atomic.Bool
	var ios atomic.Int64
	var failed atomic.Value
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		ch, _ := d.Open()
		defer ch.Close()
		var w waiter
		buf := make([]byte, 512)
		for !stop.Load() {
			info := d.Info()
			io := bdev.IO{Op: bdev.OpWrite, Offset: info.NumBlocks*512 - 512, Len: 512, Iov: [][]byte{buf}, Done: &w}
			if ch.Submit(&io); io.Err != nil {
				failed.Store(io.Err)
				return
			}
			ios.Add(1)
		}
	}()
	for size := uint64(2 << 20); size <= 32<<20; size += 1 << 20 {
		for n := ios.Load(); ios.Load() < n+3 && failed.Load() == nil; {
			runtime.Gosched()
		}
		if err := d.Resize(size); err != nil {
			t.Fatal(err)
		}
	}
	stop.Store(true)
	wg.Wait()
	if err, _ := failed.Load().(error); err != nil {
		t.Fatal(err)
	}
}

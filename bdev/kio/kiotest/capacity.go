package kiotest

// Capacity tests for kernel-backed bdevs (issue 10: bdev_resize and
// bdev_aio_rescan). Goal: Resize grows the served size and the backing
// file, Rescan picks up a file another process grew, neither ever shrinks a
// bdev a channel has open (SPDK refuses with -EBUSY), an Info once returned
// never changes, and IOs running on a reactor while the size changes see
// either size, never a torn one (run under -race). Method: real files in
// DirectDir; the "other process" is truncate(1) when it exists.

import (
	"errors"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"vhost-target/bdev"
	"vhost-target/bdev/kio"
)

// CapacitySuite runs the Resize/Rescan tests; f's bdevs must implement
// bdev.Resizer and bdev.Rescanner.
func CapacitySuite(t *testing.T, f Factory) {
	t.Run("ResizeGrow", func(t *testing.T) { testResizeGrow(t, f) })
	t.Run("ResizeShrink", func(t *testing.T) { testResizeShrink(t, f) })
	t.Run("ResizeRefused", func(t *testing.T) { testResizeRefused(t, f) })
	t.Run("RescanGrownByOther", func(t *testing.T) { testRescanGrown(t, f) })
	t.Run("RescanShrunk", func(t *testing.T) { testRescanShrunk(t, f) })
	t.Run("ResizeUnderIO", func(t *testing.T) { testResizeUnderIO(t, f) })
	t.Run("BlockDevice", func(t *testing.T) { testBlockDevice(t, f) })
}

// testBlockDevice: a block device (a loop device over a file) refuses
// Resize, saying why, and Rescan picks up the size its owner gave it
// (losetup -c after the file grew). Needs root and losetup(8).
func testBlockDevice(t *testing.T, f Factory) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a loop device")
	}
	if _, err := exec.LookPath("losetup"); err != nil {
		t.Skip("no losetup")
	}
	path := DirectDir(t) + "/loop.img"
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, 1<<20); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "--find", "--show", path).Output()
	if err != nil {
		t.Skipf("losetup: %v", err)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	d, err := f(kio.Options{Name: "blk", Path: dev, BlockSize: 512}, 8)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	err = d.(bdev.Resizer).Resize(2 << 20)
	if err == nil || !strings.Contains(err.Error(), "block device") {
		t.Errorf("Resize of a block device: %v, want a refusal naming the block device", err)
	}
	ch := Open(t, d)
	if err := os.Truncate(path, 3<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("losetup", "-c", dev).CombinedOutput(); err != nil {
		t.Skipf("losetup -c %s: %v %s", dev, err, out)
	}
	changed, err := d.(bdev.Rescanner).Rescan()
	if err != nil || !changed || d.Info().NumBlocks != 3<<20/512 {
		t.Fatalf("rescan of a grown block device: changed %v, err %v, %d blocks", changed, err, d.Info().NumBlocks)
	}
	buf := Mem(t, 4096)
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpRead, Offset: 3<<20 - 4096, Len: 4096, Iov: [][]byte{buf}}); err != nil {
		t.Errorf("read of the grown part: %v", err)
	}
}

func fileSize(t testing.TB, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Size
}

// growByOther extends path to size bytes from another process (truncate(1)),
// or from this one if the tool is missing.
func growByOther(t testing.TB, path string, size int64) {
	t.Helper()
	if _, err := exec.LookPath("truncate"); err == nil {
		if out, err := exec.Command("truncate", "-s", itoa(size), path).CombinedOutput(); err != nil {
			t.Fatalf("truncate -s %d %s: %v %s", size, path, err, out)
		}
		return
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
}

func itoa(n int64) string {
	var b [20]byte
	i := len(b)
	for {
		i--
		b[i] = byte('0' + n%10)
		n /= 10
		if n == 0 {
			return string(b[i:])
		}
	}
}

func testResizeGrow(t *testing.T, f Factory) {
	d, path := New(t, f, 1<<20, 512, 8)
	r := d.(bdev.Resizer)
	old := d.Info()
	oldCopy := *old
	ch := Open(t, d)
	buf := Mem(t, 4096)
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpWrite, Offset: 1<<20 - 4096, Len: 4096, Iov: [][]byte{buf}}); err != nil {
		t.Fatal(err)
	}
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpRead, Offset: 1 << 20, Len: 4096, Iov: [][]byte{buf}}); !errors.Is(err, bdev.ErrRange) {
		t.Fatalf("read past the end before the grow: %v", err)
	}
	// Growing is allowed with a channel open.
	if err := r.Resize(4 << 20); err != nil {
		t.Fatal(err)
	}
	if *old != oldCopy {
		t.Errorf("an Info handed out changed: %+v, was %+v", *old, oldCopy)
	}
	if n := d.Info().NumBlocks; n != 4<<20/512 {
		t.Errorf("NumBlocks %d after growing to 4 MiB", n)
	}
	if s := fileSize(t, path); s != 4<<20 {
		t.Errorf("backing file holds %d bytes, want 4 MiB", s)
	}
	buf[0] = 0x5a
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpWrite, Offset: 4<<20 - 4096, Len: 4096, Iov: [][]byte{buf}}); err != nil {
		t.Fatalf("write to the last block after the grow: %v", err)
	}
	buf[0] = 0
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpRead, Offset: 4<<20 - 4096, Len: 4096, Iov: [][]byte{buf}}); err != nil || buf[0] != 0x5a {
		t.Fatalf("read back the last block: %v, byte %#x", err, buf[0])
	}
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpRead, Offset: 4 << 20, Len: 512, Iov: [][]byte{buf}}); !errors.Is(err, bdev.ErrRange) {
		t.Errorf("read past the new end: %v", err)
	}
	// Same size again: nothing to do.
	if err := r.Resize(4 << 20); err != nil {
		t.Error(err)
	}
}

func testResizeShrink(t *testing.T, f Factory) {
	d, path := New(t, f, 4<<20, 4096, 8)
	r := d.(bdev.Resizer)
	ch, err := d.Open()
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Resize(1 << 20); !errors.Is(err, bdev.ErrInUse) {
		t.Fatalf("shrink with a channel open: %v, want ErrInUse", err)
	}
	if n := d.Info().NumBlocks; n != 4<<20/4096 {
		t.Fatalf("a refused shrink changed NumBlocks to %d", n)
	}
	if err := ch.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.Resize(1 << 20); err != nil {
		t.Fatalf("shrink with no channel open: %v", err)
	}
	if n := d.Info().NumBlocks; n != 1<<20/4096 {
		t.Errorf("NumBlocks %d after shrinking to 1 MiB", n)
	}
	// The file keeps its data: a shrink only serves less.
	if s := fileSize(t, path); s != 4<<20 {
		t.Errorf("a shrink changed the backing file to %d bytes", s)
	}
	ch = Open(t, d)
	buf := Mem(t, 4096)
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpRead, Offset: 1 << 20, Len: 4096, Iov: [][]byte{buf}}); !errors.Is(err, bdev.ErrRange) {
		t.Errorf("read past the shrunk end: %v", err)
	}
}

func testResizeRefused(t *testing.T, f Factory) {
	d, _ := New(t, f, 1<<20, 4096, 8)
	r := d.(bdev.Resizer)
	for _, size := range []uint64{0, 1<<20 + 512} {
		if err := r.Resize(size); err == nil {
			t.Errorf("Resize(%d) on a 4096-byte-block bdev succeeded", size)
		}
	}
	path := DirectDir(t) + "/ro.img"
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	ro, err := f(kio.Options{Name: "ro", Path: path, BlockSize: 512, ReadOnly: true}, 8)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if err := ro.(bdev.Resizer).Resize(2 << 20); err == nil {
		t.Error("a read-only bdev was resized")
	}
	// Rescan works read-only: it only reads the size.
	growByOther(t, path, 2<<20)
	if changed, err := ro.(bdev.Rescanner).Rescan(); err != nil || !changed || ro.Info().NumBlocks != 2<<20/512 {
		t.Errorf("rescan of a read-only bdev: changed %v, err %v, %d blocks", changed, err, ro.Info().NumBlocks)
	}
}

func testRescanGrown(t *testing.T, f Factory) {
	d, path := New(t, f, 1<<20, 512, 8)
	rs := d.(bdev.Rescanner)
	ch := Open(t, d)
	if changed, err := rs.Rescan(); err != nil || changed {
		t.Fatalf("rescan of an unchanged file: changed %v, err %v", changed, err)
	}
	old := d.Info()
	growByOther(t, path, 3<<20+100) // not a whole block more: rounded down
	changed, err := rs.Rescan()
	if err != nil || !changed {
		t.Fatalf("rescan after another process grew the file: changed %v, err %v", changed, err)
	}
	if n := d.Info().NumBlocks; n != 3<<20/512 {
		t.Errorf("NumBlocks %d, want %d", n, 3<<20/512)
	}
	if old.NumBlocks != 1<<20/512 {
		t.Errorf("the Info handed out before the rescan changed: %d blocks", old.NumBlocks)
	}
	buf := Mem(t, 4096)
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpRead, Offset: 3<<20 - 4096, Len: 4096, Iov: [][]byte{buf}}); err != nil {
		t.Errorf("read of the grown part on a channel opened before: %v", err)
	}
	if changed, err := rs.Rescan(); err != nil || changed {
		t.Errorf("second rescan: changed %v, err %v", changed, err)
	}
}

func testRescanShrunk(t *testing.T, f Factory) {
	d, path := New(t, f, 2<<20, 512, 8)
	rs := d.(bdev.Rescanner)
	ch, err := d.Open()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, 1<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := rs.Rescan(); !errors.Is(err, bdev.ErrInUse) {
		t.Errorf("rescan of a shrunk file with a channel open: %v, want ErrInUse", err)
	}
	if n := d.Info().NumBlocks; n != 2<<20/512 {
		t.Errorf("a refused rescan changed NumBlocks to %d", n)
	}
	ch.Close()
	if changed, err := rs.Rescan(); err != nil || !changed || d.Info().NumBlocks != 1<<20/512 {
		t.Errorf("rescan of a shrunk file, closed: changed %v, err %v, %d blocks", changed, err, d.Info().NumBlocks)
	}
	if err := os.Truncate(path, 100); err != nil {
		t.Fatal(err)
	}
	if _, err := rs.Rescan(); err == nil {
		t.Error("rescan of a file smaller than a block succeeded")
	}
}

// testResizeUnderIO grows the bdev while a goroutine (the reactor) keeps
// reading the last block it was told about; under -race it checks that the
// size and Info are published without a data race, and that no IO fails.
func testResizeUnderIO(t *testing.T, f Factory) {
	d, _ := New(t, f, 1<<20, 512, 8)
	r := d.(bdev.Resizer)
	var stop atomic.Bool
	var wg sync.WaitGroup
	var failed atomic.Value
	var ios atomic.Int64
	buf := Mem(t, 4096)
	wg.Add(1)
	go func() {
		defer wg.Done()
		ch, err := d.Open()
		if err != nil {
			failed.Store(err)
			return
		}
		defer ch.Close()
		var w Waiter
		io := &bdev.IO{Done: &w}
		for !stop.Load() {
			info := d.Info() // one snapshot per IO: its geometry is consistent
			w.Done = w.Done[:0]
			*io = bdev.IO{Op: bdev.OpRead, Offset: info.NumBlocks*512 - 512, Len: 512, Iov: [][]byte{buf[:512]}, Done: &w}
			ch.Submit(io)
			for len(w.Done) == 0 {
				ch.Poll()
			}
			if io.Err != nil {
				failed.Store(io.Err)
				return
			}
			ios.Add(1)
		}
	}()
	for size := uint64(2 << 20); size <= 16<<20; size += 1 << 20 {
		// Let a few IOs run against each size.
		for n := ios.Load(); ios.Load() < n+3 && failed.Load() == nil; {
			runtime.Gosched()
		}
		if err := r.Resize(size); err != nil {
			t.Fatal(err)
		}
	}
	stop.Store(true)
	wg.Wait()
	if err, _ := failed.Load().(error); err != nil {
		t.Fatalf("IO during resizes: %v", err)
	}
}

//go:build rbd

// Tests for the rbd bdev on a one-host Ceph cluster (cephtest, needs root):
// kiotest's random I/O against a model (unaligned, split iovecs, unmap,
// write zeroes, write same, flush; several channels at once), ranges, a
// FIFO beyond the queue depth, read-only, the completion eventfd, flushed
// data seen by another client (rbd export), no allocations per IO, and the
// start-up errors: a missing image or pool, an unreachable cluster.
package rbd

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"vhost-target/bdev"
	"vhost-target/bdev/kio/kiotest"
	"vhost-target/bdev/rbd/cephtest"
)

// TestRBD starts one cluster and runs every test that needs it as a subtest.
func TestRBD(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Ceph cluster (root, Debian's ceph packages): `make rbd` runs it")
	}
	c := cephtest.Start(t)
	images := 0
	// open makes a fresh image of size bytes and the bdev over it.
	open := func(t *testing.T, size uint64, bs uint32, qd int) *Disk {
		t.Helper()
		images++
		name := fmt.Sprintf("img%d", images)
		c.CreateImage(t, name, size)
		d, err := Open(Config{Name: "r0", Pool: c.Pool, Image: name, Conf: c.Conf, User: c.User,
			Keyring: c.Keyring, BlockSize: bs, QueueDepth: qd})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := d.Close(); err != nil {
				t.Error(err)
			}
		})
		return d
	}
	cfg := func(image string) Config {
		return Config{Name: "r0", Pool: c.Pool, Image: image, Conf: c.Conf, User: c.User, Keyring: c.Keyring}
	}
	t.Run("RandomIO", func(t *testing.T) {
		for _, k := range []struct {
			name string
			bs   uint32
			qd   int
		}{{"bs512", 512, 64}, {"bs4096", 4096, 64}, {"bs512-qd4", 512, 4}} {
			t.Run(k.name, func(t *testing.T) {
				d := open(t, 64<<20, k.bs, k.qd)
				info := d.Info()
				if info.WriteCache || !info.Unmap || !info.UnmapZeroes || !info.WriteZeroes || info.ReadOnly ||
					info.Type != "rbd" || info.BlockSize != k.bs || info.NumBlocks != 64<<20/uint64(k.bs) {
					t.Fatalf("info = %+v", info)
				}
				kiotest.RandomIO(t, d, kiotest.RandomOptions{Goroutines: 4, Ops: 800, Depth: 16, MaxLen: 320 << 10,
					Seed: uint64(k.bs), Unaligned: 0.3})
			})
		}
	})
	t.Run("Range", func(t *testing.T) { testRange(t, open(t, 1<<20, 512, 8)) })
	t.Run("QueueDepthOne", func(t *testing.T) { testQueueDepthOne(t, open(t, 1<<20, 512, 1)) })
	t.Run("NoAllocs", func(t *testing.T) { testAllocs(t, open(t, 1<<20, 512, 8)) })
	t.Run("EventFD", func(t *testing.T) { testEventFD(t, open(t, 1<<20, 512, 8)) })
	t.Run("UUID", func(t *testing.T) {
		d := open(t, 1<<20, 512, 8)
		name := fmt.Sprintf("img%d", images)
		d2, err := Open(cfg(name))
		if err != nil {
			t.Fatal(err)
		}
		defer d2.Close()
		if d.Info().UUID != d2.Info().UUID || d.Info().UUID == ([16]byte{}) {
			t.Errorf("UUIDs of one image: %x, %x", d.Info().UUID, d2.Info().UUID)
		}
		other := open(t, 1<<20, 512, 8)
		if other.Info().UUID == d.Info().UUID {
			t.Error("two images have one UUID")
		}
	})
	t.Run("Resize", func(t *testing.T) {
		d := open(t, 1<<20, 512, 8)
		name := fmt.Sprintf("img%d", images)
		ch := kiotest.Open(t, d)
		buf := kiotest.Mem(t, 4096)
		for i := range buf {
			buf[i] = byte(i * 3)
		}
		beyond := &bdev.IO{Op: bdev.OpWrite, Offset: 1 << 20, Len: 4096, Iov: [][]byte{buf}}
		if err := kiotest.Do(t, ch, beyond); !errors.Is(err, bdev.ErrRange) {
			t.Fatalf("write beyond the end: %v, want ErrRange", err)
		}
		old := d.Info()
		if err := d.Resize(2 << 20); err != nil {
			t.Fatal(err)
		}
		if d.Info().NumBlocks != 2<<20/512 || old.NumBlocks != 1<<20/512 {
			t.Fatalf("after resize: %d blocks (the old Info says %d)", d.Info().NumBlocks, old.NumBlocks)
		}
		if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpWrite, Offset: 1 << 20, Len: 4096, Iov: [][]byte{buf}}); err != nil {
			t.Fatal(err)
		}
		if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpFlush}); err != nil {
			t.Fatal(err)
		}
		img := c.Export(t, name)
		if len(img) != 2<<20 || !bytes.Equal(img[1<<20:1<<20+4096], buf) {
			t.Fatalf("export after the grow: %d bytes, or the new part lacks the write", len(img))
		}
		if err := d.Resize(1 << 20); !errors.Is(err, bdev.ErrInUse) || !strings.Contains(err.Error(), "allow-shrink") {
			t.Errorf("shrink: %v", err)
		}
		if err := d.Resize(1000); err == nil {
			t.Error("resize to a size that is not a multiple of the block size was accepted")
		}
		// Another client grows the image; a rescan serves it.
		c.RBD(t, "resize", "--size", "3M", c.Pool+"/"+name)
		if changed, err := d.Rescan(); err != nil || !changed || d.Info().NumBlocks != 3<<20/512 {
			t.Fatalf("rescan after rbd resize: changed %v, %v, %d blocks", changed, err, d.Info().NumBlocks)
		}
		if changed, err := d.Rescan(); err != nil || changed {
			t.Fatalf("second rescan: changed %v, %v", changed, err)
		}
		// Shrunk from outside while a channel is open: refused, the size stays.
		c.RBD(t, "resize", "--allow-shrink", "--size", "2M", c.Pool+"/"+name)
		if _, err := d.Rescan(); !errors.Is(err, bdev.ErrInUse) || d.Info().NumBlocks != 3<<20/512 {
			t.Fatalf("rescan of a shrunk image with a channel open: %v, %d blocks", err, d.Info().NumBlocks)
		}
	})
	t.Run("WatchCapacity", func(t *testing.T) {
		images++
		name := fmt.Sprintf("img%d", images)
		c.CreateImage(t, name, 1<<20)
		d, err := Open(cfg(name))
		if err != nil {
			t.Fatal(err)
		}
		changed := make(chan struct{}, 16)
		if err := d.WatchCapacity(func() { changed <- struct{}{} }); err != nil {
			t.Fatal(err)
		}
		if err := d.WatchCapacity(func() {}); err == nil {
			t.Error("a second watch was accepted")
		}
		c.RBD(t, "resize", "--size", "2M", c.Pool+"/"+name)
		select {
		case <-changed:
		case <-time.After(30 * time.Second):
			t.Fatal("no watch callback within 30 s of rbd resize")
		}
		if ch, err := d.Rescan(); err != nil || !ch || d.Info().NumBlocks != 2<<20/512 {
			t.Fatalf("rescan after the callback: %v %v, %d blocks", ch, err, d.Info().NumBlocks)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		for len(changed) > 0 {
			<-changed
		}
		c.RBD(t, "resize", "--size", "3M", c.Pool+"/"+name)
		select {
		case <-changed:
			t.Error("a watch callback after Close")
		case <-time.After(3 * time.Second):
		}
	})
	t.Run("FlushedSeenByExport", func(t *testing.T) {
		d := open(t, 4<<20, 512, 8)
		name := fmt.Sprintf("img%d", images)
		ch := kiotest.Open(t, d)
		buf := kiotest.Mem(t, 64<<10)
		for i := range buf {
			buf[i] = byte(i*7 + i/4096)
		}
		if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpWrite, Offset: 128 << 10, Len: 64 << 10,
			Iov: [][]byte{buf[:1000], buf[1000:40000], buf[40000:]}}); err != nil {
			t.Fatal(err)
		}
		if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpFlush}); err != nil {
			t.Fatal(err)
		}
		// The image is still open here: only a flush puts cached writes on the OSDs.
		img := c.Export(t, name)
		if !bytes.Equal(img[128<<10:192<<10], buf) {
			t.Fatal("data written and flushed is not in the image another client reads")
		}
	})
	t.Run("ReadOnly", func(t *testing.T) {
		d := open(t, 1<<20, 512, 8)
		name := fmt.Sprintf("img%d", images)
		ch := kiotest.Open(t, d)
		buf := kiotest.Mem(t, 4096)
		buf[0] = 0x77
		if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpWrite, Offset: 4096, Len: 4096, Iov: [][]byte{buf}}); err != nil {
			t.Fatal(err)
		}
		if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpFlush}); err != nil {
			t.Fatal(err)
		}
		rc := cfg(name)
		rc.ReadOnly = true
		ro, err := Open(rc)
		if err != nil {
			t.Fatal(err)
		}
		defer ro.Close()
		if info := ro.Info(); !info.ReadOnly || info.Unmap || info.WriteZeroes {
			t.Errorf("info = %+v", info)
		}
		rch := kiotest.Open(t, ro)
		for _, op := range []bdev.Op{bdev.OpWrite, bdev.OpWriteZeroes, bdev.OpWriteSame, bdev.OpUnmap} {
			io := &bdev.IO{Op: op, Offset: 0, Len: 4096, Iov: [][]byte{buf}, NRanges: 1,
				Ranges: [bdev.MaxRanges]bdev.Range{{Offset: 0, Len: 4096}}}
			if err := kiotest.Do(t, rch, io); !errors.Is(err, bdev.ErrReadOnly) {
				t.Errorf("%v: err %v, want ErrReadOnly", op, err)
			}
		}
		buf[0] = 0
		if err := kiotest.Do(t, rch, &bdev.IO{Op: bdev.OpRead, Offset: 4096, Len: 4096, Iov: [][]byte{buf}}); err != nil || buf[0] != 0x77 {
			t.Fatalf("read-only read: %v, byte %#x", err, buf[0])
		}
	})
	t.Run("CloseInFlight", func(t *testing.T) {
		d := open(t, 1<<20, 512, 8)
		ch, err := d.Open()
		if err != nil {
			t.Fatal(err)
		}
		if err := d.Close(); err == nil {
			t.Error("Close of a disk with a channel open succeeded")
		}
		buf := kiotest.Mem(t, 4096)
		var w kiotest.Waiter
		io := &bdev.IO{Op: bdev.OpRead, Len: 4096, Iov: [][]byte{buf}, Done: &w}
		ch.Submit(io)
		if err := ch.Close(); !errors.Is(err, ErrInFlight) {
			t.Errorf("Close with an IO in flight: %v", err)
		}
		for deadline := time.Now().Add(10 * time.Second); len(w.Done) == 0 && time.Now().Before(deadline); {
			ch.Poll()
		}
		if len(w.Done) != 1 || io.Err != nil {
			t.Fatalf("done %d, err %v", len(w.Done), io.Err)
		}
		if err := ch.Close(); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("MissingImage", func(t *testing.T) {
		begin := time.Now()
		_, err := Open(cfg("nope"))
		if err == nil || !strings.Contains(err.Error(), `bdev "r0"`) || !strings.Contains(err.Error(), "nope") ||
			!strings.Contains(err.Error(), "no such image") {
			t.Errorf("missing image: %v", err)
		}
		t.Logf("%v (%v)", err, time.Since(begin).Round(time.Millisecond))
	})
	t.Run("MissingPool", func(t *testing.T) {
		bad := cfg("img1")
		bad.Pool = "nopool"
		_, err := Open(bad)
		if err == nil || !strings.Contains(err.Error(), `bdev "r0"`) || !strings.Contains(err.Error(), "nopool") {
			t.Errorf("missing pool: %v", err)
		}
	})
	t.Run("BadConfig", func(t *testing.T) {
		for _, bc := range []Config{
			{Name: "r0", Pool: c.Pool, Image: "img1", Conf: c.Conf, BlockSize: 1024},
			{Name: "r0", Image: "img1", Conf: c.Conf},
			{Name: "r0", Pool: c.Pool, Image: "img1", Conf: "/nonexistent/ceph.conf"},
		} {
			if _, err := Open(bc); err == nil || !strings.Contains(err.Error(), `bdev "r0"`) {
				t.Errorf("%+v: %v", bc, err)
			}
		}
	})
	t.Run("OSDDown", func(t *testing.T) {
		// With the OSD stopped an IO fails after OpTimeout (ETIMEDOUT: a
		// medium error, not a hang); once it is back, IO works again.
		images++
		name := fmt.Sprintf("img%d", images)
		c.CreateImage(t, name, 1<<20)
		oc := cfg(name)
		oc.OpTimeout = 3 * time.Second
		d, err := Open(oc)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		ch := kiotest.Open(t, d)
		buf := kiotest.Mem(t, 4096)
		buf[0] = 1
		if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpWrite, Len: 4096, Iov: [][]byte{buf}}); err != nil {
			t.Fatal(err)
		}
		c.StopOSD(t)
		osdUp := false
		defer func() {
			if !osdUp {
				c.StartOSD(t)
			}
		}()
		begin := time.Now()
		var w kiotest.Waiter
		io := &bdev.IO{Op: bdev.OpRead, Offset: 8192, Len: 4096, Iov: [][]byte{buf}, Done: &w}
		ch.Submit(io)
		for len(w.Done) == 0 && time.Since(begin) < 60*time.Second {
			if ch.Poll() == 0 {
				time.Sleep(time.Millisecond)
			}
		}
		took := time.Since(begin)
		if len(w.Done) != 1 || !errors.Is(io.Err, bdev.ErrIO) {
			t.Fatalf("read with the OSD down: done %d, err %v after %v", len(w.Done), io.Err, took)
		}
		t.Logf("read with the OSD down: %v after %v", io.Err, took.Round(time.Millisecond))
		c.StartOSD(t)
		osdUp = true
		begin = time.Now()
		for {
			buf[0] = 2
			err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpWrite, Len: 4096, Iov: [][]byte{buf}})
			if err == nil {
				break
			}
			if time.Since(begin) > 90*time.Second {
				t.Fatalf("write after the OSD restarted: %v", err)
			}
		}
		buf[0] = 0
		if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpRead, Len: 4096, Iov: [][]byte{buf}}); err != nil || buf[0] != 2 {
			t.Fatalf("read back after the OSD restarted: %v, byte %d", err, buf[0])
		}
		t.Logf("IO served again %v after the OSD started", time.Since(begin).Round(time.Millisecond))
	})
	t.Run("Blocklisted", func(t *testing.T) {
		images++
		name := fmt.Sprintf("img%d", images)
		c.CreateImage(t, name, 1<<20)
		var logs bytes.Buffer
		var mu sync.Mutex
		bc := cfg(name)
		bc.Logger = slog.New(slog.NewTextHandler(lockedWriter{&mu, &logs}, nil))
		bc.OpTimeout = 10 * time.Second
		d, err := Open(bc)
		if err != nil {
			t.Fatal(err)
		}
		ch, err := d.Open()
		if err != nil {
			t.Fatal(err)
		}
		buf := kiotest.Mem(t, 4096)
		if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpWrite, Len: 4096, Iov: [][]byte{buf}}); err != nil {
			t.Fatal(err)
		}
		addrs, err := d.clientAddrs()
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range strings.Split(strings.Trim(addrs, "[]"), ",") {
			a = strings.TrimPrefix(strings.TrimPrefix(a, "v2:"), "v1:")
			c.Ceph(t, "osd", "blocklist", "add", a)
		}
		t.Logf("blocklisted %s", addrs)
		failed := 0
		for begin := time.Now(); failed < 3 && time.Since(begin) < 60*time.Second; {
			if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpWrite, Offset: 4096, Len: 4096, Iov: [][]byte{buf}}); err != nil {
				if !errors.Is(err, bdev.ErrIO) {
					t.Fatalf("write of a blocklisted client: %v", err)
				}
				failed++
			}
		}
		mu.Lock()
		log := logs.String()
		mu.Unlock()
		if failed < 3 || strings.Count(log, "blocklisted") != 1 || !strings.Contains(log, "bdev=r0") {
			t.Errorf("blocklisted client: %d writes failed; log %q", failed, log)
		}
		if err := ch.Close(); err != nil {
			t.Fatal(err)
		}
		closed := make(chan error, 1)
		go func() { closed <- d.Close() }()
		select {
		case err := <-closed:
			t.Logf("close of a blocklisted disk: %v", err)
		case <-time.After(60 * time.Second):
			t.Error("close of a blocklisted disk hangs")
		}
	})
	t.Run("VersusFio", func(t *testing.T) {
		if os.Getenv("VHOST_TARGET_RBD_PERF") == "" {
			t.Skip("a 12 x 5 s performance comparison: VHOST_TARGET_RBD_PERF=1 runs it")
		}
		if _, err := exec.LookPath("fio"); err != nil {
			t.Skip("no fio")
		}
		images++
		name := fmt.Sprintf("img%d", images)
		const size = 256 << 20
		c.CreateImage(t, name, size)
		c.Fill(t, name, size)
		// A one-OSD cluster on this host drifts (BlueStore on a sparse file,
		// sharing the CPUs): rounds alternate, and the ratio is of the sums.
		for _, rw := range []string{"randread", "randwrite"} {
			var sumOurs, sumFio float64
			for round := 0; round < 3; round++ {
				ours := benchIOPS(t, cfg(name), rw == "randwrite", 4096, 32, 5*time.Second)
				fio := c.FioIOPS(t, name, rw, 4096, 32, 5*time.Second)
				sumOurs, sumFio = sumOurs+ours, sumFio+fio
				t.Logf("%s 4 KiB QD32 round %d: rbd bdev %.0f IOPS, fio --ioengine=rbd %.0f IOPS", rw, round, ours, fio)
			}
			t.Logf("%s 4 KiB QD32: rbd bdev %.2fx fio", rw, sumOurs/sumFio)
		}
	})
	t.Run("UnreachableCluster", func(t *testing.T) {
		// A ceph.conf naming a monitor nobody listens on.
		conf := filepath.Join(t.TempDir(), "ceph.conf")
		if err := os.WriteFile(conf, []byte("[global]\nmon_host = 127.0.0.1:9\nauth_client_required = cephx\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		bad := cfg("img1")
		bad.Conf = conf
		begin := time.Now()
		_, err := Open(bad)
		took := time.Since(begin)
		if err == nil || !strings.Contains(err.Error(), `bdev "r0"`) || !strings.Contains(err.Error(), "connect") {
			t.Errorf("unreachable cluster: %v", err)
		}
		if took > 10*time.Second {
			t.Errorf("unreachable cluster: error after %v, want within 10 s", took)
		}
		t.Logf("%v (after %v)", err, took.Round(time.Millisecond))
	})
}

// benchIOPS drives one channel from one goroutine (a reactor) at queue
// depth qd with random bs-byte reads or writes for d, sleeping on the
// channel's eventfd when a Poll finds nothing.
func benchIOPS(t *testing.T, c Config, write bool, bs, qd int, d time.Duration) float64 {
	c.QueueDepth = qd
	disk, err := Open(c)
	if err != nil {
		t.Fatal(err)
	}
	defer disk.Close()
	ch, err := disk.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	mem := kiotest.Mem(t, qd*bs)
	ios := make([]bdev.IO, qd)
	var w kiotest.Waiter
	w.Done = make([]*bdev.IO, 0, qd)
	op := bdev.OpRead
	if write {
		op = bdev.OpWrite
	}
	blocks := disk.Info().NumBlocks * uint64(disk.Info().BlockSize) / uint64(bs)
	x := uint64(88172645463325252)
	next := func() uint64 { x ^= x << 13; x ^= x >> 7; x ^= x << 17; return x % blocks * uint64(bs) }
	for i := range ios {
		ios[i] = bdev.IO{Op: op, Offset: next(), Len: uint64(bs), Iov: [][]byte{mem[i*bs : (i+1)*bs]}, Done: &w}
		ch.Submit(&ios[i])
	}
	efd := ch.(bdev.Waker).EventFD()
	var eb [8]byte
	pfd := []unix.PollFd{{Fd: int32(efd), Events: unix.POLLIN}}
	done := 0
	begin := time.Now()
	for {
		if ch.Poll() == 0 {
			// Nothing finished: sleep on the eventfd as an adaptive reactor
			// does (this host's 2 CPUs also run the OSD and librbd).
			unix.Poll(pfd, 100)
			unix.Read(efd, eb[:])
			continue
		}
		for _, io := range w.Done {
			if io.Err != nil {
				t.Fatal(io.Err)
			}
			done++
		}
		stop := time.Since(begin) > d
		for _, io := range w.Done {
			if !stop {
				io.Offset = next()
				ch.Submit(io)
			}
		}
		w.Done = w.Done[:0]
		if stop && ch.InFlight() == 0 {
			break
		}
	}
	return float64(done) / time.Since(begin).Seconds()
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func testRange(t *testing.T, d *Disk) {
	ch := kiotest.Open(t, d)
	buf := kiotest.Mem(t, 8192)
	cases := []bdev.IO{
		{Op: bdev.OpRead, Offset: 1 << 20, Len: 512, Iov: [][]byte{buf}},
		{Op: bdev.OpRead, Offset: 1<<20 - 512, Len: 1024, Iov: [][]byte{buf}},
		{Op: bdev.OpWrite, Offset: 100, Len: 512, Iov: [][]byte{buf}},
		{Op: bdev.OpWrite, Offset: 0, Len: 8192, Iov: [][]byte{buf[:4096]}},
		{Op: bdev.OpWriteZeroes, Offset: ^uint64(0) - 511, Len: 1024},
		{Op: bdev.OpWriteSame, Offset: 0, Len: 1024, Iov: [][]byte{buf[:100]}},
		{Op: bdev.OpUnmap, NRanges: 1, Ranges: [bdev.MaxRanges]bdev.Range{{Offset: 1 << 20, Len: 512}}},
	}
	for i := range cases {
		if err := kiotest.Do(t, ch, &cases[i]); !errors.Is(err, bdev.ErrRange) {
			t.Errorf("case %d (%v): err %v, want ErrRange", i, cases[i].Op, err)
		}
	}
	if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.Op(99)}); !errors.Is(err, bdev.ErrNotSup) {
		t.Errorf("unknown op: err %v", err)
	}
	if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpWrite, Offset: 1<<20 - 512, Len: 512, Iov: [][]byte{buf[:512]}}); err != nil {
		t.Errorf("last block: %v", err)
	}
	// Unmap of several ranges (one librbd completion each) reads back zeroes.
	for i := range buf {
		buf[i] = 0xAB
	}
	if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpWrite, Offset: 0, Len: 8192, Iov: [][]byte{buf}}); err != nil {
		t.Fatal(err)
	}
	io := &bdev.IO{Op: bdev.OpUnmap, NRanges: 3}
	io.Ranges[0] = bdev.Range{Offset: 512, Len: 1024}
	io.Ranges[1] = bdev.Range{Offset: 3072, Len: 0}
	io.Ranges[2] = bdev.Range{Offset: 4096, Len: 2048}
	if err := kiotest.Do(t, ch, io); err != nil {
		t.Fatal(err)
	}
	if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpRead, Offset: 0, Len: 8192, Iov: [][]byte{buf}}); err != nil {
		t.Fatal(err)
	}
	for i, b := range buf {
		zero := i >= 512 && i < 1536 || i >= 4096 && i < 6144
		if zero != (b == 0) {
			t.Fatalf("after unmapping [512,1536) and [4096,6144): byte %d is %#x", i, b)
		}
	}
	// WRITE SAME with its pattern in Go memory (as SCSI gives it): the
	// slot's C copy is what librbd repeats.
	pattern := make([]byte, 512)
	for i := range pattern {
		pattern[i] = byte(i) | 1
	}
	if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpWriteSame, Offset: 0, Len: 8192, Iov: [][]byte{pattern}}); err != nil {
		t.Fatal(err)
	}
	clear(pattern)
	if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpRead, Offset: 0, Len: 8192, Iov: [][]byte{buf}}); err != nil {
		t.Fatal(err)
	}
	for i, b := range buf {
		if b != byte(i%512)|1 {
			t.Fatalf("after WRITE SAME: byte %d is %#x", i, b)
		}
	}
	if ch.InFlight() != 0 {
		t.Errorf("InFlight = %d", ch.InFlight())
	}
}

// testQueueDepthOne submits far more IOs than slots: the rest wait in the
// FIFO and every IO completes exactly once.
func testQueueDepthOne(t *testing.T, d *Disk) {
	ch := kiotest.Open(t, d)
	mem := kiotest.Mem(t, 200*4096)
	var w kiotest.Waiter
	ios := make([]bdev.IO, 200)
	for i := range ios {
		b := mem[i*4096 : (i+1)*4096]
		for j := range b {
			b[j] = byte(i)
		}
		iov := [][]byte{b[:512]}
		if i%3 == 0 {
			iov = [][]byte{b[1:300], b[301:514]}
		}
		ios[i] = bdev.IO{Op: bdev.OpWrite, Offset: uint64(i) * 512, Len: 512, Iov: iov, Done: &w}
		ch.Submit(&ios[i])
	}
	if ch.InFlight() != 200 {
		t.Fatalf("InFlight = %d after 200 submissions, want 200", ch.InFlight())
	}
	for deadline := time.Now().Add(30 * time.Second); len(w.Done) < 200; {
		if ch.Poll() == 0 && time.Now().After(deadline) {
			t.Fatalf("%d of 200 done after 30 s", len(w.Done))
		}
	}
	seen := map[*bdev.IO]bool{}
	for _, io := range w.Done {
		if seen[io] || io.Err != nil {
			t.Fatalf("IO completed twice or failed: %v", io.Err)
		}
		seen[io] = true
	}
	buf := kiotest.Mem(t, 200*512)
	if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpRead, Len: 200 * 512, Iov: [][]byte{buf}}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 200; i++ {
		got := buf[i*512]
		if i%3 == 0 {
			got = buf[i*512+299]
		}
		if got != byte(i) {
			t.Fatalf("block %d = %d, want %d", i, got, i)
		}
	}
}

// testAllocs: submitting and reaping allocates nothing on the Go side.
func testAllocs(t *testing.T, d *Disk) {
	mem := kiotest.Mem(t, 16384)
	kiotest.NoAllocs(t, kiotest.Open(t, d), []bdev.IO{
		{Op: bdev.OpRead, Offset: 0, Len: 4096, Iov: [][]byte{mem[:4096]}},
		{Op: bdev.OpWrite, Offset: 8192, Len: 4096, Iov: [][]byte{mem[4097:6000], mem[6000:8290]}},
		{Op: bdev.OpRead, Offset: 8192, Len: 4096, Iov: [][]byte{mem[8193:12289]}},
		{Op: bdev.OpWriteZeroes, Offset: 65536, Len: 8192},
		{Op: bdev.OpWriteSame, Offset: 131072, Len: 8192, Iov: [][]byte{mem[12289:12801]}},
		{Op: bdev.OpUnmap, NRanges: 2, Ranges: [bdev.MaxRanges]bdev.Range{{Offset: 196608, Len: 4096}, {Offset: 262144, Len: 512}}},
		{Op: bdev.OpFlush},
	})
}

// testEventFD: a completion makes the channel's eventfd readable.
func testEventFD(t *testing.T, d *Disk) {
	ch := kiotest.Open(t, d)
	fd := ch.(bdev.Waker).EventFD()
	if fd < 0 || ch.(bdev.Waker).EventFD() != fd {
		t.Fatalf("EventFD = %d", fd)
	}
	mem := kiotest.Mem(t, 4096)
	for _, io := range []*bdev.IO{
		{Op: bdev.OpWrite, Len: 4096, Iov: [][]byte{mem}},
		{Op: bdev.OpRead, Len: 4096, Iov: [][]byte{mem}},
		{Op: bdev.OpFlush},
		{Op: bdev.OpUnmap, NRanges: 1, Ranges: [bdev.MaxRanges]bdev.Range{{Offset: 0, Len: 4096}}},
	} {
		var w kiotest.Waiter
		io.Done = &w
		ch.Submit(io)
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(pfd, 10000)
		if err != nil || n != 1 {
			t.Fatalf("%v: eventfd not readable: %d %v", io.Op, n, err)
		}
		var b [8]byte
		unix.Read(fd, b[:])
		if ch.Poll() != 1 || len(w.Done) != 1 || io.Err != nil {
			t.Fatalf("%v: after the wake-up: done %d err %v", io.Op, len(w.Done), io.Err)
		}
	}
}

// Tests for the aio bdev, on both engines: the shared kernel-bdev suite
// (random I/O against a model with unaligned iovecs, bad files, read-only,
// ranges, FIFO beyond the queue depth, truncation, holes, no allocations),
// the io_uring → Linux AIO fallback, the completion eventfd, flush durability
// across a SIGKILL, and benchmarks.
package aio

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"vhost-target/bdev"
	"vhost-target/bdev/kio"
	"vhost-target/bdev/kio/kiotest"
)

func factory(engine string) kiotest.Factory {
	return func(o kio.Options, qd int) (bdev.Bdev, error) {
		return New(Config{Name: o.Name, Path: o.Path, Size: o.Size, BlockSize: o.BlockSize, Create: o.Create,
			ReadOnly: o.ReadOnly, Engine: engine, QueueDepth: qd, UUID: [16]byte{2}})
	}
}

func needURing(t testing.TB) {
	if _, err := chooseEngine(EngineURing, slog.Default(), "probe"); err != nil {
		t.Skipf("io_uring unavailable here: %v", err)
	}
}

func TestSuiteURing(t *testing.T) {
	needURing(t)
	kiotest.Suite(t, factory(EngineURing))
}

func TestSuiteLibaio(t *testing.T) { kiotest.Suite(t, factory(EngineLibaio)) }

// TestCapacity runs the Resize/Rescan suite (bdev_resize, bdev_aio_rescan)
// on both engines.
func TestCapacity(t *testing.T) {
	t.Run("libaio", func(t *testing.T) { kiotest.CapacitySuite(t, factory(EngineLibaio)) })
	t.Run("uring", func(t *testing.T) {
		needURing(t)
		kiotest.CapacitySuite(t, factory(EngineURing))
	})
}

// TestLibaioGetevents runs random I/O with the user-space completion ring
// disabled, so reaping goes through io_getevents(min_nr 0, timeout 0).
func TestLibaioGetevents(t *testing.T) {
	d, _ := kiotest.New(t, factory(EngineLibaio), 16<<20, 512, 16)
	ch := kiotest.Open(t, d).(*channel)
	ch.libaio.ring = nil
	mem := kiotest.Mem(t, 8192)
	copy(mem, "hello")
	if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpWrite, Offset: 4096, Len: 4096, Iov: [][]byte{mem[:4096]}}); err != nil {
		t.Fatal(err)
	}
	if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpRead, Offset: 4096, Len: 512, Iov: [][]byte{mem[4097:4609]}}); err != nil {
		t.Fatal(err)
	}
	if string(mem[4097:4102]) != "hello" {
		t.Fatalf("read back %q", mem[4097:4102])
	}
}

// TestAutoFallsBack makes io_uring_setup fail as a seccomp profile does:
// auto picks Linux AIO and says so in the log; uring refuses to start.
func TestAutoFallsBack(t *testing.T) {
	saved := uringSetup
	defer func() { uringSetup = saved }()
	for _, errno := range []unix.Errno{unix.EPERM, unix.ENOSYS} {
		uringSetup = func(uint32, *uringParams) (int, error) { return -1, errno }
		var logs bytes.Buffer
		path := kiotest.DirectDir(t) + "/fb.img"
		d, err := New(Config{Name: "fb", Path: path, Size: 1 << 20, BlockSize: 512, Create: true,
			Logger: slog.New(slog.NewTextHandler(&logs, nil)), UUID: [16]byte{2}})
		if err != nil {
			t.Fatal(err)
		}
		if d.Engine() != EngineLibaio || !strings.Contains(logs.String(), "using Linux AIO") || !strings.Contains(logs.String(), `bdev=fb`) {
			t.Errorf("%v: engine %s, log %q", errno, d.Engine(), logs.String())
		}
		ch := kiotest.Open(t, d)
		mem := kiotest.Mem(t, 4096)
		if err := kiotest.Do(t, ch, &bdev.IO{Op: bdev.OpRead, Len: 4096, Iov: [][]byte{mem}}); err != nil {
			t.Fatal(err)
		}
		d.Close()
		_, err = New(Config{Name: "u", Path: path, BlockSize: 512, Engine: EngineURing})
		if err == nil || !strings.Contains(err.Error(), `"u"`) || !strings.Contains(err.Error(), errno.Error()) {
			t.Errorf("engine uring with io_uring refused: %v", err)
		}
	}
}

func TestBadEngine(t *testing.T) {
	_, err := New(Config{Name: "x", Path: "/nonexistent", BlockSize: 512, Engine: "spdk"})
	if err == nil || !strings.Contains(err.Error(), `engine "spdk"`) {
		t.Fatalf("err = %v", err)
	}
}

// TestEventFD checks that a completion makes the channel's eventfd readable
// (what an adaptive reactor sleeps on), for both engines and for an
// operation the helper worker runs (a punch under Linux AIO).
func TestEventFD(t *testing.T) {
	for _, engine := range []string{EngineURing, EngineLibaio} {
		if engine == EngineURing {
			needURing(t)
		}
		d, _ := kiotest.New(t, factory(engine), 1<<20, 512, 8)
		ch := kiotest.Open(t, d)
		fd := ch.(bdev.Waker).EventFD()
		if fd < 0 || ch.(bdev.Waker).EventFD() != fd {
			t.Fatalf("%s: EventFD = %d", engine, fd)
		}
		mem := kiotest.Mem(t, 4096)
		for _, io := range []*bdev.IO{
			{Op: bdev.OpRead, Len: 4096, Iov: [][]byte{mem}},
			{Op: bdev.OpUnmap, NRanges: 1, Ranges: [bdev.MaxRanges]bdev.Range{{Offset: 0, Len: 4096}}},
		} {
			var w kiotest.Waiter
			io.Done = &w
			ch.Submit(io)
			ch.Poll() // submits
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			n, err := unix.Poll(pfd, 5000)
			if err != nil || n != 1 {
				t.Fatalf("%s %v: eventfd not readable: %d %v", engine, io.Op, n, err)
			}
			var b [8]byte
			unix.Read(fd, b[:])
			deadline := time.Now().Add(5 * time.Second)
			for len(w.Done) == 0 && time.Now().Before(deadline) {
				ch.Poll()
			}
			if len(w.Done) != 1 || io.Err != nil {
				t.Fatalf("%s %v: done %d err %v", engine, io.Op, len(w.Done), io.Err)
			}
		}
	}
}

// TestURingSQE checks the SQEs a channel writes: the backing file is the
// ring's fixed file 0, a one-segment transfer is IORING_OP_READ/WRITE and a
// two-segment one IORING_OP_READV, and each reads back what was written.
func TestURingSQE(t *testing.T) {
	needURing(t)
	d, _ := kiotest.New(t, factory(EngineURing), 1<<20, 512, 8)
	ch := kiotest.Open(t, d).(*channel)
	u := ch.uring
	if u.fixedFD != d.(*Disk).b.FD {
		t.Errorf("fixed file %d, backing fd %d", u.fixedFD, d.(*Disk).b.FD)
	}
	if !u.plainRW {
		t.Skip("kernel without IORING_OP_READ/WRITE (before 5.6)")
	}
	mem := kiotest.Mem(t, 16384)
	copy(mem, "one segment")
	copy(mem[8192+4096:], "second segment")
	for _, c := range []struct {
		io     *bdev.IO
		opcode uint8
		want   string // what mem[4096:] holds afterwards
	}{
		{&bdev.IO{Op: bdev.OpWrite, Offset: 8192, Len: 4096, Iov: [][]byte{mem[:4096]}}, opWrite, ""},
		{&bdev.IO{Op: bdev.OpRead, Offset: 8192, Len: 4096, Iov: [][]byte{mem[4096:8192]}}, opRead, "one segment"},
		{&bdev.IO{Op: bdev.OpWrite, Offset: 65536, Len: 8192, Iov: [][]byte{mem[8192:12288], mem[12288:]}}, opWritev, ""},
		{&bdev.IO{Op: bdev.OpRead, Offset: 65536, Len: 8192, Iov: [][]byte{mem[:4096], mem[4096:8192]}}, opReadv, "second segment"},
	} {
		var w kiotest.Waiter
		c.io.Done = &w
		ch.Submit(c.io)
		sqe := u.sqes[(u.tail-1)&u.sqMask]
		if sqe.opcode != c.opcode || sqe.flags != sqeFixedFile || sqe.fd != 0 {
			t.Errorf("%v of %d segments: SQE opcode %d flags %#x fd %d, want opcode %d, fixed file 0",
				c.io.Op, len(c.io.Iov), sqe.opcode, sqe.flags, sqe.fd, c.opcode)
		}
		for len(w.Done) == 0 {
			ch.Poll()
		}
		if c.io.Err != nil {
			t.Fatalf("%v: %v", c.io.Op, c.io.Err)
		}
		if got := string(mem[4096 : 4096+len(c.want)]); got != c.want {
			t.Errorf("%v of %d segments read back %q, want %q", c.io.Op, len(c.io.Iov), got, c.want)
		}
	}
}

func TestFlushDurabilityURing(t *testing.T) {
	needURing(t)
	kiotest.Durability(t, "TestFlushDurabilityURing", func(path string) (bdev.Bdev, error) {
		return New(Config{Name: "durable", Path: path, BlockSize: 512, Engine: EngineURing, UUID: [16]byte{2}})
	})
}

func TestFlushDurabilityLibaio(t *testing.T) {
	kiotest.Durability(t, "TestFlushDurabilityLibaio", func(path string) (bdev.Bdev, error) {
		return New(Config{Name: "durable", Path: path, BlockSize: 512, Engine: EngineLibaio, UUID: [16]byte{2}})
	})
}

func BenchmarkAIORead4K(b *testing.B) {
	needURing(b)
	kiotest.Bench(b, factory(EngineURing), false, 4096, 32, 1<<30)
}
func BenchmarkAIOWrite4K(b *testing.B) {
	needURing(b)
	kiotest.Bench(b, factory(EngineURing), true, 4096, 32, 1<<30)
}
func BenchmarkLibaioRead4K(b *testing.B) {
	kiotest.Bench(b, factory(EngineLibaio), false, 4096, 32, 1<<30)
}
func BenchmarkLibaioWrite4K(b *testing.B) {
	kiotest.Bench(b, factory(EngineLibaio), true, 4096, 32, 1<<30)
}

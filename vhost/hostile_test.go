package vhost_test

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"math/rand"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"vhost-target/bdev"
	"vhost-target/bdev/malloc"
	"vhost-target/reactor"
	"vhost-target/vhost"
	"vhost-target/vhost/frontend"
	"vhost-target/vhost/proto"
)

// Hostile-input tests: a front-end that breaks the vhost-user protocol loses
// its connection (one WARN line, ProtocolErrors counted), a driver that
// corrupts a descriptor chain loses that request or that queue, and in every
// case the process, its other controllers and the next connection keep
// working, with no goroutine, fd or mapping left behind.

// logBuf collects a controller's log lines; the session goroutines write to
// it while the test reads it.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) reset() {
	l.mu.Lock()
	l.b.Reset()
	l.mu.Unlock()
}

// lines returns the lines logged at level ("WARN", "ERROR"...).
func (l *logBuf) lines(level string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	sc := bufio.NewScanner(bytes.NewReader(l.b.Bytes()))
	for sc.Scan() {
		if strings.Contains(sc.Text(), " level="+level+" ") {
			out = append(out, sc.Text())
		}
	}
	return out
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// gateBdev holds every IO submitted while its gate is closed and completes
// the held ones from a later Poll once it opens: a memory disk whose
// completions the test controls, so a request can stay in flight.
type gateBdev struct {
	*malloc.Disk
	open atomic.Bool
	held atomic.Int32
}

func (g *gateBdev) Open() (bdev.Channel, error) {
	ch, err := g.Disk.Open()
	if err != nil {
		return nil, err
	}
	return &gateChan{g: g, inner: ch}, nil
}

type gateChan struct {
	g     *gateBdev
	inner bdev.Channel
	held  []*bdev.IO
}

func (c *gateChan) Submit(io *bdev.IO) {
	if c.g.open.Load() {
		c.inner.Submit(io)
		return
	}
	c.held = append(c.held, io)
	c.g.held.Add(1)
}

func (c *gateChan) Poll() int {
	n := c.inner.Poll()
	if len(c.held) == 0 || !c.g.open.Load() {
		return n
	}
	held := c.held
	c.held = nil
	for _, io := range held {
		c.g.held.Add(-1)
		c.inner.Submit(io)
		n++
	}
	return n
}

func (c *gateChan) InFlight() int { return len(c.held) + c.inner.InFlight() }
func (c *gateChan) Close() error  { return c.inner.Close() }

// hostile is a target with two controllers on one adaptive reactor: "good",
// with a front-end connected before any hostile one, and "victim", which the
// hostile front-ends attack (LUN 0 a memory disk, LUN 1 a gated one).
type hostile struct {
	e        *env
	good     *frontend.Device
	goodDisk *malloc.Disk
	goodLBA  uint32
	victim   *vhost.Controller
	sock     string
	log      *logBuf
	disk     *malloc.Disk
	gate     *gateBdev
}

func newHostile(t *testing.T) *hostile {
	h := &hostile{e: newEnv(t, 1, reactor.Adaptive), log: &logBuf{}}
	h.goodDisk = h.e.disk("good", 4<<20, 512)
	goodSock := h.e.controller("good", 1, lun(0, 0, h.goodDisk))
	h.disk = h.e.disk("victim0", 4<<20, 512)
	h.gate = &gateBdev{Disk: h.e.disk("victim1", 1<<20, 512)}
	t.Cleanup(func() { h.gate.open.Store(true) }) // never leave a drain waiting on the gate
	h.sock = filepath.Join(t.TempDir(), "victim")
	c, err := vhost.NewController(vhost.Config{
		Name: "victim", SocketPath: h.sock, NumQueues: 1, Reactors: h.e.r, SocketUID: -1, SocketGID: -1,
		LUNs:   []vhost.LUNSpec{lun(0, 0, h.disk), lun(0, 1, h.gate)},
		Logger: slog.New(slog.NewTextHandler(h.log, &slog.HandlerOptions{Level: slog.LevelInfo})),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Listen(); err != nil {
		t.Fatal(err)
	}
	h.e.ctrls = append(h.e.ctrls, c)
	h.victim = c
	h.good, err = frontend.Dial(goodSock, frontend.Options{Slots: 2, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	// Closed before the controllers (cleanups run last-in first-out).
	t.Cleanup(func() { h.good.Close() })
	settle(t, h.good)
	h.goodIO(t)
	return h
}

// goodIO writes random blocks through the good controller and reads them back.
func (h *hostile) goodIO(t *testing.T) {
	t.Helper()
	ioRoundTrip(t, h.good, 0, h.goodLBA, h.goodDisk)
	h.goodLBA = (h.goodLBA + 8) % 8000
}

// ioRoundTrip writes 8 random blocks at lba of (target 0, lun) and checks the
// read-back and the disk's bytes.
func ioRoundTrip(t *testing.T, d *frontend.Device, l uint16, lba uint32, disk *malloc.Disk) {
	t.Helper()
	data := make([]byte, 8*512)
	rand.Read(data)
	resp, err := d.Do(frontend.Command{LUN: l, CDB: rw10(0x2a, lba, 8), DataOut: data, Segments: 2})
	if err != nil || resp.Response != 0 || resp.Status != 0 {
		t.Fatalf("write lba %d: %v %+v", lba, err, resp)
	}
	resp, err = d.Do(frontend.Command{LUN: l, CDB: rw10(0x28, lba, 8), DataInLen: len(data)})
	if err != nil || resp.Response != 0 || resp.Status != 0 {
		t.Fatalf("read lba %d: %v %+v", lba, err, resp)
	}
	if !bytes.Equal(resp.DataIn, data) || !bytes.Equal(disk.Bytes()[lba*512:(lba+8)*512], data) {
		t.Fatalf("lba %d: read-back differs from what was written", lba)
	}
}

// resources counts what a finished session must give back.
type resources struct{ goroutines, fds, memfdMaps int }

func countResources(t *testing.T) resources {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	return resources{runtime.NumGoroutine(), len(ents), bytes.Count(maps, []byte("/memfd:"))}
}

// checkLeaks waits up to a second for goroutines (2 of slack for runtime
// helpers), fds and memfd mappings to return to the baseline.
func checkLeaks(t *testing.T, base resources) {
	t.Helper()
	var now resources
	for deadline := time.Now().Add(time.Second); ; {
		now = countResources(t)
		if now.goroutines <= base.goroutines+2 && now.fds == base.fds && now.memfdMaps == base.memfdMaps {
			return
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if now.goroutines > base.goroutines+2 {
		buf := make([]byte, 1<<20)
		t.Logf("goroutines:\n%s", buf[:runtime.Stack(buf, true)])
	}
	t.Fatalf("leak: goroutines %d -> %d, fds %d -> %d, memfd mappings %d -> %d",
		base.goroutines, now.goroutines, base.fds, now.fds, base.memfdMaps, now.memfdMaps)
}

func eventually(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(d); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// expectClosed requires the target to have closed the connection: the next
// receive ends in EOF (or a reset), not in the read deadline.
func expectClosed(t *testing.T, d *frontend.Device) {
	t.Helper()
	m, err := d.Recv()
	switch {
	case err == nil:
		m.CloseFDs()
		t.Fatalf("target answered %v instead of closing the connection", m.Request)
	case errors.Is(err, os.ErrDeadlineExceeded):
		t.Fatalf("connection still open: %v", err)
	case !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET):
		t.Fatalf("receive after the bad message: %v", err)
	}
}

func eventFD(t *testing.T) int {
	t.Helper()
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// Setup levels before the bad message.
const (
	setupNone      = iota // connected, nothing sent
	setupNegotiate        // GET_FEATURES .. SET_OWNER, call/err fds
	setupMemory           // and SET_FEATURES, SET_MEM_TABLE
	setupStarted          // the full QEMU start sequence: rings running
)

type msgCase struct {
	name  string
	setup int
	opts  frontend.Options
	send  func(t *testing.T, d *frontend.Device)
	want  string // in the WARN line
}

func sendRaw(t *testing.T, d *frontend.Device, req proto.Request, flags uint32, payload []byte, fds ...int) {
	t.Helper()
	if err := d.Send(req, flags, payload, fds...); err != nil {
		t.Fatal(err)
	}
}

// msgOnly returns a case body sending one message with the version flag.
func msgOnly(req proto.Request, payload []byte) func(*testing.T, *frontend.Device) {
	return func(t *testing.T, d *frontend.Device) { sendRaw(t, d, req, proto.FlagVersion, payload) }
}

// sendPipe sends req with payload and the write end of a pipe where an
// eventfd belongs: a reactor would block on it.
func sendPipe(req proto.Request, payload []byte) func(*testing.T, *frontend.Device) {
	return func(t *testing.T, d *frontend.Device) {
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		defer unix.Close(p[0])
		defer unix.Close(p[1])
		sendRaw(t, d, req, proto.FlagVersion, payload, p[1])
	}
}

// sendEventFD sends req with payload and one fresh eventfd.
func sendEventFD(req proto.Request, payload []byte) func(*testing.T, *frontend.Device) {
	return func(t *testing.T, d *frontend.Device) { sendRaw(t, d, req, proto.FlagVersion, payload, eventFD(t)) }
}

// memTable sends SET_MEM_TABLE with the front-end's regions after edit.
func memTable(edit func(regs []proto.MemRegion, fds []int) ([]proto.MemRegion, []int)) func(*testing.T, *frontend.Device) {
	return func(t *testing.T, d *frontend.Device) {
		regs, fds := edit(d.MemTable(), d.MemFDs())
		sendRaw(t, d, proto.SetMemTable, proto.FlagVersion, proto.EncodeMemTable(regs), fds...)
	}
}

// ringAddr sends SET_VRING_ADDR for vring 2 after edit.
func ringAddr(edit func(a *proto.VringAddr, d *frontend.Device)) func(*testing.T, *frontend.Device) {
	return func(t *testing.T, d *frontend.Device) {
		a := d.VringAddr(2)
		edit(&a, d)
		sendRaw(t, d, proto.SetVringAddr, proto.FlagVersion, a.Encode())
	}
}

// writeRaw writes bytes on the socket as they are and half-closes it.
func writeRaw(b []byte, closeWrite bool) func(*testing.T, *frontend.Device) {
	return func(t *testing.T, d *frontend.Device) {
		uc := d.Conn().UnixConn()
		if _, err := uc.Write(b); err != nil {
			t.Fatal(err)
		}
		if closeWrite {
			if err := uc.CloseWrite(); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func rawHeader(req proto.Request, flags, size uint32) []byte {
	b := make([]byte, proto.HeaderSize)
	binary.LittleEndian.PutUint32(b, uint32(req))
	binary.LittleEndian.PutUint32(b[4:], flags)
	binary.LittleEndian.PutUint32(b[8:], size)
	return b
}

func vstate(index, num uint32) []byte { return proto.VringState{Index: index, Num: num}.Encode() }

// inflightOpts negotiates INFLIGHT_SHMFD (and nothing starts: the cases send
// the inflight messages themselves).
var inflightOpts = frontend.Options{Inflight: true}

// inflightFD sends SET_INFLIGHT_FD with f (its payload edited by edit, if
// not nil) and a fresh memfd of fileSize bytes, sealed against shrinking and
// growing or not.
func inflightFD(f proto.Inflight, fileSize int64, sealed bool, edit func([]byte) []byte) func(*testing.T, *frontend.Device) {
	return func(t *testing.T, d *frontend.Device) {
		fd, err := unix.MemfdCreate("hostile-inflight", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		if err := unix.Ftruncate(fd, fileSize); err != nil {
			t.Fatal(err)
		}
		if sealed {
			if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW); err != nil {
				t.Fatal(err)
			}
		}
		p := f.Encode()
		if edit != nil {
			p = edit(p)
		}
		sendRaw(t, d, proto.SetInflightFD, proto.FlagVersion, p, fd)
	}
}

func msgCases() []msgCase {
	lastRegionEnd := func(d *frontend.Device) (gpaEnd, uvaEnd uint64) {
		regs := d.MemTable()
		r := regs[len(regs)-1]
		return r.GPA + r.Size, r.UVA + r.Size
	}
	two := frontend.Options{Regions: 2}
	return []msgCase{
		// Payloads of the wrong size.
		{name: "SET_FEATURES 4 bytes", setup: setupNegotiate, send: msgOnly(proto.SetFeatures, make([]byte, 4)),
			want: "SET_FEATURES has 4 bytes, want 8"},
		// Longer payloads are tolerated (bytes past the body ignored): peers_test.go.
		{name: "SET_VRING_NUM 4 bytes", setup: setupNegotiate, send: msgOnly(proto.SetVringNum, make([]byte, 4)),
			want: "SET_VRING_NUM has 4 bytes, want 8"},
		{name: "SET_VRING_ENABLE 4 bytes", setup: setupNegotiate, send: msgOnly(proto.SetVringEnable, make([]byte, 4)),
			want: "SET_VRING_ENABLE has 4 bytes, want 8"},
		{name: "SET_VRING_ADDR 39 bytes", setup: setupNegotiate, send: msgOnly(proto.SetVringAddr, make([]byte, 39)),
			want: "SET_VRING_ADDR has 39 bytes, want 40"},
		{name: "GET_VRING_BASE 4 bytes", setup: setupMemory, send: msgOnly(proto.GetVringBase, make([]byte, 4)),
			want: "GET_VRING_BASE has 4 bytes, want 8"},
		{name: "SET_VRING_KICK 4 bytes with fd", setup: setupNegotiate, send: sendEventFD(proto.SetVringKick, make([]byte, 4)),
			want: "SET_VRING_KICK has 4 bytes, want 8"},
		{name: "SET_MEM_TABLE truncated region", setup: setupNegotiate,
			send: func(t *testing.T, d *frontend.Device) {
				p := proto.EncodeMemTable(d.MemTable())
				sendRaw(t, d, proto.SetMemTable, proto.FlagVersion, p[:proto.MemoryHeaderSize+16], d.MemFDs()...)
			}, want: "SET_MEM_TABLE has 24 bytes, want 40"},
		{name: "SET_MEM_TABLE 4 bytes", setup: setupNegotiate,
			send: func(t *testing.T, d *frontend.Device) {
				sendRaw(t, d, proto.SetMemTable, proto.FlagVersion, []byte{1, 0, 0, 0}, d.MemFDs()...)
			}, want: "SET_MEM_TABLE has 4 bytes, want 8"},

		// Unknown or unsupported request codes.
		{name: "request 0", setup: setupNone, send: msgOnly(0, nil), want: "unsupported request REQUEST_0 (0)"},
		{name: "request 99", setup: setupNegotiate, send: msgOnly(99, make([]byte, 8)), want: "unsupported request REQUEST_99 (99)"},
		{name: "request 0xffffffff", setup: setupNone, send: msgOnly(0xffffffff, nil), want: "(4294967295)"},
		{name: "SET_LOG_BASE without fd", setup: setupMemory, send: msgOnly(proto.SetLogBase, make([]byte, 16)),
			want: "SET_LOG_BASE without the log's fd (LOG_SHMFD)"},
		{name: "SET_LOG_FD with a pipe", setup: setupMemory, send: sendPipe(proto.SetLogFD, nil),
			want: "SET_LOG_FD: fd is not an eventfd (pipe:"},
		{name: "SET_VRING_CALL with a pipe", setup: setupMemory, send: sendPipe(proto.SetVringCall, proto.PutU64(2)),
			want: "SET_VRING_CALL vring 2: fd is not an eventfd (pipe:"},
		{name: "SET_VRING_KICK with a pipe", setup: setupMemory, send: sendPipe(proto.SetVringKick, proto.PutU64(2)),
			want: "SET_VRING_KICK vring 2: fd is not an eventfd (pipe:"},

		// Header flags.
		{name: "version 0", setup: setupNone,
			send: func(t *testing.T, d *frontend.Device) { sendRaw(t, d, proto.GetFeatures, 0, nil) }, want: "bad header version"},
		{name: "version 2", setup: setupNegotiate,
			send: func(t *testing.T, d *frontend.Device) { sendRaw(t, d, proto.SetOwner, 2, nil) }, want: "bad header version"},
		{name: "version 3", setup: setupNone,
			send: func(t *testing.T, d *frontend.Device) { sendRaw(t, d, proto.GetFeatures, 3|proto.FlagNeedReply, nil) },
			want: "bad header version"},

		// Missing fds.
		{name: "SET_VRING_KICK without fd or no-fd bit", setup: setupMemory, send: msgOnly(proto.SetVringKick, proto.PutU64(2)),
			want: "0 fds attached, want 1..1"},
		{name: "SET_VRING_CALL without fd or no-fd bit", setup: setupNegotiate, send: msgOnly(proto.SetVringCall, proto.PutU64(0)),
			want: "0 fds attached, want 1..1"},
		{name: "SET_MEM_TABLE without fds", setup: setupNegotiate,
			send: func(t *testing.T, d *frontend.Device) {
				sendRaw(t, d, proto.SetMemTable, proto.FlagVersion, proto.EncodeMemTable(d.MemTable()))
			}, want: "1 regions with 0 fds"},
		{name: "SET_MEM_TABLE fewer fds than regions", setup: setupNegotiate, opts: two,
			send: memTable(func(r []proto.MemRegion, f []int) ([]proto.MemRegion, []int) { return r, f[:1] }),
			want: "2 regions with 1 fds"},

		// Extra fds.
		{name: "SET_OWNER with fd", setup: setupNone, send: sendEventFD(proto.SetOwner, nil),
			want: "1 fds attached, want 0..0"},
		{name: "GET_FEATURES with fd", setup: setupNone, send: sendEventFD(proto.GetFeatures, nil),
			want: "1 fds attached, want 0..0"},
		{name: "SET_VRING_KICK no-fd bit with fd", setup: setupMemory,
			send: sendEventFD(proto.SetVringKick, proto.PutU64(2|proto.VringNoFDBit)), want: "1 fds attached, want 0..0"},
		{name: "SET_VRING_CALL two fds", setup: setupNegotiate,
			send: func(t *testing.T, d *frontend.Device) {
				sendRaw(t, d, proto.SetVringCall, proto.FlagVersion, proto.PutU64(0), eventFD(t), eventFD(t))
			}, want: "2 fds attached, want 1..1"},
		{name: "SET_MEM_TABLE more fds than regions", setup: setupNegotiate,
			send: func(t *testing.T, d *frontend.Device) {
				sendRaw(t, d, proto.SetMemTable, proto.FlagVersion, proto.EncodeMemTable(d.MemTable()),
					append(d.MemFDs(), eventFD(t))...)
			}, want: "1 regions with 2 fds"},
		{name: "nine fds in one message", setup: setupNegotiate,
			send: func(t *testing.T, d *frontend.Device) {
				fd := d.MemFDs()[0]
				sendRaw(t, d, proto.SetMemTable, proto.FlagVersion, proto.EncodeMemTable(d.MemTable()),
					fd, fd, fd, fd, fd, fd, fd, fd, fd)
			}, want: "control message truncated"},

		// CONFIGURE_MEM_SLOTS: bad single regions.
		{name: "ADD_MEM_REG overlapping the table", setup: setupMemory,
			send: func(t *testing.T, d *frontend.Device) {
				r := d.MemTable()[0]
				r.UVA += 1 << 40 // only the guest range overlaps
				sendRaw(t, d, proto.AddMemReg, proto.FlagVersion, proto.EncodeSingleRegion(r), d.MemFDs()[0])
			}, want: "regions overlap: gpa range"},
		{name: "ADD_MEM_REG without an fd", setup: setupNegotiate,
			send: msgOnly(proto.AddMemReg, proto.EncodeSingleRegion(proto.MemRegion{Size: 4096, UVA: 4096})),
			want: "0 fds attached"},
		{name: "ADD_MEM_REG zero size", setup: setupNegotiate,
			send: func(t *testing.T, d *frontend.Device) {
				sendRaw(t, d, proto.AddMemReg, proto.FlagVersion, proto.EncodeSingleRegion(proto.MemRegion{UVA: 4096}), d.MemFDs()[0])
			}, want: "region size is zero"},
		{name: "REM_MEM_REG of an unknown region", setup: setupMemory,
			send: msgOnly(proto.RemMemReg, proto.EncodeSingleRegion(proto.MemRegion{GPA: 1 << 40, Size: 4096, UVA: 4096})),
			want: "no such region"},
		{name: "ADD_MEM_REG 39 bytes", setup: setupNegotiate,
			send: func(t *testing.T, d *frontend.Device) {
				sendRaw(t, d, proto.AddMemReg, proto.FlagVersion, make([]byte, 39), d.MemFDs()[0])
			}, want: "wrong payload size"},

		// Bad memory tables.
		{name: "regions overlap in gpa", setup: setupNegotiate, opts: two,
			send: memTable(func(r []proto.MemRegion, f []int) ([]proto.MemRegion, []int) {
				r[1].GPA = r[0].GPA + 4096
				return r, f
			}), want: "regions overlap: gpa range"},
		{name: "regions overlap in uva", setup: setupNegotiate, opts: two,
			send: memTable(func(r []proto.MemRegion, f []int) ([]proto.MemRegion, []int) {
				r[1].UVA = r[0].UVA + r[0].Size - 4096
				return r, f
			}), want: "regions overlap: uva range"},
		{name: "same region twice", setup: setupNegotiate,
			send: memTable(func(r []proto.MemRegion, f []int) ([]proto.MemRegion, []int) {
				return append(r, r[0]), append(f, f[0])
			}), want: "regions overlap"},
		{name: "zero-size region", setup: setupNegotiate,
			send: memTable(func(r []proto.MemRegion, f []int) ([]proto.MemRegion, []int) {
				r[0].Size = 0
				return r, f
			}), want: "region size is zero"},
		{name: "region gpa+size overflows", setup: setupNegotiate,
			send: memTable(func(r []proto.MemRegion, f []int) ([]proto.MemRegion, []int) {
				r[0].GPA = ^uint64(0) - 4095
				return r, f
			}), want: "address range overflows: gpa+size"},
		{name: "region uva+size overflows", setup: setupNegotiate,
			send: memTable(func(r []proto.MemRegion, f []int) ([]proto.MemRegion, []int) {
				r[0].UVA = ^uint64(0) - 4095
				return r, f
			}), want: "address range overflows: uva+size"},
		{name: "mmap_offset beyond the memfd", setup: setupNegotiate,
			send: memTable(func(r []proto.MemRegion, f []int) ([]proto.MemRegion, []int) {
				r[0].MmapOffset = 1 << 40
				return r, f
			}), want: "region extends beyond its file"},
		{name: "mmap_offset+size one page past the memfd", setup: setupNegotiate,
			send: memTable(func(r []proto.MemRegion, f []int) ([]proto.MemRegion, []int) {
				r[0].MmapOffset += 4096
				return r, f
			}), want: "region extends beyond its file"},
		{name: "size one page past the memfd", setup: setupNegotiate,
			send: memTable(func(r []proto.MemRegion, f []int) ([]proto.MemRegion, []int) {
				r[0].Size += 4096
				return r, f
			}), want: "region extends beyond its file"},
		{name: "region fd is not memory", setup: setupNegotiate,
			send: func(t *testing.T, d *frontend.Device) {
				sendRaw(t, d, proto.SetMemTable, proto.FlagVersion, proto.EncodeMemTable(d.MemTable()), eventFD(t))
			}, want: "mmap fd"},
		{name: "nine regions", setup: setupNegotiate,
			send: func(t *testing.T, d *frontend.Device) {
				p := make([]byte, proto.MemoryHeaderSize+9*proto.MemRegionSize)
				p[0] = 9
				fd := d.MemFDs()[0]
				sendRaw(t, d, proto.SetMemTable, proto.FlagVersion, p, fd, fd, fd, fd, fd, fd, fd, fd)
			}, want: "bad memory region count: 9 regions"},
		{name: "zero regions with an fd", setup: setupNegotiate,
			send: func(t *testing.T, d *frontend.Device) {
				sendRaw(t, d, proto.SetMemTable, proto.FlagVersion, make([]byte, proto.MemoryHeaderSize), d.MemFDs()...)
			}, want: "bad memory region count: 0 regions with 1 fds"},
		{name: "bad table replaces a running one", setup: setupStarted,
			send: memTable(func(r []proto.MemRegion, f []int) ([]proto.MemRegion, []int) {
				r[0].Size = 0
				return r, f
			}), want: "region size is zero"},

		// Rings outside guest memory.
		{name: "descriptor table outside memory", setup: setupMemory,
			send: ringAddr(func(a *proto.VringAddr, d *frontend.Device) { a.Desc = 0x10000 }),
			want: "descriptor table address 0x10000"},
		{name: "avail ring outside memory", setup: setupMemory,
			send: ringAddr(func(a *proto.VringAddr, d *frontend.Device) { _, a.Avail = lastRegionEnd(d) }),
			want: "avail ring address"},
		{name: "used ring outside memory", setup: setupMemory,
			send: ringAddr(func(a *proto.VringAddr, d *frontend.Device) { a.Used = ^uint64(0) &^ 3 }),
			want: "used ring address"},
		{name: "ring address is a gpa", setup: setupMemory,
			send: ringAddr(func(a *proto.VringAddr, d *frontend.Device) { a.Desc = 4096 }),
			want: "descriptor table address 0x1000"},
		{name: "used ring straddles the end of memory", setup: setupMemory,
			send: func(t *testing.T, d *frontend.Device) {
				// The start is mapped, so SET_VRING_ADDR passes; starting the ring does not.
				a := d.VringAddr(2)
				_, end := lastRegionEnd(d)
				a.Used = end - 64
				for _, m := range []func(int) error{d.SetVringNum, d.SetVringBase} {
					if err := m(2); err != nil {
						t.Fatal(err)
					}
				}
				sendRaw(t, d, proto.SetVringAddr, proto.FlagVersion, a.Encode())
				sendRaw(t, d, proto.SetVringEnable, proto.FlagVersion, vstate(2, 1))
				sendRaw(t, d, proto.SetVringKick, proto.FlagVersion, proto.PutU64(2), eventFD(t))
			}, want: "ring outside guest memory: used ring"},
		{name: "re-address a running ring outside memory", setup: setupStarted,
			send: ringAddr(func(a *proto.VringAddr, d *frontend.Device) { a.Desc = 0x10000 }),
			want: "descriptor table address"},

		// Ring sizes and indexes. Size 0, NUM/BASE on a running ring, bases
		// above 16 bits and unknown bits in a ring fd message are tolerated:
		// peers_test.go.
		{name: "vring size 3", setup: setupNegotiate, send: msgOnly(proto.SetVringNum, vstate(2, 3)), want: "size 3 is not a power of two"},
		{name: "vring size 65536", setup: setupNegotiate, send: msgOnly(proto.SetVringNum, vstate(2, 65536)),
			want: "size 65536 is not a power of two in 1..32768"},
		{name: "vring size 0x80000000", setup: setupNegotiate, send: msgOnly(proto.SetVringNum, vstate(0, 1<<31)),
			want: "is not a power of two"},
		{name: "SET_VRING_NUM index 66", setup: setupNegotiate, send: msgOnly(proto.SetVringNum, vstate(66, 128)),
			want: "vring index 66 out of range"},
		{name: "SET_VRING_ADDR index 1000", setup: setupMemory,
			send: ringAddr(func(a *proto.VringAddr, d *frontend.Device) { a.Index = 1000 }), want: "vring index 1000 out of range"},
		{name: "GET_VRING_BASE index 0xffffffff", setup: setupMemory, send: msgOnly(proto.GetVringBase, vstate(0xffffffff, 0)),
			want: "vring index 4294967295 out of range"},
		{name: "SET_VRING_KICK index 255", setup: setupMemory, send: sendEventFD(proto.SetVringKick, proto.PutU64(255)),
			want: "vring index 255 out of range"},
		{name: "SET_VRING_ENABLE index 66", setup: setupMemory, send: msgOnly(proto.SetVringEnable, vstate(66, 1)),
			want: "vring index 66 out of range"},
		{name: "SET_FEATURES packed ring", setup: setupNegotiate,
			send: msgOnly(proto.SetFeatures, proto.PutU64(1<<proto.FVersion1|1<<proto.FRingPacked)), want: "we do not implement"},

		// Inflight I/O tracking: the shape, the fd's size, kind and seals are
		// checked before anything is mapped (a short or shrinkable file would
		// SIGBUS the reactor that marks a request).
		{name: "GET_INFLIGHT_FD not negotiated", setup: setupNegotiate,
			send: msgOnly(proto.GetInflightFD, proto.Inflight{NumQueues: 3, QueueSize: 128}.Encode()),
			want: "without PROTOCOL_F_INFLIGHT_SHMFD"},
		{name: "GET_INFLIGHT_FD 0 queues", setup: setupNegotiate, opts: inflightOpts,
			send: msgOnly(proto.GetInflightFD, proto.Inflight{QueueSize: 128}.Encode()), want: "0 queues"},
		{name: "GET_INFLIGHT_FD 67 queues", setup: setupNegotiate, opts: inflightOpts,
			send: msgOnly(proto.GetInflightFD, proto.Inflight{NumQueues: 67, QueueSize: 128}.Encode()), want: "67 queues"},
		{name: "GET_INFLIGHT_FD queue size 100", setup: setupNegotiate, opts: inflightOpts,
			send: msgOnly(proto.GetInflightFD, proto.Inflight{NumQueues: 3, QueueSize: 100}.Encode()),
			want: "queue size 100 is not a power of two"},
		{name: "SET_INFLIGHT_FD 22 bytes", setup: setupNegotiate, opts: inflightOpts,
			send: inflightFD(proto.Inflight{}, 4096, true, func(b []byte) []byte { return b[:22] }),
			want: "SET_INFLIGHT_FD has 22 bytes, want 24"},
		{name: "SET_INFLIGHT_FD no fd", setup: setupNegotiate, opts: inflightOpts,
			send: msgOnly(proto.SetInflightFD, proto.Inflight{MmapSize: 3 * 2112, NumQueues: 3, QueueSize: 128}.Encode()),
			want: "0 fds attached"},
		{name: "SET_INFLIGHT_FD size below the layout", setup: setupNegotiate, opts: inflightOpts,
			send: inflightFD(proto.Inflight{MmapSize: 3*2112 - 64, NumQueues: 3, QueueSize: 128}, 3*2112, true, nil),
			want: "need 6336"},
		{name: "SET_INFLIGHT_FD size past the file", setup: setupNegotiate, opts: inflightOpts,
			send: inflightFD(proto.Inflight{MmapSize: 3 * 2112, NumQueues: 3, QueueSize: 128}, 4096, true, nil),
			want: "not a file of at least 6336 bytes"},
		{name: "SET_INFLIGHT_FD offset past the file", setup: setupNegotiate, opts: inflightOpts,
			send: inflightFD(proto.Inflight{MmapSize: 3 * 2112, MmapOffset: 8192, NumQueues: 3, QueueSize: 128}, 3*2112, true, nil),
			want: "not a file of at least 14528 bytes"},
		{name: "SET_INFLIGHT_FD offset overflows", setup: setupNegotiate, opts: inflightOpts,
			send: inflightFD(proto.Inflight{MmapSize: 3 * 2112, MmapOffset: 1<<64 - 4096, NumQueues: 3, QueueSize: 128}, 3*2112, true, nil),
			want: "mmap offset"},
		{name: "SET_INFLIGHT_FD unsealed", setup: setupNegotiate, opts: inflightOpts,
			send: inflightFD(proto.Inflight{MmapSize: 3 * 2112, NumQueues: 3, QueueSize: 128}, 3*2112, false, nil),
			want: "not sealed against shrinking"},
		{name: "SET_INFLIGHT_FD eventfd", setup: setupNegotiate, opts: inflightOpts,
			send: sendEventFD(proto.SetInflightFD, proto.Inflight{MmapSize: 3 * 2112, NumQueues: 3, QueueSize: 128}.Encode()),
			want: "not a file"},
		{name: "SET_INFLIGHT_FD too small for the ring", setup: setupMemory, opts: inflightOpts,
			send: func(t *testing.T, d *frontend.Device) {
				// Laid out for 64-entry rings; the front-end's rings have 128.
				inflightFD(proto.Inflight{MmapSize: 3 * 1088, NumQueues: 3, QueueSize: 64}, 3*1088, true, nil)(t, d)
				for _, m := range []struct {
					req proto.Request
					p   []byte
				}{{proto.SetVringNum, vstate(2, 128)}, {proto.SetVringAddr, d.VringAddr(2).Encode()},
					{proto.SetVringEnable, vstate(2, 1)}} {
					sendRaw(t, d, m.req, proto.FlagVersion, m.p)
				}
				sendRaw(t, d, proto.SetVringKick, proto.FlagVersion, proto.PutU64(2), eventFD(t))
			},
			want: "inflight region too small"},

		// Framing.
		{name: "payload size 4097", setup: setupNegotiate,
			send: writeRaw(append(rawHeader(proto.SetFeatures, proto.FlagVersion, 4097), make([]byte, 64)...), false),
			want: "payload too large: 4097 bytes"},
		{name: "payload size 0xffffffff", setup: setupNone,
			send: writeRaw(rawHeader(proto.SetMemTable, proto.FlagVersion, 0xffffffff), false), want: "payload too large"},
		{name: "header then close", setup: setupNegotiate,
			send: writeRaw(append(rawHeader(proto.SetFeatures, proto.FlagVersion, 8), 1, 2, 3), true), want: "short payload"},
		{name: "half a header then close", setup: setupNone,
			send: writeRaw(rawHeader(proto.GetFeatures, proto.FlagVersion, 0)[:6], true), want: "short header"},
	}
}

// setupDevice brings a fresh front-end to the case's starting state.
func setupDevice(t *testing.T, d *frontend.Device, level int) {
	t.Helper()
	if level >= setupNegotiate {
		if err := d.Negotiate(); err != nil {
			t.Fatal(err)
		}
	}
	switch level {
	case setupMemory:
		f := d.OfferedFeatures() & (1<<proto.FVersion1 | 1<<proto.FProtocolFeatures | 1<<proto.FRingIndirectDesc | 1<<proto.FRingEventIdx)
		if err := d.SetFeatures(f); err != nil {
			t.Fatal(err)
		}
		if err := d.SetMemTable(); err != nil {
			t.Fatal(err)
		}
	case setupStarted:
		if err := d.Start(); err != nil {
			t.Fatal(err)
		}
		if _, err := d.Do(frontend.Command{CDB: []byte{0, 0, 0, 0, 0, 0}}); err != nil {
			t.Fatalf("TEST UNIT READY before the bad message: %v", err)
		}
	}
}

// TestHostileMessages sends one malformed message per case on a fresh
// connection to the victim controller. The target must close that connection
// with exactly one WARN line and one protocol error counted, and stay fully
// usable: the good controller's front-end (connected first) does verified I/O
// after every case, and the next case connects to the same victim.
func TestHostileMessages(t *testing.T) {
	h := newHostile(t)
	for _, tc := range msgCases() {
		t.Run(tc.name, func(t *testing.T) {
			base := countResources(t)
			// A cleanup, so it runs after the case's own cleanups (eventfds) and defers.
			t.Cleanup(func() { checkLeaks(t, base) })
			h.log.reset()
			before := h.victim.Stats.Snapshot().ProtocolErrors
			o := tc.opts
			o.Slots, o.Timeout = 2, 3*time.Second
			d, err := frontend.NewUnstarted(h.sock, o)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Abort()
			setupDevice(t, d, tc.setup)
			if n := len(h.log.lines("WARN")) + len(h.log.lines("ERROR")); n != 0 {
				t.Fatalf("warnings before the bad message:\n%s", h.log)
			}
			tc.send(t, d)
			expectClosed(t, d)
			eventually(t, "the session to end", 2*time.Second, func() bool { return h.victim.Sessions() == 0 })
			if got := h.victim.Stats.Snapshot().ProtocolErrors; got != before+1 {
				t.Errorf("ProtocolErrors %d -> %d, want +1", before, got)
			}
			warns, errs := h.log.lines("WARN"), h.log.lines("ERROR")
			if len(warns) != 1 || len(errs) != 0 || !strings.Contains(warns[0], tc.want) {
				t.Errorf("want one WARN line with %q and no ERROR, got:\n%s", tc.want, h.log)
			} else {
				t.Logf("%s", warns[0][strings.Index(warns[0], "level="):])
			}
			d.Abort()
			h.goodIO(t)
		})
	}
	// The victim still serves a well-behaved front-end.
	d, err := frontend.Dial(h.sock, frontend.Options{Slots: 2, Timeout: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ioRoundTrip(t, d, 0, 0, h.disk)
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
}

// chainCtx is the scratch space a chain case builds its chain in: the data
// buffer of one async slot, which nothing else uses.
type chainCtx struct {
	t       *testing.T
	d       *frontend.Device
	q       *frontend.Queue
	memSize uint64
	req     uint64 // a valid request header (TEST UNIT READY, LUN 0)
	resp    uint64 // room for a response
	table   uint64 // room for an indirect table (up to 256 entries)
	table2  uint64 // a second one
	data    uint64 // 8 KiB of data buffer
}

func newChainCtx(t *testing.T, d *frontend.Device, q *frontend.Queue) *chainCtx {
	s := q.Get()
	if s == nil || len(s.Data) < 32<<10 {
		t.Fatal("no slot data buffer for raw chains")
	}
	c := &chainCtx{t: t, d: d, q: q, memSize: d.Options().MemSize, req: s.DataGPA, resp: s.DataGPA + 256,
		table: s.DataGPA + 4096, table2: s.DataGPA + 8192, data: s.DataGPA + 16384}
	l := frontend.LUNBytes(0, 0)
	hdr := make([]byte, frontend.ReqSize)
	copy(hdr, l[:])
	if err := d.WriteGuest(c.req, hdr); err != nil { // CDB all zero: TEST UNIT READY
		t.Fatal(err)
	}
	return c
}

// writeTable writes descriptors into guest memory at gpa.
func (c *chainCtx) writeTable(gpa uint64, descs []frontend.Desc) {
	b := make([]byte, 16*len(descs))
	for i, d := range descs {
		binary.LittleEndian.PutUint64(b[16*i:], d.Addr)
		binary.LittleEndian.PutUint32(b[16*i+8:], d.Len)
		binary.LittleEndian.PutUint16(b[16*i+12:], d.Flags)
		binary.LittleEndian.PutUint16(b[16*i+14:], d.Next)
	}
	if err := c.d.WriteGuest(gpa, b); err != nil {
		c.t.Fatal(err)
	}
}

const (
	fNext  = frontend.DescFNext
	fWrite = frontend.DescFWrite
	fInd   = frontend.DescFIndirect
)

type chainCase struct {
	name   string
	opts   frontend.Options
	ctrl   bool // on the control queue instead of the first request queue
	build  func(c *chainCtx) []frontend.Desc
	bad    string // ChainError text in the WARN line; "" for a request too short for its headers
	reqHdr bool   // a readable header that the request queue counts as a bad request
}

func chainCases() []chainCase {
	return []chainCase{
		{name: "next index out of table", bad: "descriptor index out of range",
			build: func(c *chainCtx) []frontend.Desc {
				return []frontend.Desc{{Addr: c.req, Len: frontend.ReqSize, Flags: fNext, Next: 500}}
			}},
		{name: "loop 0 -> 1 -> 0", bad: "descriptor chain loops",
			build: func(c *chainCtx) []frontend.Desc {
				return []frontend.Desc{{Addr: c.req, Len: frontend.ReqSize, Flags: fNext, Next: 1},
					{Addr: c.data, Len: 512, Flags: fNext, Next: 0}}
			}},
		{name: "self loop", bad: "descriptor chain loops",
			build: func(c *chainCtx) []frontend.Desc {
				return []frontend.Desc{{Addr: c.req, Len: frontend.ReqSize, Flags: fNext, Next: 0}}
			}},
		{name: "loop inside an indirect table", bad: "descriptor chain loops",
			build: func(c *chainCtx) []frontend.Desc {
				c.writeTable(c.table, []frontend.Desc{{Addr: c.req, Len: frontend.ReqSize, Flags: fNext, Next: 1},
					{Addr: c.data, Len: 512, Flags: fNext, Next: 0}})
				return []frontend.Desc{{Addr: c.table, Len: 32, Flags: fInd}}
			}},
		{name: "indirect next out of table", bad: "descriptor index out of range",
			build: func(c *chainCtx) []frontend.Desc {
				c.writeTable(c.table, []frontend.Desc{{Addr: c.req, Len: frontend.ReqSize, Flags: fNext, Next: 2},
					{Addr: c.resp, Len: frontend.RespSize, Flags: fWrite}})
				return []frontend.Desc{{Addr: c.table, Len: 32, Flags: fInd}}
			}},
		{name: "indirect len 0", bad: "bad indirect table length",
			build: func(c *chainCtx) []frontend.Desc { return []frontend.Desc{{Addr: c.table, Len: 0, Flags: fInd}} }},
		{name: "indirect len 24", bad: "bad indirect table length",
			build: func(c *chainCtx) []frontend.Desc { return []frontend.Desc{{Addr: c.table, Len: 24, Flags: fInd}} }},
		{name: "indirect len 2^32-16", bad: "bad indirect table length",
			build: func(c *chainCtx) []frontend.Desc {
				return []frontend.Desc{{Addr: c.table, Len: 0xfffffff0, Flags: fInd}}
			}},
		{name: "indirect table outside memory", bad: "indirect table outside guest memory",
			build: func(c *chainCtx) []frontend.Desc {
				return []frontend.Desc{{Addr: c.memSize + 4096, Len: 32, Flags: fInd}}
			}},
		{name: "indirect table straddles the end of memory", bad: "indirect table outside guest memory",
			build: func(c *chainCtx) []frontend.Desc {
				return []frontend.Desc{{Addr: c.memSize - 16, Len: 32, Flags: fInd}}
			}},
		{name: "nested indirect", bad: "indirect descriptor inside an indirect table",
			build: func(c *chainCtx) []frontend.Desc {
				c.writeTable(c.table2, []frontend.Desc{{Addr: c.req, Len: frontend.ReqSize}})
				c.writeTable(c.table, []frontend.Desc{{Addr: c.table2, Len: 16, Flags: fInd}})
				return []frontend.Desc{{Addr: c.table, Len: 16, Flags: fInd}}
			}},
		{name: "INDIRECT with NEXT", bad: "indirect descriptor with next flag",
			build: func(c *chainCtx) []frontend.Desc {
				c.writeTable(c.table, []frontend.Desc{{Addr: c.req, Len: frontend.ReqSize}})
				return []frontend.Desc{{Addr: c.table, Len: 16, Flags: fInd | fNext, Next: 1},
					{Addr: c.resp, Len: frontend.RespSize, Flags: fWrite}}
			}},
		{name: "indirect not negotiated", opts: frontend.Options{NoIndirect: true}, bad: "indirect descriptor not negotiated",
			build: func(c *chainCtx) []frontend.Desc {
				c.writeTable(c.table, []frontend.Desc{{Addr: c.req, Len: frontend.ReqSize}})
				return []frontend.Desc{{Addr: c.table, Len: 16, Flags: fInd}}
			}},
		{name: "readable after writable", bad: "readable descriptor after writable one",
			build: func(c *chainCtx) []frontend.Desc {
				return []frontend.Desc{{Addr: c.resp, Len: frontend.RespSize, Flags: fWrite | fNext, Next: 1},
					{Addr: c.req, Len: frontend.ReqSize}}
			}},
		{name: "readable after writable in an indirect table", bad: "readable descriptor after writable one",
			build: func(c *chainCtx) []frontend.Desc {
				c.writeTable(c.table, []frontend.Desc{{Addr: c.req, Len: frontend.ReqSize, Flags: fNext, Next: 1},
					{Addr: c.resp, Len: frontend.RespSize, Flags: fWrite | fNext, Next: 2}, {Addr: c.data, Len: 512}})
				return []frontend.Desc{{Addr: c.table, Len: 48, Flags: fInd}}
			}},
		{name: "buffer outside memory", bad: "descriptor buffer outside guest memory",
			build: func(c *chainCtx) []frontend.Desc {
				return []frontend.Desc{{Addr: c.req, Len: frontend.ReqSize, Flags: fNext, Next: 1},
					{Addr: 2 * c.memSize, Len: frontend.RespSize, Flags: fWrite}}
			}},
		{name: "buffer straddles the end of memory", bad: "descriptor buffer outside guest memory",
			build: func(c *chainCtx) []frontend.Desc {
				return []frontend.Desc{{Addr: c.req, Len: frontend.ReqSize, Flags: fNext, Next: 1},
					{Addr: c.memSize - 50, Len: frontend.RespSize, Flags: fWrite}}
			}},
		{name: "buffer addr+len overflows", bad: "descriptor buffer outside guest memory",
			build: func(c *chainCtx) []frontend.Desc {
				return []frontend.Desc{{Addr: ^uint64(0) - 10, Len: 100}}
			}},
		{name: "total length over 2^32-1", bad: "descriptor chain longer than 4 GiB",
			build: func(c *chainCtx) []frontend.Desc {
				// Each descriptor is all of guest memory, so each one is valid on its own.
				n := int((1<<32)/c.memSize) + 1
				if n > int(c.q.Size())-1 {
					c.t.Fatalf("guest memory of %d bytes needs %d descriptors", c.memSize, n)
				}
				ds := make([]frontend.Desc, n)
				for i := range ds {
					ds[i] = frontend.Desc{Addr: 0, Len: uint32(c.memSize), Flags: fNext, Next: uint16(i + 1)}
				}
				ds[n-1].Flags = 0
				return ds
			}},
		{name: "zero-length descriptor", bad: "zero-length descriptor",
			build: func(c *chainCtx) []frontend.Desc {
				return []frontend.Desc{{Addr: c.req, Len: frontend.ReqSize, Flags: fNext, Next: 1},
					{Addr: c.resp, Len: 0, Flags: fWrite}}
			}},
		{name: "too many segments", bad: "too many segments",
			build: func(c *chainCtx) []frontend.Desc {
				ds := make([]frontend.Desc, 200)
				for i := range ds {
					ds[i] = frontend.Desc{Addr: c.data + uint64(i), Len: 1, Flags: fNext, Next: uint16(i + 1)}
				}
				ds[len(ds)-1].Flags = 0
				c.writeTable(c.table, ds)
				return []frontend.Desc{{Addr: c.table, Len: uint32(16 * len(ds)), Flags: fInd}}
			}},
		{name: "request header 10 bytes", reqHdr: true,
			build: func(c *chainCtx) []frontend.Desc {
				return []frontend.Desc{{Addr: c.req, Len: 10, Flags: fNext, Next: 1},
					{Addr: c.resp, Len: frontend.RespSize, Flags: fWrite}}
			}},
		{name: "response 10 bytes", reqHdr: true,
			build: func(c *chainCtx) []frontend.Desc {
				return []frontend.Desc{{Addr: c.req, Len: frontend.ReqSize, Flags: fNext, Next: 1},
					{Addr: c.resp, Len: 10, Flags: fWrite}}
			}},
		{name: "no response buffer", reqHdr: true,
			build: func(c *chainCtx) []frontend.Desc { return []frontend.Desc{{Addr: c.req, Len: frontend.ReqSize}} }},
		{name: "no request header", reqHdr: true,
			build: func(c *chainCtx) []frontend.Desc {
				return []frontend.Desc{{Addr: c.resp, Len: frontend.RespSize, Flags: fWrite}}
			}},
		{name: "control queue loop", ctrl: true, bad: "descriptor chain loops",
			build: func(c *chainCtx) []frontend.Desc {
				return []frontend.Desc{{Addr: c.req, Len: 24, Flags: fNext, Next: 1}, {Addr: c.data, Len: 1, Flags: fNext, Next: 0}}
			}},
		{name: "control queue buffer outside memory", ctrl: true, bad: "descriptor buffer outside guest memory",
			build: func(c *chainCtx) []frontend.Desc {
				return []frontend.Desc{{Addr: c.req, Len: 24, Flags: fNext, Next: 1}, {Addr: 3 * c.memSize, Len: 1, Flags: fWrite}}
			}},
	}
}

// startVictim connects a started front-end to the victim.
func (h *hostile) startVictim(t *testing.T, o frontend.Options) *frontend.Device {
	t.Helper()
	o.Slots, o.Timeout = 2, 3*time.Second
	d, err := frontend.Dial(h.sock, o)
	if err != nil {
		t.Fatal(err)
	}
	settle(t, d)
	return d
}

// settle waits until the target has handled every message sent so far: Dial
// returns once the last start message is sent, not handled (no REPLY_ACK is
// asked for on most of them), so the rings may not be running yet and
// replaced fds not yet closed.
func settle(t *testing.T, d *frontend.Device) {
	t.Helper()
	if _, err := d.Call(proto.GetFeatures, nil); err != nil {
		t.Fatal(err)
	}
}

// TestHostileChains makes one malformed chain available per case on a
// started device. The target completes that head with used length 0, logs
// (at most) one WARN line, counts it, and serves the next correct request on
// the same queue; the device then stops cleanly (GET_VRING_BASE reports
// every head consumed).
func TestHostileChains(t *testing.T) {
	h := newHostile(t)
	for _, tc := range chainCases() {
		t.Run(tc.name, func(t *testing.T) {
			base := countResources(t)
			// A cleanup, so it runs after the case's own cleanups (eventfds) and defers.
			t.Cleanup(func() { checkLeaks(t, base) })
			d := h.startVictim(t, tc.opts)
			defer d.Abort()
			h.log.reset()
			before := h.victim.Stats.Snapshot().Queues[0]
			ring := d.Queue(0)
			if tc.ctrl {
				ring = d.Vring(frontend.ControlVring)
			}
			c := newChainCtx(t, d, d.Queue(0))
			u0 := ring.UsedIdx()
			head := ring.AddRawChain(tc.build(c))
			ring.Kick()
			eventually(t, "the bad chain's completion", 2*time.Second, func() bool { return ring.UsedIdx() != u0 })
			if ring.UsedIdx() != u0+1 {
				t.Fatalf("used idx %d -> %d, want +1", u0, ring.UsedIdx())
			}
			if id, n := ring.UsedElem(u0); id != uint32(head) || n != 0 {
				t.Fatalf("used element {%d, %d}, want {%d, 0}", id, n, head)
			}
			ring.Poll()
			if err := ring.Err(); err != nil {
				t.Fatal(err)
			}

			// The same queue serves the next correct request.
			if tc.ctrl {
				if r, err := d.TMF(0, 0, frontend.TMFQueryTaskSet, 0); err != nil || r != 0 {
					t.Fatalf("TMF after the bad chain: %v, response %d", err, r)
				}
			}
			ioRoundTrip(t, d, 0, 64, h.disk)

			after := h.victim.Stats.Snapshot().Queues[0]
			warns := h.log.lines("WARN")
			switch {
			case tc.reqHdr:
				if after.BadRequests != before.BadRequests+1 || after.BadChains != before.BadChains || len(warns) != 0 {
					t.Errorf("bad requests %d -> %d, bad chains %d -> %d (want +1, +0), log:\n%s",
						before.BadRequests, after.BadRequests, before.BadChains, after.BadChains, h.log)
				}
			default:
				if !tc.ctrl && after.BadChains != before.BadChains+1 {
					t.Errorf("bad chains %d -> %d, want +1", before.BadChains, after.BadChains)
				}
				if len(warns) != 1 || !strings.Contains(warns[0], tc.bad) {
					t.Errorf("want one WARN line with %q, got:\n%s", tc.bad, h.log)
				} else {
					t.Logf("%s", warns[0][strings.Index(warns[0], "level="):])
				}
			}
			if after.Broken != before.Broken || len(h.log.lines("ERROR")) != 0 {
				t.Errorf("queue marked broken by a per-request malformation:\n%s", h.log)
			}
			if err := d.Close(); err != nil {
				t.Fatalf("clean stop after the bad chain: %v", err)
			}
			eventually(t, "the session to end", 2*time.Second, func() bool { return h.victim.Sessions() == 0 })
			if p := h.victim.Stats.Snapshot().ProtocolErrors; p != 0 {
				t.Errorf("%d protocol errors", p)
			}
			h.goodIO(t)
		})
	}
}

// ringCase breaks a queue's rings; the target must stop serving that queue
// and nothing else.
type ringCase struct {
	name string
	ctrl bool // the control queue instead of the first request queue
	// breakIt corrupts the ring; it returns the used index expected afterwards.
	breakIt func(t *testing.T, h *hostile, d *frontend.Device, q *frontend.Queue) uint16
	want    string // in the ERROR line
}

func ringCases() []ringCase {
	return []ringCase{
		{name: "avail idx more than queue size ahead", want: "avail index ahead of queue",
			breakIt: func(t *testing.T, h *hostile, d *frontend.Device, q *frontend.Queue) uint16 {
				q.SetAvailIdx(q.AvailIdx() + q.Size() + 1)
				q.Notify()
				return q.UsedIdx()
			}},
		{name: "avail idx moved backwards", want: "avail index ahead of queue",
			breakIt: func(t *testing.T, h *hostile, d *frontend.Device, q *frontend.Queue) uint16 {
				q.SetAvailIdx(q.AvailIdx() - 1)
				q.Notify()
				return q.UsedIdx()
			}},
		{name: "head index >= queue size", want: "avail ring head index out of range",
			breakIt: func(t *testing.T, h *hostile, d *frontend.Device, q *frontend.Queue) uint16 {
				q.PushAvail(q.Size() + 3)
				q.Kick()
				return q.UsedIdx()
			}},
		{name: "head 0xffff", want: "avail ring head index out of range",
			breakIt: func(t *testing.T, h *hostile, d *frontend.Device, q *frontend.Queue) uint16 {
				q.PushAvail(0xffff)
				q.Kick()
				return q.UsedIdx()
			}},
		{name: "same head twice while in flight", want: "head already in flight",
			breakIt: func(t *testing.T, h *hostile, d *frontend.Device, q *frontend.Queue) uint16 {
				return sameHeadTwice(t, h, d, q, false)
			}},
		{name: "in-flight head again with a malformed chain", want: "head already in flight",
			breakIt: func(t *testing.T, h *hostile, d *frontend.Device, q *frontend.Queue) uint16 {
				return sameHeadTwice(t, h, d, q, true)
			}},
		{name: "control queue avail idx ahead", ctrl: true, want: "control queue broken",
			breakIt: func(t *testing.T, h *hostile, d *frontend.Device, q *frontend.Queue) uint16 {
				q.SetAvailIdx(q.AvailIdx() + 1000)
				q.Notify()
				return q.UsedIdx()
			}},
	}
}

// sameHeadTwice keeps a READ on the gated LUN in flight, then offers its head
// again (as is, or rewritten into a loop). The bdev completes with a memory
// disk inline, so without the gate the first use would be finished before
// the second pop and the head would legitimately be free again.
func sameHeadTwice(t *testing.T, h *hostile, d *frontend.Device, q *frontend.Queue, malformed bool) uint16 {
	c := newChainCtx(t, d, q)
	broken0 := h.victim.Stats.Snapshot().Queues[0].Broken
	l := frontend.LUNBytes(0, 1)
	hdr := make([]byte, frontend.ReqSize)
	copy(hdr, l[:])
	copy(hdr[19:], rw10(0x28, 0, 1))
	if err := d.WriteGuest(c.table2, hdr); err != nil {
		t.Fatal(err)
	}
	h.gate.open.Store(false)
	t.Cleanup(func() { h.gate.open.Store(true) }) // before the leak check: teardown drains the held READ
	u0 := q.UsedIdx()
	head := q.AddRawChain([]frontend.Desc{{Addr: c.table2, Len: frontend.ReqSize, Flags: fNext, Next: 1},
		{Addr: c.resp, Len: frontend.RespSize, Flags: fWrite | fNext, Next: 2}, {Addr: c.data, Len: 512, Flags: fWrite}})
	q.Kick()
	eventually(t, "the READ to reach the gated bdev", 2*time.Second, func() bool { return h.gate.held.Load() == 1 })
	if malformed {
		q.WriteDesc(head, frontend.Desc{Addr: c.table2, Len: frontend.ReqSize, Flags: fNext, Next: head})
	}
	q.PushAvail(head)
	q.Kick()
	eventually(t, "the queue to break", 2*time.Second, func() bool { return h.victim.Stats.Snapshot().Queues[0].Broken > broken0 })
	if q.UsedIdx() != u0 {
		t.Fatalf("used idx moved %d -> %d while the only request was held", u0, q.UsedIdx())
	}
	// The first use completes once the bdev lets it: exactly one used element.
	h.gate.open.Store(true)
	eventually(t, "the held READ to complete", 2*time.Second, func() bool { return q.UsedIdx() == u0+1 })
	if id, n := q.UsedElem(u0); id != uint32(head) || n != frontend.RespSize+512 {
		t.Fatalf("used element {%d, %d}, want {%d, %d}", id, n, head, frontend.RespSize+512)
	}
	return u0 + 1
}

// TestHostileRings corrupts a started device's rings. The queue is marked
// broken (counted in the snapshot, one ERROR line) and makes no further
// completions; the reactor keeps running and can still sleep; the good
// controller keeps serving; GET_VRING_BASE still answers on the broken ring;
// the next connection to the victim works.
func TestHostileRings(t *testing.T) {
	h := newHostile(t)
	for _, tc := range ringCases() {
		t.Run(tc.name, func(t *testing.T) {
			base := countResources(t)
			// A cleanup, so it runs after the case's own cleanups (eventfds) and defers.
			t.Cleanup(func() { checkLeaks(t, base) })
			d := h.startVictim(t, frontend.Options{})
			defer d.Abort()
			ioRoundTrip(t, d, 0, 128, h.disk)
			h.log.reset()
			broken0 := h.victim.Stats.Snapshot().Queues[0].Broken
			q := d.Queue(0)
			if tc.ctrl {
				q = d.Vring(frontend.ControlVring)
			}
			wantUsed := tc.breakIt(t, h, d, q)
			eventually(t, "the ERROR line", 2*time.Second, func() bool { return len(h.log.lines("ERROR")) > 0 })
			if !tc.ctrl {
				if b := h.victim.Stats.Snapshot().Queues[0].Broken; b != broken0+1 {
					t.Errorf("QueueCounters.Broken %d -> %d, want +1", broken0, b)
				}
			}

			// No further completions on the broken ring, even for a valid chain.
			c := newChainCtx(t, d, d.Queue(0))
			q.AddRawChain([]frontend.Desc{{Addr: c.req, Len: frontend.ReqSize, Flags: fNext, Next: 1},
				{Addr: c.resp, Len: frontend.RespSize, Flags: fWrite}})
			q.Kick()
			q.Notify()
			time.Sleep(30 * time.Millisecond)
			if u := q.UsedIdx(); u != wantUsed {
				t.Errorf("used idx %d after the ring broke, want %d", u, wantUsed)
			}

			// The reactor is alive and can still sleep with the broken queue on
			// it: each kick wakes it from epoll once, and a wake counts a sleep
			// (a reactor spinning on the broken ring never does).
			r := h.e.r[0]
			for i := 0; i < 3; i++ {
				s0 := r.Stats.Sleeps.Load()
				d.Queue(0).Notify()
				eventually(t, "the reactor to sleep and wake", 2*time.Second, func() bool { return r.Stats.Sleeps.Load() > s0 })
			}
			h.goodIO(t)
			if tc.ctrl {
				// The request queue is untouched.
				ioRoundTrip(t, d, 0, 256, h.disk)
			}

			errs := h.log.lines("ERROR")
			if len(errs) != 1 || !strings.Contains(errs[0], tc.want) || len(h.log.lines("WARN")) != 0 {
				t.Errorf("want one ERROR line with %q and no WARN, got:\n%s", tc.want, h.log)
			} else {
				t.Logf("%s", errs[0][strings.Index(errs[0], "level="):])
			}
			// Stopping a broken ring still answers; then the connection goes away.
			if _, err := d.GetVringBase(q.Index()); err != nil {
				t.Fatalf("GET_VRING_BASE on the broken ring: %v", err)
			}
			d.Abort()
			eventually(t, "the session to end", 2*time.Second, func() bool { return h.victim.Sessions() == 0 })
			if p := h.victim.Stats.Snapshot().ProtocolErrors; p != 0 {
				t.Errorf("%d protocol errors", p)
			}

			// A new connection to the victim gets a working queue.
			d2 := h.startVictim(t, frontend.Options{})
			defer d2.Abort()
			ioRoundTrip(t, d2, 0, 512, h.disk)
			if err := d2.Close(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

package vhost_test

import (
	"bytes"
	"encoding/binary"
	"io"
	"log/slog"
	"math/rand"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"vhost-target/bdev"
	"vhost-target/bdev/malloc"
	"vhost-target/reactor"
	"vhost-target/vhost"
	"vhost-target/vhost/frontend"
	"vhost-target/vhost/proto"
)

// env is a target with one reactor and a controller per LUN layout.
type env struct {
	t     *testing.T
	r     []*reactor.Reactor
	ctrls []*vhost.Controller
	disks []*malloc.Disk
}

func newEnv(t *testing.T, reactors int, mode reactor.Mode) *env {
	e := &env{t: t}
	for i := 0; i < reactors; i++ {
		r, err := reactor.New(i, -1, mode)
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Start(); err != nil {
			t.Fatal(err)
		}
		e.r = append(e.r, r)
	}
	t.Cleanup(e.close)
	return e
}

func (e *env) disk(name string, size uint64, bs uint32) *malloc.Disk {
	d, err := malloc.New(name, size, bs, [16]byte{byte(len(e.disks) + 1)})
	if err != nil {
		e.t.Fatal(err)
	}
	e.disks = append(e.disks, d)
	return d
}

func (e *env) controller(name string, nq int, luns ...vhost.LUNSpec) string {
	return e.controllerWith(name, nq, nil, luns...)
}

// controllerWith is controller with a change to its Config (nil: none).
func (e *env) controllerWith(name string, nq int, change func(*vhost.Config), luns ...vhost.LUNSpec) string {
	sock := filepath.Join(e.t.TempDir(), name)
	cfg := vhost.Config{
		Name: name, SocketPath: sock, NumQueues: nq, Reactors: e.r, LUNs: luns, SocketUID: -1, SocketGID: -1,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	if change != nil {
		change(&cfg)
	}
	c, err := vhost.NewController(cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	if err := c.Listen(); err != nil {
		e.t.Fatal(err)
	}
	e.ctrls = append(e.ctrls, c)
	return sock
}

func (e *env) close() {
	for _, c := range e.ctrls {
		c.Close()
	}
	for _, r := range e.r {
		r.Stop()
	}
	for _, d := range e.disks {
		d.Close()
	}
}

func lun(t uint8, l uint16, b bdev.Bdev) vhost.LUNSpec {
	return vhost.LUNSpec{Target: t, LUN: l, Bdev: b}
}

func rw10(op byte, lba uint32, blocks uint16) []byte {
	c := make([]byte, 10)
	c[0] = op
	binary.BigEndian.PutUint32(c[2:], lba)
	binary.BigEndian.PutUint16(c[7:], blocks)
	return c
}

func TestSmokeWriteReadBack(t *testing.T) {
	e := newEnv(t, 1, reactor.Busy)
	d := e.disk("m0", 8<<20, 512)
	sock := e.controller("c0", 1, lun(0, 0, d))
	dev, err := frontend.Dial(sock, frontend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	resp, err := dev.Do(frontend.Command{CDB: []byte{0x12, 0, 0, 0, 96, 0}, DataInLen: 96})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Response != 0 || resp.Status != 0 {
		t.Fatalf("inquiry: %+v", resp)
	}
	t.Logf("inquiry: %q", resp.DataIn[8:32])
	data := make([]byte, 8*512)
	rand.Read(data)
	resp, err = dev.Do(frontend.Command{CDB: rw10(0x2a, 100, 8), DataOut: data, Segments: 3})
	if err != nil || resp.Status != 0 || resp.Response != 0 {
		t.Fatalf("write: %v %+v", err, resp)
	}
	resp, err = dev.Do(frontend.Command{CDB: rw10(0x28, 100, 8), DataInLen: len(data), Segments: 5})
	if err != nil || resp.Status != 0 || resp.Response != 0 {
		t.Fatalf("read: %v %+v", err, resp)
	}
	if !bytes.Equal(resp.DataIn, data) {
		t.Fatal("read back differs from what was written")
	}
	if !bytes.Equal(d.Bytes()[100*512:108*512], data) {
		t.Fatal("disk content differs")
	}
}

// TestHugetlbMemory serves a front-end whose guest RAM is in 2 MiB hugetlb
// memfds (as QEMU with memory-backend-file on hugetlbfs, or SPDK's initiator):
// the mapping length must be rounded to the huge page size.
func TestHugetlbMemory(t *testing.T) {
	const want = 64 // 2 MiB pages: 128 MiB
	old, err := os.ReadFile("/proc/sys/vm/nr_hugepages")
	if err != nil {
		t.Skipf("no hugetlb support: %v", err)
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(old)))
	if n < want {
		if err := os.WriteFile("/proc/sys/vm/nr_hugepages", []byte(strconv.Itoa(n+want)), 0); err != nil {
			t.Skipf("cannot reserve huge pages (needs root): %v", err)
		}
		t.Cleanup(func() { os.WriteFile("/proc/sys/vm/nr_hugepages", old, 0) })
	}
	e := newEnv(t, 1, reactor.Adaptive)
	d := e.disk("m0", 8<<20, 4096)
	sock := e.controller("c0", 1, lun(0, 0, d))
	dev, err := frontend.Dial(sock, frontend.Options{HugePages: true, MemSize: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	data := make([]byte, 64<<10)
	rand.Read(data)
	if r, err := dev.Do(frontend.Command{CDB: rw10(0x2a, 8, 16), DataOut: data, Segments: 4}); err != nil || r.Status != 0 || r.Response != 0 {
		t.Fatalf("write: %v %+v", err, r)
	}
	r, err := dev.Do(frontend.Command{CDB: rw10(0x28, 8, 16), DataInLen: len(data)})
	if err != nil || r.Status != 0 || !bytes.Equal(r.DataIn, data) {
		t.Fatalf("read back from hugetlb guest memory: %v %+v", err, r)
	}
}

// TestStopDrainsInFlight holds a WRITE in the bdev, asks for GET_VRING_BASE,
// and checks the reply comes only after the WRITE completed and was put on
// the used ring (notes A.4: stop and drain before replying).
func TestStopDrainsInFlight(t *testing.T) {
	e := newEnv(t, 1, reactor.Busy)
	g := &gateBdev{Disk: e.disk("g", 1<<20, 512)}
	sock := e.controller("c0", 1, lun(0, 0, g))
	dev, err := frontend.Dial(sock, frontend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Abort()
	q := dev.Queue(0)
	s := q.Get()
	copy(s.Data, bytes.Repeat([]byte{0x5a}, 512))
	q.Prepare(s, 0, 0, rw10(0x2a, 3, 1), frontend.DirOut, 512)
	q.Submit(s)
	q.Kick()
	deadline := time.Now().Add(5 * time.Second)
	for g.held.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if g.held.Load() != 1 {
		t.Fatal("write never reached the bdev")
	}
	if l := e.ctrls[0].Stats.Snapshot().LUNs[0]; l.InFlight != 1 {
		g.open.Store(true)
		t.Fatalf("LUN in flight = %d while one write is held in the bdev: %+v", l.InFlight, e.ctrls[0].Stats.Snapshot())
	}
	reply := make(chan error, 1)
	go func() { _, err := dev.GetVringBase(q.Index()); reply <- err }()
	select {
	case err := <-reply:
		t.Fatalf("GET_VRING_BASE answered (%v) while a write was in flight", err)
	case <-time.After(200 * time.Millisecond):
	}
	if q.UsedIdx() != 0 {
		t.Fatal("write completed while the gate was closed")
	}
	g.open.Store(true)
	select {
	case err := <-reply:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("GET_VRING_BASE not answered after the write completed")
	}
	if q.UsedIdx() != 1 {
		t.Fatalf("used idx %d after the drain, want 1: the completion was lost", q.UsedIdx())
	}
	if !bytes.Equal(g.Bytes()[3*512:4*512], bytes.Repeat([]byte{0x5a}, 512)) {
		t.Fatal("drained write did not reach the disk")
	}
}

// TestMemSlots drives CONFIGURE_MEM_SLOTS the way QEMU 7.2 does once it is
// negotiated: GET_MAX_MEM_SLOTS, then one ADD_MEM_REG per region instead of
// SET_MEM_TABLE; I/O then runs on buffers in both regions. A REM_MEM_REG and
// a re-ADD while the rings run (memory hot-unplug and plug) keep them serving.
func TestMemSlots(t *testing.T) {
	e := newEnv(t, 1, reactor.Busy)
	d := e.disk("m0", 8<<20, 512)
	sock := e.controller("c0", 1, lun(0, 0, d))
	dev, err := frontend.NewUnstarted(sock, frontend.Options{Regions: 2, MemSize: 64 << 20,
		ProtocolMask: 1<<proto.PFMQ | 1<<proto.PFReplyAck | 1<<proto.PFResetDevice | 1<<proto.PFConfigureMemSlots})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	if err := dev.Negotiate(); err != nil {
		t.Fatal(err)
	}
	if dev.ProtocolFeatures()&(1<<proto.PFConfigureMemSlots) == 0 {
		t.Fatal("CONFIGURE_MEM_SLOTS not offered")
	}
	m, err := dev.Call(proto.GetMaxMemSlots, nil)
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := proto.U64(m); n < 8 {
		t.Fatalf("GET_MAX_MEM_SLOTS = %d", n)
	}
	if err := dev.SetFeatures(dev.OfferedFeatures() &^ (1 << proto.FVirtioSCSIT10PI)); err != nil {
		t.Fatal(err)
	}
	regs, fds := dev.MemTable(), dev.MemFDs()
	add := func(i int) {
		t.Helper()
		if err := dev.Message(proto.AddMemReg, true, proto.EncodeSingleRegion(regs[i]), fds[i]); err != nil {
			t.Fatalf("ADD_MEM_REG %d: %v", i, err)
		}
	}
	add(0)
	add(1)
	for i := 0; i < dev.NumVrings(); i++ {
		if err := dev.StartRing(i); err != nil {
			t.Fatal(err)
		}
	}
	if err := dev.EnableRings(true); err != nil {
		t.Fatal(err)
	}
	verify := func(lba uint32, gpa uint64) {
		t.Helper()
		data := make([]byte, 4096)
		rand.Read(data)
		if r, err := dev.Do(frontend.Command{CDB: rw10(0x2a, lba, 8), DataOut: data, DataGPA: gpa}); err != nil || r.Status != 0 || r.Response != 0 {
			t.Fatalf("write via gpa %#x: %v %+v", gpa, err, r)
		}
		r, err := dev.Do(frontend.Command{CDB: rw10(0x28, lba, 8), DataInLen: len(data)})
		if err != nil || r.Status != 0 || !bytes.Equal(r.DataIn, data) {
			t.Fatalf("read back: %v %+v", err, r)
		}
	}
	hi := regs[1].GPA + regs[1].Size - 64<<10 // a buffer in the second region
	verify(0, hi)
	// Hot-unplug and re-plug the second region while the rings run.
	if err := dev.Message(proto.RemMemReg, true, proto.EncodeSingleRegion(proto.MemRegion{GPA: regs[1].GPA, Size: regs[1].Size, UVA: regs[1].UVA})); err != nil {
		t.Fatalf("REM_MEM_REG: %v", err)
	}
	add(1)
	verify(16, hi)
}

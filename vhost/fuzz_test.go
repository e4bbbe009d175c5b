// Fuzz targets for the two ways a front-end reaches the target: vhost-user
// messages on the socket (FuzzMessages) and virtio-scsi requests in the rings
// (FuzzRequest). Both run against a live controller served by a real reactor,
// in process, so a panic anywhere in the target fails the fuzzer.
//
// Seeds live in testdata/fuzz/<Name>; regenerate them with
// VHOST_WRITE_SEEDS=1 go test -run TestWriteFuzzSeeds ./vhost. An iteration
// takes a millisecond or two (a connection, memfds, a leak check), so the
// Makefile caps -fuzzminimizetime: the default minute of minimizing every
// new input would stall the run.
package vhost_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"vhost-target/bdev/malloc"
	"vhost-target/reactor"
	"vhost-target/vhost"
	"vhost-target/vhost/frontend"
	"vhost-target/vhost/proto"
)

// fuzzTarget is the per-process target the fuzz iterations share: one
// adaptive reactor (a busy one would take a core from the fuzz workers), the
// controller under attack and a second one with a long-lived front-end that
// must keep working whatever the first one is sent.
type fuzzTarget struct {
	victim *vhost.Controller
	sock   string
	disk   *malloc.Disk
	good   *frontend.Device
	log    *logBuf // the victim's log
}

func newFuzzTarget(f testing.TB) *fuzzTarget {
	r, err := reactor.New(0, -1, reactor.Adaptive)
	if err != nil {
		f.Fatal(err)
	}
	if err := r.Start(); err != nil {
		f.Fatal(err)
	}
	dir := f.TempDir()
	ft := &fuzzTarget{sock: filepath.Join(dir, "victim"), log: &logBuf{}}
	newDisk := func(name string) *malloc.Disk {
		d, err := malloc.New(name, 1<<20, 512, [16]byte{byte(len(name))})
		if err != nil {
			f.Fatal(err)
		}
		return d
	}
	ft.disk = newDisk("victim")
	goodDisk := newDisk("good0")
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	newCtrl := func(name, sock string, d *malloc.Disk, log *slog.Logger) *vhost.Controller {
		c, err := vhost.NewController(vhost.Config{Name: name, SocketPath: sock, NumQueues: 2, SocketUID: -1, SocketGID: -1,
			Reactors: []*reactor.Reactor{r}, LUNs: []vhost.LUNSpec{lun(0, 0, d)}, Logger: log})
		if err != nil {
			f.Fatal(err)
		}
		if err := c.Listen(); err != nil {
			f.Fatal(err)
		}
		return c
	}
	// The victim's log is kept only for TestMessageSeedsReachRings: a fuzz
	// worker would collect megabytes of WARN lines.
	vlog := quiet
	if _, ok := f.(*testing.T); ok {
		vlog = slog.New(slog.NewTextHandler(ft.log, nil))
	}
	ft.victim = newCtrl("victim", ft.sock, ft.disk, vlog)
	good := newCtrl("good", filepath.Join(dir, "good"), goodDisk, quiet)
	ft.good, err = frontend.Dial(filepath.Join(dir, "good"), frontend.Options{QueueSize: 16, Slots: 2, SlotDataSize: 4096,
		ScratchSize: 64 << 10, Timeout: 2 * time.Second})
	if err != nil {
		f.Fatal(err)
	}
	// Dial returns once the start messages are sent; the call fds it replaced
	// are closed when the target has handled them (see settle).
	if _, err := ft.good.Call(proto.GetFeatures, nil); err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() {
		ft.good.Close()
		ft.victim.Close()
		good.Close()
		r.Stop()
		ft.disk.Close()
		goodDisk.Close()
	})
	return ft
}

// goodTUR checks that the other controller still answers.
func (ft *fuzzTarget) goodTUR(t *testing.T) {
	t.Helper()
	if r, err := ft.good.Do(frontend.Command{CDB: make([]byte, 6)}); err != nil || r.Response != 0 || r.Status != 0 {
		t.Fatalf("the other controller stopped answering: %v %+v", err, r)
	}
}

// Message program ops (FuzzMessages). Each op starts with an opcode byte and
// reads the bytes it needs; a program ends when its input does.
const (
	opRaw       = iota // req, flags, len, payload[len], fdmask: any message
	opMemTable         // sel, delta: the front-end's real table, one field changed
	opVringAddr        // ring, sel, delta: the front-end's real ring addresses, one changed
	opState            // which, ring, num16: SET_VRING_NUM/BASE, GET_VRING_BASE, SET_VRING_ENABLE
	opFD               // which, ring, fdsel: SET_VRING_KICK/CALL/ERR
	opU64              // which, value64: SET_FEATURES, SET_PROTOCOL_FEATURES
	opHelper           // which: a front-end step (negotiate, start, I/O, stop, reset)
	opKick             // ring, fdsel: a TUR chain on the ring, kicked through a pool eventfd
	numOps
)

// fdPool: index 0 is the front-end's memfd, 1..3 eventfds made per iteration.
const fdPoolSize = 4

type msgProgram struct {
	t    *testing.T
	d    *frontend.Device
	in   []byte
	pool [fdPoolSize]int
}

func (p *msgProgram) byte() byte {
	if len(p.in) == 0 {
		return 0
	}
	b := p.in[0]
	p.in = p.in[1:]
	return b
}

func (p *msgProgram) u16() uint16 { return uint16(p.byte()) | uint16(p.byte())<<8 }

func (p *msgProgram) u64() uint64 {
	var v uint64
	for i := 0; i < 8; i++ {
		v |= uint64(p.byte()) << (8 * i)
	}
	return v
}

func (p *msgProgram) fds(mask byte) []int {
	var fds []int
	for i := 0; i < fdPoolSize; i++ {
		if mask&(1<<i) != 0 {
			fds = append(fds, p.pool[i])
		}
	}
	return fds
}

// mutate changes field sel%4 of vals (when sel < 0x80) by delta: small
// deltas stay near the real value, the top bit of sel sets it outright.
func mutate(vals []uint64, sel byte, delta uint16) {
	if sel&0x80 != 0 {
		return
	}
	i := int(sel) % len(vals)
	switch sel >> 5 & 3 {
	case 0:
		vals[i] += uint64(delta)
	case 1:
		vals[i] -= uint64(delta)
	case 2:
		vals[i] ^= 1 << (delta % 64)
	case 3:
		vals[i] = uint64(int64(int16(delta)))
	}
}

// step runs one op; false ends the program (the connection is gone).
func (p *msgProgram) step() bool {
	d := p.d
	var err error
	switch p.byte() % numOps {
	case opRaw:
		req, flags, n := proto.Request(p.byte()), uint32(p.byte()), int(p.byte()%64)
		payload := make([]byte, n)
		for i := range payload {
			payload[i] = p.byte()
		}
		err = d.Send(req, flags&0xf, payload, p.fds(p.byte())...)
	case opMemTable:
		sel, delta := p.byte(), p.u16()
		regs := d.MemTable()
		v := []uint64{regs[0].GPA, regs[0].Size, regs[0].UVA, regs[0].MmapOffset}
		mutate(v, sel, delta)
		regs[0] = proto.MemRegion{GPA: v[0], Size: v[1], UVA: v[2], MmapOffset: v[3]}
		err = d.Send(proto.SetMemTable, proto.FlagVersion|uint32(sel&0x40)>>3, proto.EncodeMemTable(regs), d.MemFDs()...)
	case opVringAddr:
		ring, sel, delta := int(p.byte()%4), p.byte(), p.u16()
		a := d.VringAddr(min(ring, d.NumVrings()-1))
		a.Index = uint32(ring)
		v := []uint64{a.Desc, a.Avail, a.Used, uint64(a.Flags)}
		mutate(v, sel, delta)
		a.Desc, a.Avail, a.Used, a.Flags = v[0], v[1], v[2], uint32(v[3])
		err = d.Send(proto.SetVringAddr, proto.FlagVersion, a.Encode())
	case opState:
		reqs := []proto.Request{proto.SetVringNum, proto.SetVringBase, proto.GetVringBase, proto.SetVringEnable}
		req, ring, num := reqs[p.byte()%4], uint32(p.byte()), uint32(p.u16())
		if ring >= 0x80 {
			ring = 0xffffff00 | ring
		} else {
			ring %= 5
		}
		err = d.Send(req, proto.FlagVersion, proto.VringState{Index: ring, Num: num}.Encode())
	case opFD:
		reqs := []proto.Request{proto.SetVringKick, proto.SetVringCall, proto.SetVringErr}
		req, ring, sel := reqs[p.byte()%3], uint64(p.byte()%5), p.byte()
		if sel&0x80 != 0 {
			err = d.Send(req, proto.FlagVersion, proto.PutU64(ring|proto.VringNoFDBit))
		} else {
			err = d.Send(req, proto.FlagVersion, proto.PutU64(ring), p.pool[sel%fdPoolSize])
		}
	case opU64:
		reqs := []proto.Request{proto.SetFeatures, proto.SetProtocolFeatures, proto.GetFeatures, proto.GetQueueNum}
		req, v := reqs[p.byte()%4], p.u64()
		var payload []byte
		if req == proto.SetFeatures || req == proto.SetProtocolFeatures {
			payload = proto.PutU64(v)
		}
		err = d.Send(req, proto.FlagVersion, payload)
	case opHelper:
		return p.helper(p.byte())
	case opKick:
		q, sel := d.Vring(2+int(p.byte()%2)), p.byte()
		if q.Free() > 0 {
			if s := q.Get(); s != nil {
				c := newChainCtxSlot(p.t, d, s)
				q.AddRawChain([]frontend.Desc{{Addr: c.req, Len: frontend.ReqSize, Flags: fNext, Next: 1},
					{Addr: c.resp, Len: frontend.RespSize, Flags: fWrite}})
				q.SetAvailIdx(q.AvailIdx() + 1)
			}
		}
		var one = [8]byte{1}
		unix.Write(p.pool[1+int(sel)%(fdPoolSize-1)], one[:])
	}
	return err == nil
}

// helper runs a step of the well-behaved front-end. Its errors are expected
// (the program may have broken the session); a front-end panic on a state
// the program made is the front-end's problem, not the target's, so it only
// ends the program.
func (p *msgProgram) helper(which byte) (ok bool) {
	defer func() {
		if r := recover(); r != nil {
			ok = false
		}
	}()
	d := p.d
	var err error
	switch which % 7 {
	case 0:
		err = d.Negotiate()
	case 1:
		err = d.Start()
	case 2:
		_, err = d.Do(frontend.Command{CDB: rw10(0x2a, uint32(which>>3), 2), DataOut: make([]byte, 1024), Segments: 2})
	case 3:
		_, err = d.Do(frontend.Command{CDB: rw10(0x28, uint32(which>>3), 2), DataInLen: 1024, Queue: 1})
	case 4:
		err = d.EnableRings(false)
		for i := 0; err == nil && i < d.NumVrings(); i++ {
			_, err = d.GetVringBase(i)
		}
	case 5:
		err = d.Reset()
	case 6:
		_, err = d.TMF(0, 0, frontend.TMFQueryTaskSet, 0)
	}
	return !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE)
}

// newChainCtxSlot is newChainCtx on a slot the caller took.
func newChainCtxSlot(t *testing.T, d *frontend.Device, s *frontend.Slot) *chainCtx {
	c := &chainCtx{t: t, d: d, memSize: d.Options().MemSize, req: s.DataGPA, resp: s.DataGPA + 256,
		table: s.DataGPA + 1024, table2: s.DataGPA + 2048, data: s.DataGPA + 3072}
	l := frontend.LUNBytes(0, 0)
	hdr := make([]byte, frontend.ReqSize)
	copy(hdr, l[:])
	d.WriteGuest(c.req, hdr)
	return c
}

// alive reports whether the target still answers on d: a GET_CONFIG
// carrying a fresh cookie as its offset gets its reply (the target echoes the
// offset; replies the program left unread come first), or the connection is
// closed. A connection that neither answers nor closes is a hung session.
func alive(t *testing.T, d *frontend.Device) bool {
	t.Helper()
	aliveCookie++
	p := make([]byte, proto.ConfigHeaderSize)
	binary.LittleEndian.PutUint32(p, aliveCookie)
	if err := d.Send(proto.GetConfig, proto.FlagVersion, p); err != nil {
		return false
	}
	// A generous deadline of its own: the program's short Timeout keeps
	// fuzzing fast, but a loaded machine must not pass for a hung session.
	uc := d.Conn().UnixConn()
	uc.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer uc.SetReadDeadline(time.Time{})
	for {
		m, err := d.Conn().Recv()
		switch {
		case err == nil:
			m.CloseFDs()
			if m.Request == proto.GetConfig && m.Flags&proto.FlagReply != 0 && len(m.Payload) >= 4 &&
				binary.LittleEndian.Uint32(m.Payload) == aliveCookie {
				return true
			}
		case errors.Is(err, os.ErrDeadlineExceeded):
			t.Fatalf("session neither answers nor closes: %v", err)
		default:
			return false
		}
	}
}

var aliveCookie uint32 = 0xc0de0000

func FuzzMessages(f *testing.F) {
	for _, s := range messageSeeds() {
		f.Add(s)
	}
	ft := newFuzzTarget(f)
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) <= 4096 {
			ft.runProgram(t, in)
		}
	})
}

// runProgram runs one message program on a fresh connection, then checks
// that the session still answers or has closed, that closing it gives back
// every goroutine, fd and mapping, and that the other controller still works.
func (ft *fuzzTarget) runProgram(t *testing.T, in []byte) {
	base := countResources(t)
	// Inflight: Start asks for the inflight area and hands it back, as QEMU
	// 8.2+ does, so programs run with requests tracked in it; raw GET/SET_
	// INFLIGHT_FD messages (opRaw) fuzz its shape and fd checks.
	d, err := frontend.NewUnstarted(ft.sock, frontend.Options{NumQueues: 2, QueueSize: 16, Slots: 2, SlotDataSize: 4096,
		ScratchSize: 64 << 10, MemSize: 2 << 20, Timeout: 300 * time.Millisecond, Inflight: true})
	if err != nil {
		t.Fatal(err)
	}
	p := &msgProgram{t: t, d: d, in: in}
	p.pool[0] = d.MemFDs()[0]
	for i := 1; i < fdPoolSize; i++ {
		if p.pool[i], err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
			t.Fatal(err)
		}
	}
	for len(p.in) > 0 && p.step() {
	}
	alive(t, d)
	d.Abort()
	for _, fd := range p.pool[1:] {
		unix.Close(fd)
	}
	eventually(t, "the session to end", 2*time.Second, func() bool { return ft.victim.Sessions() == 0 })
	checkLeaks(t, base)
	ft.goodTUR(t)
}

// TestMessageSeedsReachRings checks that the seed programs do what they are
// for: the raw QEMU start (also with the inflight area) runs both request
// queues (the kicked chains complete) and nothing in a seed is a protocol
// error, except in the hostile ones.
func TestMessageSeedsReachRings(t *testing.T) {
	ft := newFuzzTarget(t)
	for name, in := range messageSeeds() {
		ft.log.reset()
		before := ft.victim.Stats.Snapshot()
		ft.runProgram(t, in)
		after := ft.victim.Stats.Snapshot()
		if after.ProtocolErrors != before.ProtocolErrors && !strings.HasPrefix(name, "hostile-") {
			t.Errorf("seed %s: protocol error:\n%s", name, ft.log.lines("WARN"))
		}
		var reqs [2]uint64
		for i := range reqs {
			reqs[i] = after.Queues[i].Requests - before.Queues[i].Requests
		}
		t.Logf("seed %s: requests completed per queue %v", name, reqs)
		if ((name == "qemu-start-raw" || name == "inflight-get-raw") && (reqs[0] != 1 || reqs[1] != 1)) || (name == "helpers" && reqs[0]+reqs[1] < 3) {
			t.Errorf("seed %s did not reach running rings: %v requests", name, reqs)
		}
	}
}

// Seed programs: the QEMU 7.2 start sequence as raw messages (so the fuzzer
// mutates each one), the same through the front-end's helpers, and starts
// followed by the changes QEMU makes to running rings.
func messageSeeds() map[string][]byte {
	var b []byte
	raw := func(req proto.Request, flags byte, payload []byte, fdmask byte) {
		b = append(b, opRaw, byte(req), flags, byte(len(payload)))
		b = append(b, payload...)
		b = append(b, fdmask)
	}
	state := func(which, ring byte, num uint16) { b = append(b, opState, which, ring, byte(num), byte(num>>8)) }
	fd := func(which, ring, sel byte) { b = append(b, opFD, which, ring, sel) }
	u64 := func(which byte, v uint64) {
		b = append(b, opU64, which)
		b = binary.LittleEndian.AppendUint64(b, v)
	}
	pf := uint64(1<<proto.PFMQ | 1<<proto.PFReplyAck | 1<<proto.PFResetDevice)
	start := func() {
		b = nil
		raw(proto.GetFeatures, 1, nil, 0)
		raw(proto.GetProtocolFeatures, 1, nil, 0)
		u64(1, pf)
		raw(proto.GetQueueNum, 1, nil, 0)
		raw(proto.SetOwner, 1, nil, 0)
		for r := byte(0); r < 4; r++ {
			fd(1, r, 3)
			fd(2, r, 3)
		}
		u64(0, 1<<proto.FVersion1|1<<proto.FProtocolFeatures|1<<proto.FRingIndirectDesc|1<<proto.FRingEventIdx)
		b = append(b, opMemTable, 0x80, 0, 0)
		for r := byte(0); r < 4; r++ {
			state(0, r, 16)
			state(1, r, 0)
			b = append(b, opVringAddr, r, 0x80, 0, 0)
			fd(0, r, 1+r%3)
		}
		for r := byte(0); r < 5; r++ {
			state(3, r, 1)
		}
	}
	seeds := map[string][]byte{}
	start()
	b = append(b, opKick, 0, 1, opKick, 1, 2)
	seeds["qemu-start-raw"] = b
	start()
	state(2, 2, 0)
	state(2, 3, 0)
	raw(proto.ResetDevice, 1, nil, 0)
	seeds["start-stop-reset-raw"] = b
	start()
	b = append(b, opMemTable, 0x80, 0, 0, opMemTable, 0x01, 0x00, 0x10, opKick, 0, 1)
	seeds["hostile-new-memtable"] = b
	start()
	b = append(b, opVringAddr, 2, 0x80, 0, 0, opVringAddr, 2, 0x00, 0x40, 0, opKick, 0, 1)
	seeds["start-readdress"] = b
	// QEMU 8.2+: the inflight area asked for before the rings start (the
	// program reads no replies: the fd it is sent is dropped with the
	// connection), and a SET_INFLIGHT_FD of the guest memfd, which is not
	// sealed: refused.
	pf |= 1 << proto.PFInflightShmFD
	start()
	raw(proto.GetInflightFD, 1, proto.Inflight{NumQueues: 4, QueueSize: 16}.Encode(), 0)
	b = append(b, opKick, 0, 1, opKick, 1, 2)
	seeds["inflight-get-raw"] = b
	start()
	raw(proto.SetInflightFD, 1, proto.Inflight{MmapSize: 4 * 320, NumQueues: 4, QueueSize: 16}.Encode(), 1)
	seeds["hostile-inflight-set-unsealed"] = b
	seeds["helpers"] = []byte{opHelper, 0, opHelper, 1, opHelper, 2, opHelper, 3 + 56, opHelper, 6, opHelper, 5, opHelper, 2, opHelper, 4}
	seeds["hostile-helpers-then-raw"] = []byte{opHelper, 0, opHelper, 1, opHelper, 2, opState, 0, 2, 64, 0, opRaw, 5, 1, 0, 1}
	return seeds
}

// Request ops (FuzzRequest): the input is one descriptor chain and the bytes
// it points at. Buffers land in a 16 KiB scratch area of guest memory (the
// data buffer of one front-end slot, which nothing else uses), so the target
// can write only there, never over the rings; a few selectors point outside
// guest memory instead.
const reqScratch = 16 << 10

type reqInput struct {
	in []byte
}

func (r *reqInput) byte() byte {
	if len(r.in) == 0 {
		return 0
	}
	b := r.in[0]
	r.in = r.in[1:]
	return b
}

func (r *reqInput) u16() uint16 { return uint16(r.byte()) | uint16(r.byte())<<8 }

// addr picks a buffer address: inside scratch (most), or a hostile one.
func (r *reqInput) addr(scratch, memSize uint64) uint64 {
	off := uint64(r.u16())
	switch off >> 14 {
	case 3:
		switch off & 3 {
		case 0:
			return memSize - off&0xff
		case 1:
			return memSize + off&0xfff
		case 2:
			return ^uint64(0) - off&0xff
		}
		return 0
	}
	return scratch + off%reqScratch
}

// runReqInput plays one FuzzRequest input on request queue 0 of d (the
// victim controller's): 2 x (offset16, len8, data[len]) written into the
// slot's scratch, then an indirect table (count, offset16, descriptors)
// written at its own address, then the chain (count-1, descriptors: addr16,
// len16, flags8, next8), made available and waited for. It reports whether
// the chain completed and its used length (false when the target broke the
// queue instead), the device-writable bytes the input describes, and
// whether the chain is closed: it can reach only descriptors of this input
// (no indirect table, which may be stale bytes, and no link out of the
// chain into entries earlier inputs left).
func runReqInput(t *testing.T, d *frontend.Device, slot *frontend.Slot, victim *vhost.Controller, in []byte) (done bool, used uint32, writable uint64, closed bool) {
	q := d.Queue(0)
	memSize := d.Options().MemSize
	r := &reqInput{in: in}
	for k := 0; k < 2; k++ {
		off, n := uint64(r.u16())%reqScratch, int(r.byte())
		if uint64(n) > reqScratch-off {
			n = int(reqScratch - off)
		}
		buf := make([]byte, n)
		for i := range buf {
			buf[i] = r.byte()
		}
		d.WriteGuest(slot.DataGPA+off, buf)
	}
	desc := func() frontend.Desc {
		a := r.addr(slot.DataGPA, memSize)
		l := uint32(r.u16())
		if l&0x8000 != 0 {
			l = l&0x7fff | uint32(r.byte())<<24 // huge lengths
		}
		fl := uint16(r.byte()) & (fNext | fWrite | fInd)
		if fl&fWrite != 0 {
			writable += uint64(l)
		}
		return frontend.Desc{Addr: a, Len: l, Flags: fl, Next: uint16(r.byte())}
	}
	nind := int(r.byte() % 9)
	if nind > 0 {
		tbl := slot.DataGPA + uint64(r.u16())%(reqScratch-16*8)
		b := make([]byte, 16*nind)
		for i := 0; i < nind; i++ {
			ds := desc()
			binary.LittleEndian.PutUint64(b[16*i:], ds.Addr)
			binary.LittleEndian.PutUint32(b[16*i+8:], ds.Len)
			binary.LittleEndian.PutUint16(b[16*i+12:], ds.Flags)
			binary.LittleEndian.PutUint16(b[16*i+14:], ds.Next)
		}
		d.WriteGuest(tbl, b)
	}
	n := 1 + int(r.byte()%8)
	descs := make([]frontend.Desc, n)
	closed = true
	for i := range descs {
		descs[i] = desc()
		if descs[i].Flags&fInd != 0 || descs[i].Flags&fNext != 0 && int(descs[i].Next) >= n {
			closed = false
		}
	}
	before := victim.Stats.Snapshot()
	u0 := q.UsedIdx()
	head := q.AddRawChain(descs)
	q.Kick()
	deadline := time.Now().Add(2 * time.Second)
	for !done {
		if n, err := q.WaitRaw(head, 10*time.Millisecond); err == nil {
			done, used = true, n
		} else if victim.Stats.Snapshot().Queues[0].Broken > before.Queues[0].Broken {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("head %d neither completed nor broke the queue (used %d -> %d)", head, u0, q.UsedIdx())
		}
	}
	if err := q.Err(); err != nil {
		t.Fatalf("target broke the used ring: %v", err)
	}
	return done, used, writable, closed
}

// fuzzDesc is one descriptor of a request seed: scratch offset, length,
// flags and next.
type fuzzDesc struct {
	off, ln uint16
	flags   byte
	next    byte
}

// encodeReqInput is runReqInput's encoding of a seed: buf written at bufOff
// (the second write empty), an indirect table at tableOff, the chain.
func encodeReqInput(bufOff uint16, buf []byte, table []fuzzDesc, tableOff uint16, chain []fuzzDesc) []byte {
	var b []byte
	b = binary.LittleEndian.AppendUint16(b, bufOff)
	b = append(b, byte(len(buf)))
	b = append(b, buf...)
	b = append(b, 0, 0, 0) // second write: nothing
	put := func(d fuzzDesc) {
		b = binary.LittleEndian.AppendUint16(b, d.off)
		b = binary.LittleEndian.AppendUint16(b, d.ln)
		b = append(b, d.flags, d.next)
	}
	b = append(b, byte(len(table)))
	if len(table) > 0 {
		b = binary.LittleEndian.AppendUint16(b, tableOff)
		for _, d := range table {
			put(d)
		}
	}
	b = append(b, byte(len(chain)-1))
	for _, d := range chain {
		put(d)
	}
	return b
}

func FuzzRequest(f *testing.F) {
	for _, s := range requestSeeds() {
		f.Add(s)
	}
	ft := newFuzzTarget(f)
	var d *frontend.Device
	var slot *frontend.Slot
	connect := func(t testing.TB) {
		var err error
		d, err = frontend.Dial(ft.sock, frontend.Options{NumQueues: 1, QueueSize: 64, Slots: 2, SlotDataSize: reqScratch,
			ScratchSize: 256 << 10, MemSize: 4 << 20, Timeout: 2 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		slot = d.Queue(0).Get()
	}
	connect(f)
	f.Cleanup(func() { d.Abort() })
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) > 2048 {
			return
		}
		done, _, _, _ := runReqInput(t, d, slot, ft.victim, in)
		if !done {
			// A broken queue needs a device reset; start over on a new connection.
			d.Abort()
			eventually(t, "the session to end", 2*time.Second, func() bool { return ft.victim.Sessions() == 0 })
			connect(t)
			return
		}
		// The queue still serves a correct request: write and read back.
		data := make([]byte, 1024)
		copy(data, in)
		lba := uint32(len(in)) % 2000
		if resp, err := d.Do(frontend.Command{CDB: rw10(0x2a, lba, 2), DataOut: data}); err != nil || resp.Response != 0 {
			t.Fatalf("WRITE after the fuzzed request: %v %+v", err, resp)
		}
		resp, err := d.Do(frontend.Command{CDB: rw10(0x28, lba, 2), DataInLen: len(data)})
		if err != nil || resp.Response != 0 {
			t.Fatalf("READ after the fuzzed request: %v %+v", err, resp)
		}
		if resp.Status == 0 && string(resp.DataIn) != string(data) {
			t.Fatal("read-back after the fuzzed request differs")
		}
		ft.goodTUR(t)
	})
}

func requestSeeds() map[string][]byte {
	type dsc = fuzzDesc
	hdr := func(cdb ...byte) []byte {
		h := make([]byte, frontend.ReqSize)
		l := frontend.LUNBytes(0, 0)
		copy(h, l[:])
		copy(h[19:], cdb)
		return h
	}
	build := encodeReqInput
	const w, nx, ind = byte(fWrite), byte(fNext), byte(fInd)
	tur := hdr(0, 0, 0, 0, 0, 0)
	read := hdr(0x28, 0, 0, 0, 0, 8, 0, 0, 2, 0)
	write := hdr(0x2a, 0, 0, 0, 0, 9, 0, 0, 1, 0)
	inq := hdr(0x12, 0, 0, 0, 96, 0)
	return map[string][]byte{
		"tur":      build(0, tur, nil, 0, []dsc{{0, frontend.ReqSize, nx, 1}, {512, frontend.RespSize, w, 0}}),
		"read":     build(0, read, nil, 0, []dsc{{0, frontend.ReqSize, nx, 1}, {512, frontend.RespSize, w | nx, 2}, {4096, 1024, w, 0}}),
		"write":    build(0, write, nil, 0, []dsc{{0, frontend.ReqSize, nx, 1}, {4096, 512, nx, 2}, {512, frontend.RespSize, w, 0}}),
		"inquiry":  build(0, inq, nil, 0, []dsc{{0, frontend.ReqSize, nx, 1}, {512, frontend.RespSize, w | nx, 2}, {1024, 96, w, 0}}),
		"indirect": build(0, read, []dsc{{0, frontend.ReqSize, nx, 1}, {512, frontend.RespSize, w | nx, 2}, {4096, 1024, w, 0}}, 8192, []dsc{{8192, 48, ind, 0}}),
		"split-header": build(0, read, nil, 0, []dsc{{0, 10, nx, 1}, {10, frontend.ReqSize - 10, nx, 2}, {512, 7, w | nx, 3},
			{519, frontend.RespSize - 7, w | nx, 4}, {4096, 1024, w, 0}}),
		"loop":        build(0, tur, nil, 0, []dsc{{0, frontend.ReqSize, nx, 1}, {512, frontend.RespSize, w | nx, 0}}),
		"outside-mem": build(0, tur, nil, 0, []dsc{{0, frontend.ReqSize, nx, 1}, {0xc001, frontend.RespSize, w, 0}}),
	}
}

// TestWriteFuzzSeeds writes the seed corpora in the go fuzz file format.
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("VHOST_WRITE_SEEDS") == "" {
		t.Skip("set VHOST_WRITE_SEEDS=1 to regenerate testdata/fuzz/FuzzMessages and FuzzRequest")
	}
	for name, seeds := range map[string]map[string][]byte{"FuzzMessages": messageSeeds(), "FuzzRequest": requestSeeds()} {
		dir := filepath.Join("testdata", "fuzz", name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for s, b := range seeds {
			if err := os.WriteFile(filepath.Join(dir, s), []byte(fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}

package frontend

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"vhost-target/vhost/proto"
)

// recorded is one message the fake backend received.
type recorded struct {
	req   proto.Request
	flags uint32
	index uint32 // vring index where the payload has one
	num   uint64 // second field / u64 value
	nfds  int
}

func (r recorded) String() string {
	switch r.req {
	case proto.SetVringNum, proto.SetVringBase, proto.GetVringBase, proto.SetVringEnable, proto.SetVringAddr,
		proto.SetVringKick, proto.SetVringCall, proto.SetVringErr:
		return fmt.Sprintf("%v %d", r.req, r.index)
	}
	return r.req.String()
}

type fakeRegion struct {
	proto.MemRegion
	mapping []byte
}

// fakeBackend is a vhost-user-scsi back-end for these tests: it records
// every message, answers GET_*, honours REPLY_ACK, maps the memory table
// through its own mmaps (UVA for rings, GPA for buffers) and runs a
// fakeRing per started vring with the fakeSCSI device.
type fakeBackend struct {
	t        *testing.T
	path     string
	ln       *net.UnixListener
	features uint64
	pf       uint64
	nackMem  bool        // refuse SET_MEM_TABLE
	baseSkew uint32      // added to GET_VRING_BASE answers
	blk      *fakeBlkDev // vhost-user-blk: rings run it instead of fakeSCSI
	config   []byte      // the config space GET_CONFIG reads and SET_CONFIG writes
	cfgSkew  int         // added to the size of GET_CONFIG answers

	mu      sync.Mutex
	msgs    []recorded
	memfds  []string // readlink of each received memory fd
	ackedPF uint64
	regions []fakeRegion
	rings   map[uint32]*backendRing
	num     map[uint32]uint16
	base    map[uint32]uint16
	addr    map[uint32]proto.VringAddr
	calls   map[uint32]int
	enabled map[uint32]bool
	getCfg  []proto.Config // GET_CONFIG headers received
	setCfg  []proto.Config // SET_CONFIG headers received
	backend *proto.Conn    // the back-end channel SET_BACKEND_REQ_FD gave
	errc    chan error
}

type backendRing struct {
	f       *fakeRing
	kick    int
	enabled atomic.Bool
	inject  chan []byte
	stop    chan struct{}
	done    chan struct{}
}

const fakeOffered = 1<<proto.FVersion1 | 1<<proto.FRingIndirectDesc | 1<<proto.FRingEventIdx |
	1<<proto.FProtocolFeatures | 1<<proto.FVirtioSCSIHotplug | 1<<proto.FVirtioSCSIChange | 1<<proto.FVirtioSCSIInOut
const fakePF = 1<<proto.PFMQ | 1<<proto.PFReplyAck | 1<<proto.PFResetDevice | 1<<proto.PFConfig

func newFakeBackend(t *testing.T) *fakeBackend {
	path := filepath.Join(t.TempDir(), "vhost.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	b := &fakeBackend{t: t, path: path, ln: ln, features: fakeOffered, pf: fakePF, errc: make(chan error, 1),
		rings: map[uint32]*backendRing{}, num: map[uint32]uint16{}, base: map[uint32]uint16{},
		addr: map[uint32]proto.VringAddr{}, calls: map[uint32]int{}, enabled: map[uint32]bool{}}
	t.Cleanup(func() { ln.Close() })
	return b
}

// serve accepts one connection in a goroutine; wait returns its error.
func (b *fakeBackend) serve() {
	go func() {
		c, err := b.ln.AcceptUnix()
		if err != nil {
			b.errc <- err
			return
		}
		err = b.loop(proto.NewConn(c))
		b.stopAll()
		b.unmap()
		if b.backend != nil {
			b.backend.Close()
		}
		c.Close()
		b.errc <- err
	}()
}

func (b *fakeBackend) wait() error {
	select {
	case err := <-b.errc:
		return err
	case <-time.After(10 * time.Second):
		return errors.New("fake backend did not finish")
	}
}

func (b *fakeBackend) record(m *proto.Msg) {
	r := recorded{req: m.Request, flags: m.Flags, nfds: len(m.FDs)}
	if len(m.Payload) >= 8 {
		r.index = uint32(m.Payload[0]) | uint32(m.Payload[1])<<8 | uint32(m.Payload[2])<<16 | uint32(m.Payload[3])<<24
		if s, err := proto.DecodeVringState(m); err == nil {
			r.index, r.num = s.Index, uint64(s.Num)
		} else if v, err := proto.U64(m); err == nil {
			r.index, r.num = uint32(v&proto.VringIndexMask), v
		}
	}
	b.mu.Lock()
	b.msgs = append(b.msgs, r)
	b.mu.Unlock()
}

func (b *fakeBackend) messages() []recorded {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]recorded(nil), b.msgs...)
}

func (b *fakeBackend) loop(c *proto.Conn) error {
	for {
		m, err := c.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		b.record(m)
		b.mu.Lock()
		reply, err := b.handle(c, m)
		b.mu.Unlock()
		if err != nil {
			m.CloseFDs()
			return fmt.Errorf("%v: %w", m.Request, err)
		}
		m.CloseFDs()
		if !reply && m.NeedReply() && b.ackedPF&(1<<proto.PFReplyAck) != 0 {
			ack := uint64(0)
			if m.Request == proto.SetMemTable && b.nackMem {
				ack = 1
			}
			if err := c.ReplyU64(m.Request, ack); err != nil {
				return err
			}
		}
	}
}

// handle acts on one message; it reports whether it sent a reply body.
func (b *fakeBackend) handle(c *proto.Conn, m *proto.Msg) (bool, error) {
	switch m.Request {
	case proto.GetFeatures:
		return true, c.ReplyU64(m.Request, b.features)
	case proto.GetProtocolFeatures:
		return true, c.ReplyU64(m.Request, b.pf)
	case proto.SetProtocolFeatures:
		v, err := proto.U64(m)
		b.ackedPF = v
		return false, err
	case proto.GetQueueNum:
		return true, c.ReplyU64(m.Request, 4)
	case proto.SetMemTable:
		regs, err := proto.DecodeMemTable(m)
		if err != nil {
			return false, err
		}
		b.stopAll()
		b.unmap()
		for i, r := range regs {
			link, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", m.FDs[i]))
			b.memfds = append(b.memfds, link)
			mp, err := unix.Mmap(m.FDs[i], 0, int(r.MmapOffset+r.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
			if err != nil {
				return false, err
			}
			b.regions = append(b.regions, fakeRegion{r, mp})
		}
	case proto.SetVringNum, proto.SetVringBase, proto.SetVringEnable:
		s, err := proto.DecodeVringState(m)
		if err != nil {
			return false, err
		}
		switch m.Request {
		case proto.SetVringNum:
			b.num[s.Index] = uint16(s.Num)
		case proto.SetVringBase:
			b.base[s.Index] = uint16(s.Num)
		default:
			// Any non-zero num enables (DPDK, libvhost-user; SPDK sends the queue size).
			b.enabled[s.Index] = s.Num != 0
			if r := b.rings[s.Index]; r != nil {
				r.enabled.Store(s.Num != 0)
			}
		}
	case proto.SetVringAddr:
		a, err := proto.DecodeVringAddr(m)
		b.addr[a.Index] = a
		return false, err
	case proto.SetVringCall:
		v, err := proto.U64(m)
		if err != nil || len(m.FDs) != 1 {
			return false, fmt.Errorf("call: %v with %d fds", err, len(m.FDs))
		}
		i := uint32(v & proto.VringIndexMask)
		b.calls[i] = m.FDs[0]
		m.FDs[0] = -1 // kept: a ring goroutine may still be writing the old one
		if r := b.rings[i]; r != nil {
			r.f.call.Store(int32(b.calls[i]))
		}
	case proto.SetVringErr:
	case proto.SetVringKick:
		v, err := proto.U64(m)
		if err != nil || len(m.FDs) != 1 {
			return false, fmt.Errorf("kick: %v with %d fds", err, len(m.FDs))
		}
		i := uint32(v & proto.VringIndexMask)
		kick := m.FDs[0]
		m.FDs[0] = -1
		return false, b.startRing(i, kick)
	case proto.GetVringBase:
		s, err := proto.DecodeVringState(m)
		if err != nil {
			return false, err
		}
		last := b.base[s.Index]
		if r := b.rings[s.Index]; r != nil {
			b.stopRing(s.Index)
			last = r.f.lastAvail
		}
		return true, c.Reply(m.Request, proto.VringState{Index: s.Index, Num: uint32(last) + b.baseSkew}.Encode())
	case proto.ResetDevice:
		b.stopAll()
	case proto.GetConfig:
		cfg, _, err := proto.DecodeConfig(m)
		if err != nil {
			return false, err
		}
		b.getCfg = append(b.getCfg, cfg)
		p := make([]byte, max(proto.ConfigHeaderSize+int(cfg.Size)+b.cfgSkew, 0))
		copy(p, m.Payload[:proto.ConfigHeaderSize])
		if int(cfg.Offset) < len(b.config) {
			copy(p[proto.ConfigHeaderSize:], b.config[cfg.Offset:])
		}
		return true, c.Reply(m.Request, p)
	case proto.SetConfig:
		cfg, data, err := proto.DecodeConfig(m)
		if err != nil {
			return false, err
		}
		b.setCfg = append(b.setCfg, cfg)
		if int(cfg.Offset)+len(data) <= len(b.config) {
			copy(b.config[cfg.Offset:], data)
		}
	case proto.SetBackendReqFD:
		if len(m.FDs) != 1 {
			return false, fmt.Errorf("%d fds", len(m.FDs))
		}
		f := os.NewFile(uintptr(m.FDs[0]), "backend")
		m.FDs[0] = -1
		fc, err := net.FileConn(f)
		f.Close()
		if err != nil {
			return false, err
		}
		b.backend = proto.NewConn(fc.(*net.UnixConn))
	case proto.SetOwner, proto.SetFeatures:
	default:
		return false, fmt.Errorf("unexpected message")
	}
	return false, nil
}

func (b *fakeBackend) find(addr uint64, uva bool) (*fakeRegion, uint64) {
	for i := range b.regions {
		r := &b.regions[i]
		start := r.GPA
		if uva {
			start = r.UVA
		}
		if addr >= start && addr-start < r.Size {
			return r, addr - start
		}
	}
	return nil, 0
}

func (b *fakeBackend) view(addr uint64, n int, uva bool) []byte {
	r, off := b.find(addr, uva)
	if r == nil || uint64(n) > r.Size-off {
		return nil
	}
	base := r.MmapOffset + off
	return r.mapping[base : base+uint64(n)]
}

func (b *fakeBackend) startRing(i uint32, kick int) error {
	a, n := b.addr[i], b.num[i]
	desc := b.view(a.Desc, int(descTableSize(n)), true)
	avail := b.view(a.Avail, int(availRingSize(n)), true)
	used := b.view(a.Used, int(usedRingSize(n)), true)
	if desc == nil || avail == nil || used == nil || n == 0 {
		unix.Close(kick)
		return fmt.Errorf("vring %d: addresses %+v (num %d) not in the memory table", i, a, n)
	}
	f := &fakeRing{vring: int(i), size: n, desc: desc, avail: avail, used: used, handle: fakeSCSI,
		lastAvail: b.base[i], usedIdx: b.base[i]}
	if b.blk != nil {
		f.blk, f.handle = true, b.blk.handle
	}
	f.mem = func(gpa uint64, n int) []byte { return b.view(gpa, n, false) }
	f.next = func(gpa uint64) uint64 {
		if r, _ := b.find(gpa, false); r != nil {
			return r.GPA + r.Size
		}
		return gpa + 1
	}
	f.eventIdx = true // every test here negotiates EVENT_IDX unless it says otherwise
	if fd, ok := b.calls[i]; ok {
		f.call.Store(int32(fd))
	}
	r := &backendRing{f: f, kick: kick, inject: make(chan []byte, 16), stop: make(chan struct{}), done: make(chan struct{})}
	r.enabled.Store(b.enabled[i] || b.ackedPF == 0)
	b.rings[i] = r
	go r.run()
	return nil
}

func (r *backendRing) run() {
	defer close(r.done)
	fds := []unix.PollFd{{Fd: int32(r.kick), Events: unix.POLLIN}}
	var buf [8]byte
	for {
		select {
		case <-r.stop:
			return
		case ev := <-r.inject:
			r.f.events = append(r.f.events, ev)
		default:
		}
		unix.Poll(fds, 2)
		unix.Read(r.kick, buf[:])
		if r.enabled.Load() {
			r.f.process()
		}
		runtime.Gosched()
	}
}

// ring waits for vring i to be started (messages without replies are
// asynchronous, so Dial may return before the backend has seen the kick).
func (b *fakeBackend) ring(i uint32) *backendRing {
	for k := 0; k < 5000; k++ {
		b.mu.Lock()
		r := b.rings[i]
		b.mu.Unlock()
		if r != nil {
			return r
		}
		time.Sleep(time.Millisecond)
	}
	b.t.Fatalf("vring %d never started", i)
	return nil
}

func (b *fakeBackend) stopRing(i uint32) {
	if r := b.rings[i]; r != nil {
		close(r.stop)
		<-r.done
		unix.Close(r.kick)
		delete(b.rings, i)
	}
}

func (b *fakeBackend) stopAll() {
	for i := range b.rings {
		b.stopRing(i)
	}
}

func (b *fakeBackend) unmap() {
	for _, r := range b.regions {
		unix.Munmap(r.mapping)
	}
	b.regions = nil
}

// names renders the recorded sequence compactly.
func names(msgs []recorded) string {
	s := make([]string, len(msgs))
	for i, m := range msgs {
		s[i] = m.String()
	}
	return strings.Join(s, ", ")
}

func TestDialSequence(t *testing.T) {
	b := newFakeBackend(t)
	b.serve()
	d, err := Dial(b.path, Options{NumQueues: 2, QueueSize: 64, Regions: 2})
	if err != nil {
		t.Fatal(err)
	}
	if d.Features() != fakeOffered&^(1<<proto.FVirtioSCSIInOut) {
		t.Errorf("features %#x", d.Features())
	}
	if d.ProtocolFeatures() != fakePF&^(1<<proto.PFConfig) || d.QueueNum() != 4 {
		t.Errorf("protocol features %#x queue num %d", d.ProtocolFeatures(), d.QueueNum())
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.wait(); err != nil {
		t.Fatal(err)
	}
	want := "GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER, " +
		"SET_VRING_CALL 0, SET_VRING_ERR 0, SET_VRING_CALL 1, SET_VRING_ERR 1, SET_VRING_CALL 2, SET_VRING_ERR 2, " +
		"SET_VRING_CALL 3, SET_VRING_ERR 3, SET_FEATURES, SET_MEM_TABLE, " +
		"SET_VRING_NUM 0, SET_VRING_BASE 0, SET_VRING_ADDR 0, SET_VRING_KICK 0, " +
		"SET_VRING_NUM 1, SET_VRING_BASE 1, SET_VRING_ADDR 1, SET_VRING_KICK 1, " +
		"SET_VRING_NUM 2, SET_VRING_BASE 2, SET_VRING_ADDR 2, SET_VRING_KICK 2, " +
		"SET_VRING_NUM 3, SET_VRING_BASE 3, SET_VRING_ADDR 3, SET_VRING_KICK 3, " +
		"SET_VRING_ENABLE 0, SET_VRING_ENABLE 1, SET_VRING_ENABLE 2, SET_VRING_ENABLE 3, " +
		"SET_VRING_CALL 0, SET_VRING_CALL 1, SET_VRING_CALL 2, SET_VRING_CALL 3, " +
		"SET_VRING_ENABLE 0, SET_VRING_ENABLE 1, SET_VRING_ENABLE 2, SET_VRING_ENABLE 3, " +
		"GET_VRING_BASE 0, GET_VRING_BASE 1, GET_VRING_BASE 2, GET_VRING_BASE 3"
	msgs := b.messages()
	if got := names(msgs); got != want {
		t.Errorf("sequence:\n got %s\nwant %s", got, want)
	}
	for _, m := range msgs {
		switch m.req {
		case proto.SetMemTable:
			if m.flags != proto.FlagVersion|proto.FlagNeedReply || m.nfds != 2 {
				t.Errorf("SET_MEM_TABLE flags %#x fds %d", m.flags, m.nfds)
			}
		case proto.SetVringCall, proto.SetVringErr, proto.SetVringKick:
			if m.nfds != 1 || m.num&proto.VringNoFDBit != 0 {
				t.Errorf("%v: %d fds, value %#x", m, m.nfds, m.num)
			}
		case proto.SetVringEnable:
			if m.num > 1 {
				t.Errorf("%v num %d", m, m.num)
			}
		case proto.SetVringNum:
			if m.num != 64 {
				t.Errorf("%v num %d", m, m.num)
			}
		default:
			if m.flags != proto.FlagVersion || m.nfds != 0 && m.req != proto.SetMemTable {
				t.Errorf("%v: flags %#x fds %d", m, m.flags, m.nfds)
			}
		}
	}
	for _, l := range b.memfds {
		if !strings.HasPrefix(l, "/memfd:vhost-frontend-ram") {
			t.Errorf("memory fd is %q, not a memfd", l)
		}
	}
	if len(b.memfds) != 2 {
		t.Errorf("%d memory fds", len(b.memfds))
	}
}

func TestDialVariants(t *testing.T) {
	t.Run("no_protocol_features", func(t *testing.T) {
		b := newFakeBackend(t)
		b.serve()
		d, err := Dial(b.path, Options{NoProtocolFeatures: true, NoEventIdx: true, NoIndirect: true})
		if err != nil {
			t.Fatal(err)
		}
		if d.Features() != 1<<proto.FVersion1|1<<proto.FVirtioSCSIHotplug|1<<proto.FVirtioSCSIChange || d.ProtocolFeatures() != 0 {
			t.Errorf("features %#x pf %#x", d.Features(), d.ProtocolFeatures())
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		b.wait()
		got := names(b.messages())
		if strings.Contains(got, "PROTOCOL") || strings.Contains(got, "ENABLE") || strings.Contains(got, "QUEUE_NUM") {
			t.Errorf("sequence without PROTOCOL_FEATURES: %s", got)
		}
		for _, m := range b.messages() {
			if m.flags&proto.FlagNeedReply != 0 {
				t.Errorf("%v asked for an ack without REPLY_ACK", m)
			}
		}
	})
	t.Run("seabios_like", func(t *testing.T) {
		b := newFakeBackend(t)
		b.serve()
		d, err := Dial(b.path, Options{SkipControlQueues: true,
			AckFeatures: func(uint64) uint64 { return 1<<proto.FVersion1 | 1<<proto.FProtocolFeatures | 1<<proto.FRingReset }})
		if err != nil {
			t.Fatal(err)
		}
		if d.Features()&(1<<proto.FRingReset) == 0 {
			t.Errorf("unoffered bit not sent")
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		b.wait()
		got := names(b.messages())
		if strings.Contains(got, "SET_VRING_KICK 0") || strings.Contains(got, "GET_VRING_BASE 1") ||
			!strings.Contains(got, "SET_VRING_ENABLE 0") || !strings.Contains(got, "GET_VRING_BASE 2") {
			t.Errorf("sequence: %s", got)
		}
	})
	t.Run("need_reply_all", func(t *testing.T) {
		b := newFakeBackend(t)
		b.serve()
		d, err := Dial(b.path, Options{NeedReplyAll: true})
		if err != nil {
			t.Fatal(err)
		}
		d.Close()
		b.wait()
		for _, m := range b.messages() {
			want := m.req != proto.GetFeatures && m.req != proto.GetProtocolFeatures && m.req != proto.GetQueueNum &&
				m.req != proto.GetVringBase && m.req != proto.SetProtocolFeatures
			if (m.flags&proto.FlagNeedReply != 0) != want {
				t.Errorf("%v flags %#x", m, m.flags)
			}
		}
	})
	t.Run("mem_table_nack", func(t *testing.T) {
		b := newFakeBackend(t)
		b.nackMem = true
		b.serve()
		if _, err := Dial(b.path, Options{}); err == nil || !strings.Contains(err.Error(), "SET_MEM_TABLE") {
			t.Fatalf("Dial with a refused memory table: %v", err)
		}
		b.wait()
	})
	t.Run("wrong_vring_base", func(t *testing.T) {
		b := newFakeBackend(t)
		b.baseSkew = 1
		b.serve()
		d, err := Dial(b.path, Options{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := d.Do(Command{CDB: []byte{0}}); err != nil {
			t.Fatal(err)
		}
		if err := d.Close(); err == nil || !strings.Contains(err.Error(), "GET_VRING_BASE says 2, front-end made 1") {
			t.Fatalf("Close with a wrong base: %v", err)
		}
		b.wait()
	})
}

func TestDoThroughSocket(t *testing.T) {
	b := newFakeBackend(t)
	b.serve()
	d, err := Dial(b.path, Options{NumQueues: 2, Regions: 2, MmapOffset: 4096 + 512})
	if err != nil {
		t.Fatal(err)
	}
	for qi := 0; qi < 2; qi++ {
		r, err := d.Do(Command{Queue: qi, Target: 3, LUN: 1, CDB: []byte{0x28, 2, 0, 0x44, 8}, DataInLen: 4096, Segments: 3})
		if err != nil {
			t.Fatal(err)
		}
		if r.Status != 2 || r.Response != 0 || r.Resid != 8 || r.UsedLen != RespSize+4088 || r.DataIn[5] != 5^0x44 {
			t.Errorf("queue %d: %+v", qi, r)
		}
	}
	if resp, err := d.TMF(1, 0, TMFLogicalUnitReset, 0); err != nil || resp != 0x80|TMFLogicalUnitReset {
		t.Errorf("TMF: %#x %v", resp, err)
	}
	// Async path on the same connection, busy-polling with interrupts off.
	q := d.Queue(1)
	q.SetInterrupts(false)
	done := 0
	deadline := time.Now().Add(5 * time.Second)
	for sent := 0; done < 500; {
		for q.Free() > 0 && sent < 500 {
			s := q.Get()
			q.Prepare(s, 0, 0, []byte{0x28, 0, 0, 1}, DirIn, 512)
			q.Submit(s)
			sent++
		}
		q.Kick()
		q.Reap(func(s *Slot) {
			if s.Response() != 0 || s.Data[3] != 3^1 {
				t.Errorf("slot %d: response %d", s.ID, s.Response())
			}
			done++
			q.Put(s)
		})
		if time.Now().After(deadline) {
			t.Fatalf("async: %d of 500 done", done)
		}
	}
	if err := d.Reset(); err != nil {
		t.Fatal(err)
	}
	if q.AvailIdx() != 0 || q.Free() != q.Slots() {
		t.Errorf("after reset: avail %d free %d", q.AvailIdx(), q.Free())
	}
	if r, err := d.Do(Command{Queue: 1, CDB: []byte{0, 9}}); err != nil || r.Status != 9 {
		t.Fatalf("Do after reset: %v %+v", err, r)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.wait(); err != nil {
		t.Fatal(err)
	}
	got := names(b.messages())
	if !strings.Contains(got, "GET_VRING_BASE 3, RESET_DEVICE, SET_FEATURES, SET_MEM_TABLE, SET_VRING_NUM 0") {
		t.Errorf("reset sequence: %s", got)
	}
}

func TestEventsThroughSocket(t *testing.T) {
	b := newFakeBackend(t)
	b.serve()
	d, err := Dial(b.path, Options{EventBuffers: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if evs := d.Events(); len(evs) != 0 {
		t.Fatalf("events before any: %v", evs)
	}
	r := b.ring(EventVring)
	// Six events through four buffers: the front-end must repost them.
	for k := 0; k < 6; k++ {
		ev := []byte{1, 0, 0, 0, 1, byte(k), 0x40, 2, 0, 0, 0, 0, 1, 0, 0, 0} // TRANSPORT_RESET RESCAN k:2
		if k == 5 {
			ev[3] = 0x80 // EVENTS_MISSED
		}
		r.inject <- ev
	}
	deadline := time.Now().Add(5 * time.Second)
	var evs []Event
	for len(evs) < 6 && time.Now().Before(deadline) {
		evs = append(evs, d.Events()...)
		time.Sleep(time.Millisecond)
	}
	if len(evs) != 6 {
		t.Fatalf("%d events, want 6: %+v", len(evs), evs)
	}
	for k, e := range evs {
		want := Event{Event: 1, LUN: [8]byte{1, byte(k), 0x40, 2}, Target: uint8(k), Lun: 2, Reason: 1, UsedLen: EventSize}
		if k == 5 {
			want.Event |= EventsMissed
		}
		if e != want {
			t.Errorf("event %d: %+v, want %+v", k, e, want)
		}
	}
}

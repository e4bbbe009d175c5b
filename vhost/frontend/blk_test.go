package frontend

import (
	"bytes"
	"encoding/binary"
	"strings"
	"sync"
	"testing"
	"time"

	"vhost-target/vhost/proto"
)

// fakeBlkDev is the virtio-blk device behind the fake rings of a blk
// back-end: a RAM disk of 512-byte sectors serving IN, OUT, FLUSH and
// GET_ID; other types are UNSUPP, a request beyond the disk IOERR. The
// status is the last byte of the last non-empty writable buffer; a chain
// without one (or with a header under 16 bytes) is completed with length 0.
type fakeBlkDev struct {
	mu      sync.Mutex
	disk    []byte
	flushes int
}

// bytes copies disk bytes [off, off+n) and flushes counts FLUSHes, under
// the lock (the rings' happens-before is guest memory the race detector
// does not see).
func (f *fakeBlkDev) bytes(off, n int) []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]byte(nil), f.disk[off:off+n]...)
}

func (f *fakeBlkDev) flushCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.flushes
}

func (f *fakeBlkDev) zero(off, n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	clear(f.disk[off : off+n])
}

const fakeBlkID = "fake-blk-serial-0123456789" // longer than 20: GET_ID truncates

func (f *fakeBlkDev) handle(_ int, rd, wr [][]byte) uint32 {
	in := flatten(rd)
	var status []byte
	total := 0
	for _, b := range wr {
		if len(b) > 0 {
			status = b[len(b)-1:]
		}
		total += len(b)
	}
	if status == nil || len(in) < BlkHeaderSize {
		return 0
	}
	typ := binary.LittleEndian.Uint32(in)
	off := binary.LittleEndian.Uint64(in[8:]) * BlkSectorSize
	f.mu.Lock()
	defer f.mu.Unlock()
	data := total - 1
	st, written := byte(BlkSOK), 0
	switch typ {
	case BlkTIn:
		if off+uint64(data) > uint64(len(f.disk)) {
			st = BlkSIOErr
			break
		}
		written = scatter(wr, 0, f.disk[off:off+uint64(data)])
	case BlkTOut:
		out := in[BlkHeaderSize:]
		if off+uint64(len(out)) > uint64(len(f.disk)) {
			st = BlkSIOErr
			break
		}
		copy(f.disk[off:], out)
	case BlkTFlush:
		f.flushes++
	case BlkTGetID:
		id := make([]byte, min(data, BlkIDBytes))
		copy(id, fakeBlkID)
		written = scatter(wr, 0, id)
	default:
		st = BlkSUnsupp
	}
	status[0] = st
	return uint32(written + 1)
}

const fakeBlkOffered = 1<<proto.FVersion1 | 1<<proto.FRingIndirectDesc | 1<<proto.FRingEventIdx | 1<<proto.FProtocolFeatures |
	1<<BlkFSegMax | 1<<BlkFBlkSize | 1<<BlkFTopology | 1<<BlkFFlush | 1<<BlkFConfigWCE | 1<<BlkFMQ |
	1<<BlkFDiscard | 1<<BlkFWriteZeroes
const fakeBlkPF = 1<<proto.PFMQ | 1<<proto.PFReplyAck | 1<<proto.PFResetDevice | 1<<proto.PFConfig | 1<<proto.PFBackendReq

var fakeBlkConfig = BlkConfig{Capacity: 2048, SegMax: 126, BlkSize: 512, MinIOSize: 1, OptIOSize: 8, Writeback: 1,
	NumQueues: 4, MaxDiscardSectors: 1 << 22, MaxDiscardSeg: 1, DiscardSectorAlignment: 1,
	MaxWriteZeroesSectors: 1 << 22, MaxWriteZeroesSeg: 1, WriteZeroesMayUnmap: 1}

func newFakeBlkBackend(t *testing.T) *fakeBackend {
	b := newFakeBackend(t)
	b.blk = &fakeBlkDev{disk: make([]byte, 1<<20)}
	b.features, b.pf = fakeBlkOffered, fakeBlkPF
	b.config = fakeBlkConfig.Encode()
	return b
}

func TestBlkConfigLayout(t *testing.T) {
	c := BlkConfig{Capacity: 0x0102030405060708, SizeMax: 9, SegMax: 10, Cylinders: 11, Heads: 12, Sectors: 13,
		BlkSize: 4096, PhysicalBlockExp: 3, AlignmentOffset: 1, MinIOSize: 2, OptIOSize: 64, Writeback: 1,
		NumQueues: 7, MaxDiscardSectors: 14, MaxDiscardSeg: 15, DiscardSectorAlignment: 16,
		MaxWriteZeroesSectors: 17, MaxWriteZeroesSeg: 18, WriteZeroesMayUnmap: 1}
	b := c.Encode()
	// struct virtio_blk_config's offsets, spelled out once more.
	le := binary.LittleEndian
	if len(b) != 60 || le.Uint64(b[0:]) != c.Capacity || le.Uint32(b[12:]) != 10 || le.Uint16(b[16:]) != 11 || b[18] != 12 ||
		b[19] != 13 || le.Uint32(b[20:]) != 4096 || b[24] != 3 || le.Uint16(b[26:]) != 2 || le.Uint32(b[28:]) != 64 ||
		b[32] != 1 || le.Uint16(b[34:]) != 7 || le.Uint32(b[36:]) != 14 || le.Uint32(b[44:]) != 16 ||
		le.Uint32(b[52:]) != 18 || b[56] != 1 {
		t.Errorf("encoded % x", b)
	}
	c.Len = 60
	if got := DecodeBlkConfig(b); got != c {
		t.Errorf("round trip:\n got %+v\nwant %+v", got, c)
	}
	short := DecodeBlkConfig(b[:36])
	if short.Len != 36 || short.NumQueues != 7 || short.MaxDiscardSectors != 0 || short.WriteZeroesMayUnmap != 0 {
		t.Errorf("36 bytes decoded as %+v", short)
	}
	if s := EncodeBlkSegments(BlkSegment{Sector: 5, NumSectors: 6, Flags: BlkWriteZeroesUnmap}); len(s) != 16 ||
		le.Uint64(s) != 5 || le.Uint32(s[8:]) != 6 || le.Uint32(s[12:]) != 1 {
		t.Errorf("segment % x", s)
	}
}

func TestDialBlkSequence(t *testing.T) {
	b := newFakeBlkBackend(t)
	b.serve()
	d, err := Dial(b.path, Options{Blk: true, NumQueues: 2, QueueSize: 64, BackendReq: true})
	if err != nil {
		t.Fatal(err)
	}
	wantF := uint64(fakeBlkOffered)
	if d.Features() != wantF {
		t.Errorf("features %#x, want %#x", d.Features(), wantF)
	}
	if d.ProtocolFeatures() != fakeBlkPF {
		t.Errorf("protocol features %#x", d.ProtocolFeatures())
	}
	if d.NumVrings() != 2 || d.Queue(1).Index() != 1 || d.Queue(0) != d.Vring(0) {
		t.Errorf("%d vrings, queue 1 is vring %d", d.NumVrings(), d.Queue(1).Index())
	}
	want := fakeBlkConfig
	want.Len = BlkConfigLenQEMU
	want.Capacity = 2048
	if got := d.BlkConfig(); got != want {
		t.Errorf("config at connect:\n got %+v\nwant %+v", got, want)
	}
	if len(d.ConfigSpace()) != BlkConfigLenQEMU {
		t.Errorf("config space of %d bytes", len(d.ConfigSpace()))
	}
	if !d.HasBackendChannel() {
		t.Error("no back-end channel")
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.wait(); err != nil {
		t.Fatal(err)
	}
	seq := "GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_BACKEND_REQ_FD, SET_OWNER, " +
		"SET_VRING_CALL 0, SET_VRING_ERR 0, SET_VRING_CALL 1, SET_VRING_ERR 1, GET_CONFIG, SET_FEATURES, SET_MEM_TABLE, " +
		"SET_VRING_NUM 0, SET_VRING_BASE 0, SET_VRING_ADDR 0, SET_VRING_KICK 0, " +
		"SET_VRING_NUM 1, SET_VRING_BASE 1, SET_VRING_ADDR 1, SET_VRING_KICK 1, " +
		"SET_VRING_ENABLE 0, SET_VRING_ENABLE 1, SET_VRING_CALL 0, SET_VRING_CALL 1, " +
		"SET_VRING_ENABLE 0, SET_VRING_ENABLE 1, GET_VRING_BASE 0, GET_VRING_BASE 1"
	msgs := b.messages()
	if got := names(msgs); got != seq {
		t.Errorf("sequence:\n got %s\nwant %s", got, seq)
	}
	for _, m := range msgs {
		switch m.req {
		case proto.SetBackendReqFD:
			if m.flags != proto.FlagVersion|proto.FlagNeedReply || m.nfds != 1 {
				t.Errorf("SET_BACKEND_REQ_FD flags %#x, %d fds", m.flags, m.nfds)
			}
		case proto.GetConfig:
			if m.flags != proto.FlagVersion {
				t.Errorf("GET_CONFIG flags %#x", m.flags)
			}
		}
	}
	if len(b.getCfg) != 1 || b.getCfg[0] != (proto.Config{Offset: 0, Size: BlkConfigLenQEMU}) {
		t.Errorf("GET_CONFIG headers %+v", b.getCfg)
	}

	// One queue: MQ is not acked (QEMU offers it to the guest only with
	// num-queues > 1); without BackendReq, no channel.
	b = newFakeBlkBackend(t)
	b.serve()
	d, err = Dial(b.path, Options{Blk: true})
	if err != nil {
		t.Fatal(err)
	}
	if d.Features() != wantF&^(1<<BlkFMQ) || d.ProtocolFeatures() != fakeBlkPF&^(1<<proto.PFBackendReq) || d.HasBackendChannel() {
		t.Errorf("one queue: features %#x, protocol features %#x", d.Features(), d.ProtocolFeatures())
	}
	d.Close()
	if err := b.wait(); err != nil {
		t.Fatal(err)
	}
}

func TestDialBlkRefusals(t *testing.T) {
	t.Run("no_config", func(t *testing.T) {
		b := newFakeBlkBackend(t)
		b.pf &^= 1 << proto.PFConfig
		b.serve()
		if _, err := Dial(b.path, Options{Blk: true}); err == nil || !strings.Contains(err.Error(), "PROTOCOL_F_CONFIG") {
			t.Errorf("Dial without CONFIG: %v", err)
		}
		b.wait()
		b = newFakeBlkBackend(t)
		b.pf &^= 1 << proto.PFConfig
		b.serve()
		d, err := Dial(b.path, Options{Blk: true, NoGetConfig: true})
		if err != nil {
			t.Fatal(err)
		}
		if d.ConfigSpace() != nil {
			t.Error("config read")
		}
		d.Close()
		b.wait()
	})
	t.Run("config_size", func(t *testing.T) {
		b := newFakeBlkBackend(t)
		b.cfgSkew = 3
		b.serve()
		if _, err := Dial(b.path, Options{Blk: true}); err == nil || !strings.Contains(err.Error(), "GET_CONFIG of 57 bytes") {
			t.Errorf("Dial with a 60-byte answer to a 57-byte GET_CONFIG: %v", err)
		}
		b.wait()
	})
	t.Run("options", func(t *testing.T) {
		if _, err := NewUnstarted("/nonexistent", Options{Blk: true, Peer: PeerSPDK}); err == nil {
			t.Error("PeerSPDK with Blk accepted")
		}
		if _, err := NewUnstarted("/nonexistent", Options{Blk: true, ConfigLen: 300}); err == nil {
			t.Error("ConfigLen 300 accepted")
		}
	})
	t.Run("scsi_only_calls", func(t *testing.T) {
		d := detached(t, Options{Blk: true, NumQueues: 2}, true, true)
		if _, _, err := d.Control([]byte{0}, 1); err == nil {
			t.Error("Control on a blk device")
		}
		if err := d.PostEvents(); err == nil {
			t.Error("PostEvents on a blk device")
		}
		if d.Events() != nil {
			t.Error("events")
		}
	})
}

func TestDoBlkThroughSocket(t *testing.T) {
	b := newFakeBlkBackend(t)
	b.serve()
	d, err := Dial(b.path, Options{Blk: true, NumQueues: 2, Regions: 2})
	if err != nil {
		t.Fatal(err)
	}
	pattern := func(n int, seed byte) []byte {
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(i*7) ^ seed
		}
		return p
	}
	do := func(c BlkCommand) *BlkResponse {
		t.Helper()
		r, err := d.DoBlk(c)
		if err != nil {
			t.Fatalf("%+v: %v", c, err)
		}
		return r
	}
	for qi := 0; qi < 2; qi++ {
		data := pattern(8192, byte(qi))
		if r := do(BlkCommand{Type: BlkTOut, Sector: 8, DataOut: data, Queue: qi, Segments: 3}); r.Status != BlkSOK || r.UsedLen != 1 {
			t.Errorf("OUT: %+v", r)
		}
		if !bytes.Equal(b.blk.bytes(8*512, 8192), data) {
			t.Error("OUT did not reach the disk")
		}
		if r := do(BlkCommand{Type: BlkTIn, Sector: 8, DataInLen: 8192, Queue: qi, Direct: qi == 1}); r.Status != BlkSOK ||
			r.UsedLen != 8193 || !bytes.Equal(r.DataIn, data) {
			t.Errorf("IN: status %d used %d", r.Status, r.UsedLen)
		}
	}
	if r := do(BlkCommand{Type: BlkTFlush}); r.Status != BlkSOK || r.UsedLen != 1 || b.blk.flushCount() != 1 {
		t.Errorf("FLUSH: %+v, %d flushes", r, b.blk.flushCount())
	}
	if r := do(BlkCommand{Type: BlkTGetID, DataInLen: BlkIDBytes}); r.Status != BlkSOK || string(r.DataIn) != fakeBlkID[:20] {
		t.Errorf("GET_ID: %+v %q", r, r.DataIn)
	}
	if r := do(BlkCommand{Type: 99}); r.Status != BlkSUnsupp {
		t.Errorf("type 99: %+v", r)
	}
	if r := do(BlkCommand{Type: BlkTIn, Sector: 2048, DataInLen: 512}); r.Status != BlkSIOErr {
		t.Errorf("IN beyond the disk: %+v", r)
	}

	// Other layouts of the same requests.
	data := pattern(4096, 0x5a)
	for name, c := range map[string]BlkCommand{
		"header_split":   {HeaderSplit: 4},
		"header_in_data": {HeaderInData: true, Segments: 2},
		"status_in_data": {StatusInData: true},
		"status_len_4":   {StatusLen: 4},
		"long_header":    {HeaderLen: 32},
	} {
		out, in := c, c
		out.Type, out.Sector, out.DataOut = BlkTOut, 100, data
		in.Type, in.Sector, in.DataInLen = BlkTIn, 100, len(data)
		expect := data
		if c.HeaderLen == 32 {
			// Bytes past the 16-byte header are data (zeroes here).
			out.DataOut = data[:4096-16]
			expect = append(make([]byte, 16), data[:4096-16]...)
		}
		b.blk.zero(100*512, 4096)
		if r := do(out); r.Status != BlkSOK {
			t.Errorf("%s: OUT %+v", name, r)
		}
		r := do(in)
		// The fake fills every writable byte but the status.
		wantLen := uint32(in.DataInLen + max(c.StatusLen, 1))
		if r.Status != BlkSOK || r.UsedLen != wantLen || !bytes.Equal(r.DataIn, expect) {
			t.Errorf("%s: IN status %d used %d (want %d), data equal %v", name, r.Status, r.UsedLen, wantLen,
				bytes.Equal(r.DataIn, expect))
		}
	}
	// Malformed: no status byte (the fake completes it with length 0 and
	// writes nothing), a short header.
	if r := do(BlkCommand{Type: BlkTIn, DataInLen: 512, NoStatus: true}); r.Status != 0xff {
		t.Errorf("no status: %+v", r)
	}
	if r := do(BlkCommand{Type: BlkTFlush, HeaderLen: 8}); r.Status != 0xff || r.UsedLen != 0 {
		t.Errorf("8-byte header: status %#x used %d", r.Status, r.UsedLen)
	}
	// Rewrite: the status descriptor first, as no driver may.
	r := do(BlkCommand{Type: BlkTFlush, Direct: true, Rewrite: func(ds []Desc) []Desc {
		if len(ds) != 2 || ds[1].Flags != DescFWrite || ds[1].Len != 1 || ds[0].Len != 16 {
			t.Errorf("chain %+v", ds)
		}
		return []Desc{ds[1], ds[0]}
	}})
	if r.UsedLen != 0 {
		t.Errorf("readable after writable: %+v", r)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.wait(); err != nil {
		t.Fatal(err)
	}
}

func TestBlkConfigMessages(t *testing.T) {
	b := newFakeBlkBackend(t)
	b.serve()
	d, err := Dial(b.path, Options{Blk: true, BackendReq: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.SetWriteback(false); err != nil {
		t.Fatal(err)
	}
	if d.BlkConfig().Writeback != 0 {
		t.Error("writeback kept at 1")
	}
	if c, err := d.ReadBlkConfig(); err != nil || c.Writeback != 0 {
		t.Errorf("config after SET_CONFIG: %+v %v", c, err)
	}
	if raw, err := d.GetConfig(BlkCfgNumQueues, 2); err != nil || binary.LittleEndian.Uint16(raw) != 4 {
		t.Errorf("GET_CONFIG num_queues: % x %v", raw, err)
	}
	b.mu.Lock()
	set := append([]proto.Config(nil), b.setCfg...)
	conn := b.backend
	binary.LittleEndian.PutUint64(b.config, 4096) // a resize
	b.mu.Unlock()
	if len(set) != 1 || set[0] != (proto.Config{Offset: 32, Size: 1, Flags: 0}) {
		t.Errorf("SET_CONFIG headers %+v", set)
	}
	var setMsg recorded
	for _, m := range b.messages() {
		if m.req == proto.SetConfig {
			setMsg = m
		}
	}
	if setMsg.flags != proto.FlagVersion|proto.FlagNeedReply {
		t.Errorf("SET_CONFIG flags %#x", setMsg.flags)
	}

	// CONFIG_CHANGE_MSG with NEED_REPLY: GET_CONFIG first, then the ack.
	if err := conn.Send(BackendConfigChange, proto.FlagVersion|proto.FlagNeedReply, nil); err != nil {
		t.Fatal(err)
	}
	c, err := d.HandleConfigChange(5 * time.Second)
	if err != nil || c.Capacity != 4096 || d.BlkConfig().Capacity != 4096 {
		t.Fatalf("config change: %+v %v", c, err)
	}
	m, err := conn.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if m.Request != BackendConfigChange || m.Flags != proto.FlagVersion|proto.FlagReply {
		t.Errorf("reply %v flags %#x", m.Request, m.Flags)
	}
	if v, err := proto.U64(m); err != nil || v != 0 {
		t.Errorf("reply %v %v", v, err)
	}
	// Without NEED_REPLY nothing is sent back; a payload is ignored.
	conn.Send(BackendConfigChange, proto.FlagVersion, []byte{1, 2, 3})
	if _, err := d.HandleConfigChange(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	conn.Send(proto.Request(1), proto.FlagVersion, nil) // IOTLB_MSG
	if _, err := d.HandleConfigChange(5 * time.Second); err == nil || !strings.Contains(err.Error(), "request 1") {
		t.Errorf("IOTLB message taken as a config change: %v", err)
	}
	if _, err := d.WaitBackend(10 * time.Millisecond); err == nil {
		t.Error("a message from nowhere")
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.wait(); err != nil {
		t.Fatal(err)
	}
}

// fakeBlkFor is fakeFor with a blk device behind the ring.
func fakeBlkFor(d *Device, q *Queue, dev *fakeBlkDev) *fakeRing {
	f := fakeFor(d, q)
	f.blk, f.handle = true, dev.handle
	return f
}

func TestBlkAsyncAgainstFakeDevice(t *testing.T) {
	for _, indirect := range []bool{false, true} {
		d := detached(t, Options{Blk: true, NumQueues: 2, QueueSize: 16, Slots: 8, SlotDataSize: 8192}, true, indirect)
		dev := &fakeBlkDev{disk: make([]byte, 1<<20)}
		q := d.Queue(1)
		if q.Index() != 1 {
			t.Fatalf("queue 1 is vring %d", q.Index())
		}
		stop := runFake(fakeBlkFor(d, q, dev))
		want := map[int]byte{}
		flushes, perReq := 0, 3
		if indirect {
			perReq = 1
		}
		for round := 0; round < 20; round++ {
			n := 0
			for q.Free() > 0 {
				s := q.Get()
				sector := uint64(s.ID * 16)
				switch round % 3 {
				case 0:
					for i := range s.Data[:8192] {
						s.Data[i] = byte(round + s.ID + i)
					}
					q.PrepareBlk(s, BlkTOut, sector, DirOut, 8192)
					want[s.ID] = byte(round + s.ID)
				case 1:
					q.PrepareBlk(s, BlkTIn, sector, DirIn, 8192)
				default:
					q.PrepareBlk(s, BlkTFlush, 0, DirNone, 0)
					flushes++
				}
				q.Submit(s)
				n++
			}
			q.Kick()
			for deadline := time.Now().Add(5 * time.Second); n > 0; {
				n -= q.Reap(func(s *Slot) {
					if s.BlkStatus() != BlkSOK {
						t.Errorf("slot %d: status %d", s.ID, s.BlkStatus())
					}
					switch round % 3 {
					case 0:
						if s.UsedLen() != 1 {
							t.Errorf("OUT used %d", s.UsedLen())
						}
					case 1:
						if s.UsedLen() != 8193 || s.Data[100] != want[s.ID]+100 {
							t.Errorf("IN slot %d: used %d data %d", s.ID, s.UsedLen(), s.Data[100])
						}
					}
					q.Put(s)
				})
				if time.Now().After(deadline) {
					t.Fatalf("round %d: %d outstanding", round, n)
				}
			}
		}
		stop()
		if dev.flushCount() != flushes {
			t.Errorf("%d flushes, %d sent", dev.flushCount(), flushes)
		}
		if q.Err() != nil || q.Free() != min(8, 16/perReq) {
			t.Errorf("err %v, %d free", q.Err(), q.Free())
		}
	}
}

func TestBlkAsyncNoAllocs(t *testing.T) {
	d := detached(t, Options{Blk: true, QueueSize: 64}, true, true)
	q := d.Queue(0)
	f := fakeFor(d, q)
	f.blk = true
	reaped := 0
	fn := func(s *Slot) { reaped++; q.Put(s) }
	allocs := testing.AllocsPerRun(100, func() {
		for i := 0; i < 8; i++ {
			s := q.Get()
			q.PrepareBlk(s, BlkTIn, uint64(i*8), DirIn, 4096)
			q.Submit(s)
		}
		q.Kick()
		echoUsed(f)
		q.Reap(fn)
	})
	if allocs != 0 {
		t.Errorf("%v allocations per round", allocs)
	}
	if reaped != 8*101 {
		t.Errorf("reaped %d", reaped)
	}
}

// Integration tests of blk controllers (issue 13) through the Go front-end
// playing QEMU's vhost-user-blk: virtio-blk requests over 512- and
// 4096-byte malloc disks (IN/OUT with verify, FLUSH, GET_ID, DISCARD,
// WRITE_ZEROES, UNSUPP, IOERR for out-of-range and misaligned requests,
// chains split and merged as drivers may), read-only disks, several queues,
// the config space (GET_CONFIG, the writeback byte through SET_CONFIG and
// what a writethrough cache does), a resize told through the back-end
// request channel, and 0 allocations per request.
package vhost_test

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math/rand"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"vhost-target/bdev"
	"vhost-target/bdev/errbdev"
	"vhost-target/reactor"
	"vhost-target/vhost"
	"vhost-target/vhost/frontend"
	"vhost-target/vhost/proto"
)

// newBlkController starts a blk controller over disk on e's reactors.
func newBlkController(t *testing.T, e *env, nq int, disk bdev.Bdev, change func(*vhost.Config)) (*vhost.Controller, string, *syncBuffer) {
	t.Helper()
	return newControllerWith(t, e, nq, 1, func(c *vhost.Config) {
		c.Kind, c.Disk = vhost.KindBlk, disk
		if change != nil {
			change(c)
		}
	})
}

// doBlk runs one blk request and fails the test on a transport error.
func doBlk(t *testing.T, d *frontend.Device, c frontend.BlkCommand) *frontend.BlkResponse {
	t.Helper()
	r, err := d.DoBlk(c)
	if err != nil {
		t.Fatalf("blk type %d sector %d: %v", c.Type, c.Sector, err)
	}
	return r
}

// expectBlk checks a response's status and used length.
func expectBlk(t *testing.T, what string, r *frontend.BlkResponse, status byte, used uint32) {
	t.Helper()
	if r.Status != status || r.UsedLen != used {
		t.Errorf("%s: status %d used %d, want status %d used %d", what, r.Status, r.UsedLen, status, used)
	}
}

func blkPattern(n int, seed int64) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

// TestBlkIO serves every request type over 512- and 4096-byte block disks.
func TestBlkIO(t *testing.T) {
	for _, bs := range []uint32{512, 4096} {
		t.Run(fmt.Sprint(bs), func(t *testing.T) { blkIO(t, bs) })
	}
}

func blkIO(t *testing.T, bs uint32) {
	e := newEnv(t, 1, reactor.Adaptive)
	const size = 4 << 20
	disk := e.disk("blk", size, bs)
	_, sock, _ := newBlkController(t, e, 2, disk, nil)
	d := dial(t, sock, frontend.Options{Blk: true, NumQueues: 2, Regions: 2})
	spb := uint64(bs / 512) // sectors per block

	off := d.OfferedFeatures()
	for _, f := range []int{frontend.BlkFSegMax, frontend.BlkFBlkSize, frontend.BlkFTopology, frontend.BlkFFlush,
		frontend.BlkFConfigWCE, frontend.BlkFMQ, frontend.BlkFDiscard, frontend.BlkFWriteZeroes} {
		if off&(1<<f) == 0 || d.Features()&(1<<f) == 0 {
			t.Errorf("feature %d offered %v acked %v", f, off&(1<<f) != 0, d.Features()&(1<<f) != 0)
		}
	}
	if off&(1<<frontend.BlkFRO) != 0 || off&(1<<proto.FVersion1) == 0 {
		t.Errorf("offered %#x", off)
	}
	if d.ProtocolFeatures()&(1<<proto.PFConfig) == 0 || d.QueueNum() != 2 {
		t.Errorf("protocol features %#x, queue num %d", d.ProtocolFeatures(), d.QueueNum())
	}
	cfg := d.BlkConfig()
	if cfg.Len != frontend.BlkConfigLenQEMU || cfg.Capacity != size/512 || cfg.BlkSize != bs || cfg.NumQueues != 2 ||
		cfg.SegMax < 1 || cfg.MinIOSize != 1 || cfg.Writeback != 0 {
		t.Errorf("config %+v", cfg)
	}
	if cfg.MaxDiscardSectors == 0 || cfg.MaxDiscardSeg == 0 || cfg.DiscardSectorAlignment != uint32(spb) ||
		cfg.MaxWriteZeroesSectors == 0 || cfg.MaxWriteZeroesSeg == 0 || cfg.WriteZeroesMayUnmap != 1 {
		t.Errorf("discard/write zeroes limits %+v", cfg)
	}

	// IN/OUT with verify, on both queues, in several chain layouts.
	mem := disk.Bytes()
	layouts := []frontend.BlkCommand{
		{},
		{Segments: 3},
		{Direct: true, Segments: 2},
		{HeaderSplit: 4},
		{HeaderInData: true, Segments: 2},
		{StatusInData: true},
		{HeaderSplit: 2, StatusInData: true, Segments: 5},
	}
	for i, l := range layouts {
		q := i % 2
		sector := uint64(i*16+8) * spb
		data := blkPattern(int(bs)*4, int64(i)+int64(bs))
		out := l
		out.Type, out.Sector, out.DataOut, out.Queue = frontend.BlkTOut, sector, data, q
		expectBlk(t, fmt.Sprintf("layout %d OUT", i), doBlk(t, d, out), frontend.BlkSOK, 1)
		if !bytes.Equal(mem[sector*512:sector*512+uint64(len(data))], data) {
			t.Errorf("layout %d: OUT did not reach the disk", i)
		}
		in := l
		in.Type, in.Sector, in.DataInLen, in.Queue = frontend.BlkTIn, sector, len(data), q
		r := doBlk(t, d, in)
		expectBlk(t, fmt.Sprintf("layout %d IN", i), r, frontend.BlkSOK, uint32(len(data))+1)
		if !bytes.Equal(r.DataIn, data) {
			t.Errorf("layout %d: IN read back other data", i)
		}
	}

	expectBlk(t, "FLUSH", doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTFlush}), frontend.BlkSOK, 1)

	// GET_ID: the first 20 hex digits of the bdev UUID; a longer buffer
	// gets the 20 bytes.
	want := hex.EncodeToString(disk.Info().UUID[:])[:20]
	r := doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTGetID, DataInLen: frontend.BlkIDBytes})
	expectBlk(t, "GET_ID", r, frontend.BlkSOK, 21)
	if string(r.DataIn) != want {
		t.Errorf("GET_ID %q, want %q", r.DataIn, want)
	}
	r = doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTGetID, DataInLen: 64, Queue: 1, Segments: 3})
	if r.Status != frontend.BlkSOK || string(r.DataIn[:20]) != want {
		t.Errorf("GET_ID into 64 bytes: status %d %q", r.Status, r.DataIn[:20])
	}

	// DISCARD, then the range reads zeroes; WRITE_ZEROES with and without
	// the unmap flag.
	for i, c := range []struct {
		typ   uint32
		flags uint32
	}{{frontend.BlkTDiscard, 0}, {frontend.BlkTWriteZeroes, 0}, {frontend.BlkTWriteZeroes, frontend.BlkWriteZeroesUnmap}} {
		sector := uint64(200+i*40) * spb
		n := 8 * int(bs)
		data := blkPattern(n, int64(i))
		expectBlk(t, "OUT before zeroing", doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTOut, Sector: sector, DataOut: data}), 0, 1)
		seg := frontend.EncodeBlkSegments(frontend.BlkSegment{Sector: sector + spb, NumSectors: uint32(6 * spb), Flags: c.flags})
		expectBlk(t, fmt.Sprintf("type %d flags %d", c.typ, c.flags),
			doBlk(t, d, frontend.BlkCommand{Type: c.typ, DataOut: seg}), frontend.BlkSOK, 1)
		r := doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTIn, Sector: sector, DataInLen: n})
		wantData := append([]byte(nil), data...)
		clear(wantData[bs : 7*bs])
		if r.Status != frontend.BlkSOK || !bytes.Equal(r.DataIn, wantData) {
			t.Errorf("type %d: the range does not read back zeroed (status %d)", c.typ, r.Status)
		}
	}
	// Several discard segments in one request.
	segs := frontend.EncodeBlkSegments(frontend.BlkSegment{Sector: 0, NumSectors: uint32(spb)},
		frontend.BlkSegment{Sector: 100 * spb, NumSectors: uint32(2 * spb)})
	expectBlk(t, "DISCARD of 2 segments", doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTDiscard, DataOut: segs, Segments: 2}), 0, 1)

	// Unsupported types and flags: UNSUPP.
	for _, typ := range []uint32{2, 3, frontend.BlkTGetLifetime, frontend.BlkTSecureErase, 99, 0xffffffff} {
		expectBlk(t, fmt.Sprintf("type %d", typ), doBlk(t, d, frontend.BlkCommand{Type: typ}), frontend.BlkSUnsupp, 1)
	}
	expectBlk(t, "DISCARD with the unmap flag", doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTDiscard,
		DataOut: frontend.EncodeBlkSegments(frontend.BlkSegment{NumSectors: uint32(spb), Flags: frontend.BlkWriteZeroesUnmap})}),
		frontend.BlkSUnsupp, 1)
	expectBlk(t, "WRITE_ZEROES with flag 2", doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTWriteZeroes,
		DataOut: frontend.EncodeBlkSegments(frontend.BlkSegment{NumSectors: uint32(spb), Flags: 2})}), frontend.BlkSUnsupp, 1)

	// Out of range and misaligned: IOERR, nothing transferred.
	capSectors := uint64(size / 512)
	ioerr := []frontend.BlkCommand{
		{Type: frontend.BlkTIn, Sector: capSectors, DataInLen: int(bs)},
		{Type: frontend.BlkTIn, Sector: capSectors - spb, DataInLen: 2 * int(bs)},
		{Type: frontend.BlkTIn, Sector: 1 << 62, DataInLen: int(bs)},
		{Type: frontend.BlkTOut, Sector: capSectors, DataOut: make([]byte, bs)},
		{Type: frontend.BlkTDiscard, DataOut: frontend.EncodeBlkSegments(frontend.BlkSegment{Sector: capSectors, NumSectors: uint32(spb)})},
		{Type: frontend.BlkTWriteZeroes, DataOut: frontend.EncodeBlkSegments(frontend.BlkSegment{Sector: capSectors - spb, NumSectors: uint32(2 * spb)})},
		{Type: frontend.BlkTDiscard, DataOut: []byte{1, 2, 3}},                                                         // not a segment
		{Type: frontend.BlkTDiscard, DataOut: frontend.EncodeBlkSegments(frontend.BlkSegment{NumSectors: 0})},          // empty
		{Type: frontend.BlkTWriteZeroes, DataOut: frontend.EncodeBlkSegments(make([]frontend.BlkSegment, 2)...)},       // beyond max_write_zeroes_seg 1
		{Type: frontend.BlkTDiscard, DataOut: frontend.EncodeBlkSegments(make([]frontend.BlkSegment, 33)...)},          // beyond max_discard_seg
		{Type: frontend.BlkTIn, Sector: 0, DataInLen: 1000},                                                            // not whole sectors
		{Type: frontend.BlkTIn, Sector: 0, HeaderLen: 8},                                                               // short header
		{Type: frontend.BlkTOut, Sector: 0, DataOut: make([]byte, bs), HeaderLen: 12, HeaderInData: true, Segments: 1}, // short header in data: data shifted, still a request
	}
	if bs == 4096 {
		ioerr = append(ioerr,
			frontend.BlkCommand{Type: frontend.BlkTIn, Sector: 1, DataInLen: 4096}, // offset not a block
			frontend.BlkCommand{Type: frontend.BlkTIn, Sector: 0, DataInLen: 512},  // length not a block
			frontend.BlkCommand{Type: frontend.BlkTOut, Sector: 3, DataOut: make([]byte, 4096)},
			frontend.BlkCommand{Type: frontend.BlkTDiscard, DataOut: frontend.EncodeBlkSegments(frontend.BlkSegment{Sector: 1, NumSectors: 8})})
	}
	before := append([]byte(nil), mem...)
	for i, c := range ioerr {
		r := doBlk(t, d, c)
		if r.Status != frontend.BlkSIOErr {
			t.Errorf("case %d (%+v): status %d, want IOERR", i, c, r.Status)
		}
		if c.Type == frontend.BlkTIn && r.UsedLen != 1 {
			t.Errorf("case %d: used %d with nothing read", i, r.UsedLen)
		}
	}
	if !bytes.Equal(before, mem) {
		t.Error("a failed request changed the disk")
	}

	// Malformed chains fail alone: no status byte (nothing written, used
	// length 0), then the queue serves the next request.
	r = doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTFlush, NoStatus: true})
	if r.Status != 0xff || r.UsedLen != 0 {
		t.Errorf("no status byte: status %#x used %d", r.Status, r.UsedLen)
	}
	expectBlk(t, "FLUSH after", doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTFlush}), frontend.BlkSOK, 1)
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestBlkReadOnly: a read-only controller offers VIRTIO_BLK_F_RO and no
// discard or write zeroes, refuses OUT with IOERR, and reads.
func TestBlkReadOnly(t *testing.T) {
	e := newEnv(t, 1, reactor.Adaptive)
	disk := e.disk("ro", 1<<20, 512)
	copy(disk.Bytes(), blkPattern(4096, 7))
	_, sock, _ := newBlkController(t, e, 1, disk, func(c *vhost.Config) { c.ReadOnly = true })
	d := dial(t, sock, frontend.Options{Blk: true})
	if d.OfferedFeatures()&(1<<frontend.BlkFRO) == 0 || d.Features()&(1<<frontend.BlkFRO) == 0 {
		t.Errorf("RO not offered/acked: %#x", d.OfferedFeatures())
	}
	if d.OfferedFeatures()&(1<<frontend.BlkFDiscard|1<<frontend.BlkFWriteZeroes) != 0 {
		t.Errorf("a read-only disk offers discard or write zeroes: %#x", d.OfferedFeatures())
	}
	before := append([]byte(nil), disk.Bytes()...)
	expectBlk(t, "OUT", doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTOut, DataOut: make([]byte, 512)}), frontend.BlkSIOErr, 1)
	for _, typ := range []uint32{frontend.BlkTDiscard, frontend.BlkTWriteZeroes} {
		r := doBlk(t, d, frontend.BlkCommand{Type: typ, DataOut: frontend.EncodeBlkSegments(frontend.BlkSegment{NumSectors: 1})})
		if r.Status == frontend.BlkSOK {
			t.Errorf("type %d on a read-only disk: OK", typ)
		}
	}
	r := doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTIn, DataInLen: 4096})
	expectBlk(t, "IN", r, frontend.BlkSOK, 4097)
	if !bytes.Equal(r.DataIn, before[:4096]) {
		t.Error("IN read other data")
	}
	expectBlk(t, "FLUSH", doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTFlush}), frontend.BlkSOK, 1)
	if !bytes.Equal(before, disk.Bytes()) {
		t.Error("the read-only disk changed")
	}
}

// TestBlkQueues: four request queues (vrings 0-3) run at once on two
// reactors, each writing and verifying its own area; GET_QUEUE_NUM bounds
// what a front-end may start.
func TestBlkQueues(t *testing.T) {
	e := newEnv(t, 2, reactor.Adaptive)
	disk := e.disk("mq", 8<<20, 4096)
	c, sock, _ := newBlkController(t, e, 4, disk, nil)
	d := dial(t, sock, frontend.Options{Blk: true, NumQueues: 4, QueueSize: 64})
	if d.QueueNum() != 4 || d.BlkConfig().NumQueues != 4 || d.Features()&(1<<frontend.BlkFMQ) == 0 {
		t.Fatalf("queue num %d, config num_queues %d, features %#x", d.QueueNum(), d.BlkConfig().NumQueues, d.Features())
	}
	var wg sync.WaitGroup
	var bad atomic.Int32
	for q := 0; q < 4; q++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				sector := uint64(q*2048 + i*8*4)
				data := blkPattern(4096*(1+i%4), int64(q*1000+i))
				w, err := d.DoBlk(frontend.BlkCommand{Type: frontend.BlkTOut, Sector: sector, DataOut: data, Queue: q})
				if err != nil || w.Status != 0 {
					bad.Add(1)
					return
				}
				r, err := d.DoBlk(frontend.BlkCommand{Type: frontend.BlkTIn, Sector: sector, DataInLen: len(data), Queue: q})
				if err != nil || r.Status != 0 || !bytes.Equal(r.DataIn, data) {
					bad.Add(1)
					return
				}
			}
		}()
	}
	wg.Wait()
	if bad.Load() != 0 {
		t.Fatalf("%d queues failed", bad.Load())
	}
	snap := c.Stats.Snapshot()
	for q := 0; q < 4; q++ {
		if snap.Queues[q].Requests < 100 {
			t.Errorf("queue %d: %d requests", q, snap.Queues[q].Requests)
		}
	}
	if len(snap.LUNs) != 1 || snap.LUNs[0].Reads < 200 || snap.LUNs[0].Writes < 200 {
		t.Errorf("disk counters %+v", snap.LUNs)
	}
	d.Close()
	eventually(t, "the session to end", 5*time.Second, func() bool { return c.Sessions() == 0 })
	if _, err := frontend.Dial(sock, frontend.Options{Blk: true, NumQueues: 5, Timeout: 5 * time.Second}); err == nil ||
		!strings.Contains(err.Error(), "supports 4 queues") {
		t.Errorf("5 queues on a 4-queue controller: %v", err)
	}
}

// cacheBdev presents a bdev with a volatile write cache and counts the
// flushes its channels are given.
type cacheBdev struct {
	bdev.Bdev
	info    bdev.Info
	flushes atomic.Int64
}

func newCacheBdev(b bdev.Bdev) *cacheBdev {
	c := &cacheBdev{Bdev: b, info: *b.Info()}
	c.info.WriteCache = true
	return c
}

func (c *cacheBdev) Info() *bdev.Info { return &c.info }

func (c *cacheBdev) Open() (bdev.Channel, error) {
	ch, err := c.Bdev.Open()
	if err != nil {
		return nil, err
	}
	return &cacheChan{Channel: ch, c: c}, nil
}

type cacheChan struct {
	bdev.Channel
	c *cacheBdev
}

func (ch *cacheChan) Submit(io *bdev.IO) {
	if io.Op == bdev.OpFlush {
		ch.c.flushes.Add(1)
	}
	ch.Channel.Submit(io)
}

func (ch *cacheChan) EventFD() int {
	if w, ok := ch.Channel.(bdev.Waker); ok {
		return w.EventFD()
	}
	return -1
}

// TestBlkConfigSpace: GET_CONFIG at any offset and length (zeroes past
// the fields the device describes, same size as asked), and the writeback
// byte: SET_CONFIG switches the cache of a disk that has one to
// writethrough (each write then flushed) and back; writes to other fields
// are refused and the session goes on.
func TestBlkConfigSpace(t *testing.T) {
	e := newEnv(t, 1, reactor.Adaptive)
	disk := newCacheBdev(e.disk("wc", 2<<20, 512))
	_, sock, _ := newBlkController(t, e, 1, disk, nil)
	d := dial(t, sock, frontend.Options{Blk: true})
	if d.BlkConfig().Writeback != 1 {
		t.Errorf("a disk with a write cache: writeback %d", d.BlkConfig().Writeback)
	}
	full, err := d.GetConfig(0, 256)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(full[:frontend.BlkConfigLenQEMU], d.ConfigSpace()) {
		t.Errorf("GET_CONFIG 0+256 and 0+57 differ:\n% x\n% x", full[:57], d.ConfigSpace())
	}
	if i := bytes.IndexFunc(full[60:], func(r rune) bool { return r != 0 }); i >= 0 {
		t.Errorf("byte %d past struct virtio_blk_config is not zero: % x", 60+i, full[60:])
	}
	for _, c := range []struct{ off, size uint32 }{{frontend.BlkCfgNumQueues, 2}, {frontend.BlkCfgBlkSize, 4}, {0, 8}, {250, 6}, {0, 0}} {
		b, err := d.GetConfig(c.off, c.size)
		if err != nil || !bytes.Equal(b, full[c.off:c.off+c.size]) {
			t.Errorf("GET_CONFIG %d+%d: % x %v", c.off, c.size, b, err)
		}
	}

	write := func(what string) {
		t.Helper()
		expectBlk(t, what, doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTOut, Sector: 8, DataOut: make([]byte, 4096)}), 0, 1)
	}
	f0 := disk.flushes.Load()
	write("writeback OUT")
	if n := disk.flushes.Load() - f0; n != 0 {
		t.Errorf("writeback: %d flushes after a write", n)
	}
	if err := d.SetWriteback(false); err != nil {
		t.Fatal(err)
	}
	if c, err := d.ReadBlkConfig(); err != nil || c.Writeback != 0 {
		t.Errorf("after writeback 0: %+v %v", c, err)
	}
	f0 = disk.flushes.Load()
	write("writethrough OUT")
	if n := disk.flushes.Load() - f0; n != 1 {
		t.Errorf("writethrough: %d flushes after a write, want 1", n)
	}
	if err := d.SetWriteback(true); err != nil {
		t.Fatal(err)
	}
	f0 = disk.flushes.Load()
	write("writeback again OUT")
	if n := disk.flushes.Load() - f0; n != 0 || d.BlkConfig().Writeback != 1 {
		t.Errorf("writeback again: %d flushes, config writeback %d", n, d.BlkConfig().Writeback)
	}
	// Another field, or a value not 0/1: refused; the session goes on.
	for _, c := range []struct {
		off  uint32
		data []byte
	}{{0, make([]byte, 8)}, {frontend.BlkCfgNumQueues, []byte{9, 0}}, {frontend.BlkCfgWriteback, []byte{2}},
		{frontend.BlkCfgWriteback, []byte{1, 0}}} {
		if err := d.SetConfig(c.off, c.data); err == nil {
			t.Errorf("SET_CONFIG %d % x accepted", c.off, c.data)
		}
	}
	if c, err := d.ReadBlkConfig(); err != nil || c.Capacity != 4096 || c.Writeback != 1 {
		t.Errorf("config after refused writes: %+v %v", c, err)
	}
	write("OUT after refused SET_CONFIGs")
}

// TestBlkResize: a grown disk (bdev resize, then Controller.CapacityChanged)
// shows its new capacity in GET_CONFIG; a front-end that negotiated
// BACKEND_REQ is sent CONFIG_CHANGE_MSG on its channel and, handling it as
// QEMU does (GET_CONFIG first), reads the new capacity and uses it; one
// without the channel reads it at its next GET_CONFIG.
func TestBlkResize(t *testing.T) {
	e := newEnv(t, 1, reactor.Adaptive)
	disk := e.disk("grow", 1<<20, 4096)
	c, sock, _ := newBlkController(t, e, 1, disk, func(c *vhost.Config) { c.MaxSessions = 2 })
	d := dial(t, sock, frontend.Options{Blk: true, BackendReq: true})
	if d.ProtocolFeatures()&(1<<proto.PFBackendReq) == 0 || !d.HasBackendChannel() {
		t.Fatalf("BACKEND_REQ not negotiated: offered %#x", d.OfferedProtocolFeatures())
	}
	plain := dial(t, sock, frontend.Options{Blk: true})
	if d.BlkConfig().Capacity != 2048 {
		t.Fatalf("capacity %d", d.BlkConfig().Capacity)
	}
	if m, err := d.WaitBackend(50 * time.Millisecond); err == nil {
		t.Fatalf("back-end message %d before any change", m.Request)
	}
	expectBlk(t, "IN beyond the old end", doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTIn, Sector: 2048, DataInLen: 4096}),
		frontend.BlkSIOErr, 1)
	if err := disk.Resize(4 << 20); err != nil {
		t.Fatal(err)
	}
	if err := c.CapacityChanged(disk); err != nil {
		t.Fatal(err)
	}
	m, err := d.WaitBackend(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if m.Request != frontend.BackendConfigChange || len(m.Payload) != 0 || m.NFDs != 0 {
		t.Errorf("back-end sent request %d flags %#x, %d bytes, %d fds", m.Request, m.Flags, len(m.Payload), m.NFDs)
	}
	cfg, err := d.ReadBlkConfig()
	if err != nil || cfg.Capacity != 8192 {
		t.Fatalf("capacity after the resize: %+v %v", cfg, err)
	}
	if m.NeedReply() {
		if err := d.ReplyBackend(m, 0); err != nil {
			t.Fatal(err)
		}
	}
	data := blkPattern(4096, 3)
	expectBlk(t, "OUT in the grown part", doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTOut, Sector: 8000, DataOut: data}), 0, 1)
	r := doBlk(t, plain, frontend.BlkCommand{Type: frontend.BlkTIn, Sector: 8000, DataInLen: 4096})
	if r.Status != 0 || !bytes.Equal(r.DataIn, data) {
		t.Errorf("the other session reads the grown part: status %d", r.Status)
	}
	if cfg, err := plain.ReadBlkConfig(); err != nil || cfg.Capacity != 8192 {
		t.Errorf("the session without a channel: %+v %v", cfg, err)
	}
	// Another resize, handled the QEMU way in one call.
	if err := disk.Resize(8 << 20); err != nil {
		t.Fatal(err)
	}
	if err := c.CapacityChanged(disk); err != nil {
		t.Fatal(err)
	}
	if cfg, err := d.HandleConfigChange(5 * time.Second); err != nil || cfg.Capacity != 16384 {
		t.Errorf("second resize: %+v %v", cfg, err)
	}
}

// TestBlkInflight: a QEMU-like blk front-end (INFLIGHT_SHMFD, as QEMU's
// vhost-user-blk always asks for it) gets an area for its request queues
// and does I/O, across a device reset.
func TestBlkInflight(t *testing.T) {
	e := newEnv(t, 1, reactor.Adaptive)
	disk := e.disk("inf", 1<<20, 512)
	_, sock, _ := newBlkController(t, e, 2, disk, nil)
	d := dial(t, sock, frontend.Options{Blk: true, NumQueues: 2, Inflight: true})
	fd, area := d.InflightFD()
	if fd < 0 || area.NumQueues != 2 {
		t.Fatalf("inflight fd %d, area %+v", fd, area)
	}
	for round := 0; round < 2; round++ {
		for q := 0; q < 2; q++ {
			data := blkPattern(2048, int64(round*2+q))
			expectBlk(t, "OUT", doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTOut, Sector: uint64(q * 64), DataOut: data, Queue: q}), 0, 1)
			r := doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTIn, Sector: uint64(q * 64), DataInLen: 2048, Queue: q})
			if r.Status != 0 || !bytes.Equal(r.DataIn, data) {
				t.Errorf("round %d queue %d: read back status %d", round, q, r.Status)
			}
		}
		if err := d.Reset(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestBlkIOPathNoAllocs: an IN through a blk controller (virtqueue,
// virtio-blk decode, disk, malloc bdev, status, used ring) allocates
// nothing, measured as TestIOPathNoAllocs measures the SCSI path.
func TestBlkIOPathNoAllocs(t *testing.T) {
	for _, op := range []uint32{frontend.BlkTIn, frontend.BlkTOut} {
		t.Run(fmt.Sprintf("adaptive-type%d", op), func(t *testing.T) {
			if raceEnabled {
				t.Skip("in a -race build the 8-byte buffers of the eventfd reads around an epoll sleep escape to the heap")
			}
			q, run, bad := blkAllocsTarget(t, reactor.Adaptive, op)
			if n := testing.AllocsPerRun(1000, run); n != 0 {
				t.Errorf("a blk request of type %d allocates %v per request", op, n)
			}
			if *bad != 0 || q.Inflight() != 0 {
				t.Errorf("%d requests failed, %d in flight", *bad, q.Inflight())
			}
		})
		t.Run(fmt.Sprintf("busy-type%d", op), func(t *testing.T) {
			q, run, bad := blkAllocsTarget(t, reactor.Busy, op)
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			for i := 0; i < 20000; i++ {
				run()
			}
			runtime.ReadMemStats(&after)
			if n := after.Mallocs - before.Mallocs; n > 100 {
				t.Errorf("20000 blk requests of type %d made %d allocations", op, n)
			}
			if *bad != 0 || q.Inflight() != 0 {
				t.Errorf("%d requests failed, %d in flight", *bad, q.Inflight())
			}
		})
	}
}

// blkAllocsTarget starts a blk controller over a disk that was resized at
// runtime and returns a function that runs one 4 KiB request of type op.
func blkAllocsTarget(t *testing.T, mode reactor.Mode, op uint32) (*frontend.Queue, func(), *int) {
	e := newEnv(t, 1, mode)
	disk := e.disk("alloc", 1<<20, 512)
	c, sock, _ := newBlkController(t, e, 1, disk, nil)
	dev := dial(t, sock, frontend.Options{Blk: true, Slots: 4, SlotDataSize: 4096, BackendReq: true})
	if err := disk.Resize(2 << 20); err != nil {
		t.Fatal(err)
	}
	if err := c.CapacityChanged(disk); err != nil {
		t.Fatal(err)
	}
	if _, err := dev.HandleConfigChange(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	q := dev.Queue(0)
	q.SetInterrupts(false)
	dir := frontend.DirIn
	if op == frontend.BlkTOut {
		dir = frontend.DirOut
	}
	bad := new(int)
	reap := func(s *frontend.Slot) {
		if s.BlkStatus() != frontend.BlkSOK {
			*bad++
		}
		q.Put(s)
	}
	run := func() {
		s := q.Get()
		q.PrepareBlk(s, op, 3000, dir, 4096) // in the grown part
		q.Submit(s)
		q.Kick()
		for q.Reap(reap) == 0 {
			runtime.Gosched()
		}
	}
	for i := 0; i < 100; i++ {
		run()
	}
	return q, run, bad
}

// blkAlive is alive for a blk front-end: the session answers a GET_CONFIG
// (the target echoes its offset) and serves a FLUSH.
func blkAlive(t *testing.T, d *frontend.Device) {
	t.Helper()
	if !alive(t, d) {
		t.Fatal("the session ended")
	}
	expectBlk(t, "FLUSH", doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTFlush}), frontend.BlkSOK, 1)
}

// TestBlkHostileConfig: the config messages of a blk controller under
// hostile values. A malformed GET/SET_CONFIG (size above 256, or a header
// that disagrees with its payload) ends the session, as any malformed
// message does; a well-formed one at any offset is answered (zeroes past
// the config space, same size as asked) or refused; a back-end channel fd
// that is not a socket, or one whose peer went away, costs the resize
// notification only.
func TestBlkHostileConfig(t *testing.T) {
	e := newEnv(t, 1, reactor.Adaptive)
	disk := e.disk("h", 1<<20, 512)
	c, sock, logs := newBlkController(t, e, 1, disk, nil)
	grow := func() {
		t.Helper()
		info := disk.Info()
		if err := disk.Resize(uint64(info.BlockSize) * (info.NumBlocks + 8)); err != nil {
			t.Fatal(err)
		}
		if err := c.CapacityChanged(disk); err != nil {
			t.Fatal(err)
		}
	}
	open := func(t *testing.T, o frontend.Options) *frontend.Device {
		t.Helper()
		eventually(t, "the previous session to end", 2*time.Second, func() bool { return c.Sessions() == 0 })
		o.Blk = true
		return dial(t, sock, o)
	}
	cfgMsg := func(off, size uint32, data int) []byte {
		p := make([]byte, proto.ConfigHeaderSize+data)
		binary.LittleEndian.PutUint32(p, off)
		binary.LittleEndian.PutUint32(p[4:], size)
		return p
	}
	for _, tc := range []struct {
		name string
		req  proto.Request
		p    []byte
	}{
		{"GET_CONFIG size 300", proto.GetConfig, cfgMsg(0, 300, 300)},
		{"GET_CONFIG size 8, 4 bytes", proto.GetConfig, cfgMsg(0, 8, 4)},
		{"GET_CONFIG 8 bytes", proto.GetConfig, make([]byte, 8)},
		{"SET_CONFIG size 1, no data", proto.SetConfig, cfgMsg(32, 1, 0)},
		{"SET_CONFIG size 257", proto.SetConfig, cfgMsg(0, 257, 257)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := open(t, frontend.Options{})
			sendRaw(t, d, tc.req, proto.FlagVersion, tc.p)
			expectClosed(t, d)
		})
	}
	t.Run("far offsets", func(t *testing.T) {
		d := open(t, frontend.Options{})
		for _, o := range []uint32{250, 256, 1 << 20, 0xfffffff8} {
			b, err := d.GetConfig(o, 16)
			if err != nil || len(b) != 16 || !bytes.Equal(b, make([]byte, 16)) {
				t.Errorf("GET_CONFIG %#x+16: % x %v", o, b, err)
			}
			if err := d.SetConfig(o, []byte{1}); err == nil {
				t.Errorf("SET_CONFIG at %#x accepted", o)
			}
		}
		blkAlive(t, d)
	})
	t.Run("channel not a socket", func(t *testing.T) {
		d := open(t, frontend.Options{ProtocolMask: 1<<proto.PFMQ | 1<<proto.PFReplyAck | 1<<proto.PFConfig | 1<<proto.PFBackendReq})
		if d.ProtocolFeatures()&(1<<proto.PFBackendReq) == 0 {
			t.Fatal("BACKEND_REQ not negotiated")
		}
		efd := eventFD(t)
		if err := d.Message(proto.SetBackendReqFD, true, nil, efd); err != nil {
			t.Fatal(err)
		}
		grow()
		blkAlive(t, d)
		if !strings.Contains(logs.String(), "could not send CONFIG_CHANGE_MSG") {
			t.Errorf("no line about the failed notification:\n%s", logs)
		}
	})
	t.Run("channel peer gone", func(t *testing.T) {
		d := open(t, frontend.Options{BackendReq: true})
		if !d.HasBackendChannel() {
			t.Fatal("no channel")
		}
		// A front-end that hands over a new channel and closes its end.
		p, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		err = d.Message(proto.SetBackendReqFD, true, nil, p[1])
		unix.Close(p[0])
		unix.Close(p[1])
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 3; i++ {
			grow()
		}
		blkAlive(t, d)
		if cfg, err := d.ReadBlkConfig(); err != nil || cfg.Capacity != disk.Info().NumBlocks {
			t.Errorf("config after the resizes: %+v %v (disk %d blocks)", cfg, err, disk.Info().NumBlocks)
		}
	})
	t.Run("channel without BACKEND_REQ", func(t *testing.T) {
		d := open(t, frontend.Options{})
		efd := eventFD(t)
		if err := d.Message(proto.SetBackendReqFD, true, nil, efd); err != nil {
			t.Fatal(err)
		}
		blkAlive(t, d)
	})
}

// TestBlkDirtyLog: while a migration logs, a blk IN marks the pages of its
// data and status and the used ring; an OUT marks its status byte's page
// and the used ring, not the data it only read.
func TestBlkDirtyLog(t *testing.T) {
	e := newEnv(t, 1, reactor.Adaptive)
	disk := e.disk("log", 1<<20, 512)
	_, sock, _ := newBlkController(t, e, 1, disk, func(c *vhost.Config) { c.Migration = true })
	d := dial(t, sock, frontend.Options{Blk: true, Slots: 2, SlotDataSize: 16 << 10,
		ProtocolMask: 1<<proto.PFMQ | 1<<proto.PFReplyAck | 1<<proto.PFConfig | 1<<proto.PFLogShmFD})
	if d.OfferedFeatures()&(1<<proto.FLogAll) == 0 || d.ProtocolFeatures()&(1<<proto.PFLogShmFD) == 0 {
		t.Fatalf("LOG_ALL / LOG_SHMFD not offered: %#x %#x", d.OfferedFeatures(), d.ProtocolFeatures())
	}
	log, logBytes := giveLog(t, d)
	setLogging(t, d, true)
	q := d.Queue(0)
	s := q.Get() // its 16 KiB data buffer: pages nothing else uses
	_, _, usedGPA := q.RingGPAs()
	page := func(gpa uint64) uint64 { return gpa / 4096 }
	dataPages := []uint64{page(s.DataGPA), page(s.DataGPA) + 1, page(s.DataGPA) + 2}

	clear(logBytes)
	r := doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTIn, Sector: 8, DataInLen: 12 << 10, DataGPA: s.DataGPA})
	expectBlk(t, "IN", r, frontend.BlkSOK, 12<<10+1)
	for _, p := range append(dataPages, page(usedGPA)) {
		if !log.Marked(p) {
			t.Errorf("IN: page %d not marked", p)
		}
	}
	if log.Marked(page(s.DataGPA) + 3) {
		t.Error("IN: the page after its data marked")
	}

	clear(logBytes)
	r = doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTOut, Sector: 8, DataOut: make([]byte, 12<<10), DataGPA: s.DataGPA})
	expectBlk(t, "OUT", r, frontend.BlkSOK, 1)
	for _, p := range dataPages {
		if log.Marked(p) {
			t.Errorf("OUT: data page %d marked", p)
		}
	}
	if !log.Marked(page(usedGPA)) {
		t.Error("OUT: used ring not marked")
	}
	marked := 0
	for p := uint64(0); p < log.Pages(); p++ {
		if log.Marked(p) {
			marked++
		}
	}
	if marked < 2 {
		t.Errorf("OUT marked %d pages: want its status byte's and the used ring's", marked)
	}
	q.Put(s)
	setLogging(t, d, false)
}

// featureBdev hides bdev capabilities: a disk without unmap or write zeroes.
type featureBdev struct {
	bdev.Bdev
	info bdev.Info
}

func (f *featureBdev) Info() *bdev.Info { return &f.info }

// TestBlkBdevErrors: what the bdev answers becomes the status (an error
// IOERR, ErrNotSup UNSUPP) and the request after it is served; a disk
// without unmap or write zeroes offers neither and answers them UNSUPP.
func TestBlkBdevErrors(t *testing.T) {
	e := newEnv(t, 1, reactor.Adaptive)
	base := e.disk("base", 1<<20, 512)
	ed, err := errbdev.New(errbdev.Config{Name: "err", Base: base, Rules: []errbdev.Rule{
		{Op: bdev.OpRead, LBAStart: 100, LBACount: 8, Err: bdev.ErrIO},
		{Op: bdev.OpWrite, LBAStart: 200, LBACount: 8, Err: bdev.ErrNotSup},
		{Op: bdev.OpFlush, Err: bdev.ErrIO},
	}})
	if err != nil {
		t.Fatal(err)
	}
	c, sock, _ := newBlkController(t, e, 1, ed, nil)
	d := dial(t, sock, frontend.Options{Blk: true})
	expectBlk(t, "IN of a failing range", doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTIn, Sector: 96, DataInLen: 8192}),
		frontend.BlkSIOErr, 8193)
	expectBlk(t, "IN after it", doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTIn, Sector: 0, DataInLen: 512}), 0, 513)
	expectBlk(t, "OUT answered not supported", doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTOut, Sector: 200,
		DataOut: make([]byte, 512)}), frontend.BlkSUnsupp, 1)
	expectBlk(t, "FLUSH failing", doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTFlush}), frontend.BlkSIOErr, 1)
	if st := c.Stats.Snapshot().LUNs[0]; st.Errors[vhost.ErrMedium] < 2 {
		t.Errorf("medium errors counted: %v", st.Errors)
	}

	plain := &featureBdev{Bdev: e.disk("plain", 1<<20, 4096)}
	plain.info = *plain.Bdev.Info()
	plain.info.Unmap, plain.info.UnmapZeroes, plain.info.WriteZeroes = false, false, false
	_, sock2, _ := newBlkController(t, e, 1, plain, nil)
	d2 := dial(t, sock2, frontend.Options{Blk: true})
	if f := d2.OfferedFeatures(); f&(1<<frontend.BlkFDiscard|1<<frontend.BlkFWriteZeroes) != 0 {
		t.Errorf("offered %#x for a disk without unmap or write zeroes", f)
	}
	if cfg := d2.BlkConfig(); cfg.MaxDiscardSeg != 0 || cfg.MaxWriteZeroesSeg != 0 || cfg.WriteZeroesMayUnmap != 0 {
		t.Errorf("config %+v", cfg)
	}
	for _, typ := range []uint32{frontend.BlkTDiscard, frontend.BlkTWriteZeroes} {
		expectBlk(t, fmt.Sprintf("type %d", typ), doBlk(t, d2, frontend.BlkCommand{Type: typ,
			DataOut: frontend.EncodeBlkSegments(frontend.BlkSegment{NumSectors: 8})}), frontend.BlkSUnsupp, 1)
	}
}

// TestBlkWritethroughAcrossReset: the cache mode the driver chose outlives
// a device reset (QEMU keeps its copy of the config space and does not send
// it again), and a new connection starts in writeback.
func TestBlkWritethroughAcrossReset(t *testing.T) {
	e := newEnv(t, 1, reactor.Adaptive)
	disk := newCacheBdev(e.disk("wt", 1<<20, 512))
	c, sock, _ := newBlkController(t, e, 1, disk, nil)
	d := dial(t, sock, frontend.Options{Blk: true})
	if err := d.SetWriteback(false); err != nil {
		t.Fatal(err)
	}
	if err := d.Reset(); err != nil {
		t.Fatal(err)
	}
	f0 := disk.flushes.Load()
	expectBlk(t, "OUT after the reset", doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTOut, DataOut: make([]byte, 512)}), 0, 1)
	if n := disk.flushes.Load() - f0; n != 1 {
		t.Errorf("writethrough after a reset: %d flushes", n)
	}
	if cfg, err := d.ReadBlkConfig(); err != nil || cfg.Writeback != 0 {
		t.Errorf("config after the reset: %+v %v", cfg, err)
	}
	d.Close()
	eventually(t, "the session to end", 2*time.Second, func() bool { return c.Sessions() == 0 })
	d = dial(t, sock, frontend.Options{Blk: true})
	if d.BlkConfig().Writeback != 1 {
		t.Errorf("a new connection: writeback %d", d.BlkConfig().Writeback)
	}
	f0 = disk.flushes.Load()
	expectBlk(t, "OUT on a new connection", doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTOut, DataOut: make([]byte, 512)}), 0, 1)
	if n := disk.flushes.Load() - f0; n != 0 {
		t.Errorf("a new connection: %d flushes after a write", n)
	}
}

// TestBlkWritethroughAcrossRestart: the writethrough a driver chose
// survives a target restart. QEMU sends SET_CONFIG once and keeps its copy
// of the config space; after the target dies it reconnects and hands over
// the inflight area, not the cache mode. The session keeps the mode in the
// area it allocated, so the next target reads it back: its writes are still
// flushed before they complete and its config says writeback 0. (Before,
// the restarted target served writeback: writes acknowledged before they
// were durable while the guest, believing writethrough, sent no flush.)
func TestBlkWritethroughAcrossRestart(t *testing.T) {
	e := newEnv(t, 1, reactor.Adaptive)
	disk := newCacheBdev(e.disk("wt", 1<<20, 512))
	sock := filepath.Join(t.TempDir(), "b")
	logs := &syncBuffer{}
	newCtrl := func() *vhost.Controller { return blkControllerAt(t, e, sock, disk, 1, logs) }
	c1 := newCtrl()
	d := dial(t, sock, frontend.Options{Blk: true, Inflight: true})
	write := func(what string, wantFlushes int64) {
		t.Helper()
		f0 := disk.flushes.Load()
		expectBlk(t, what, doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTOut, DataOut: make([]byte, 512)}), 0, 1)
		if n := disk.flushes.Load() - f0; n != wantFlushes {
			t.Errorf("%s: %d flushes after a write, want %d", what, n, wantFlushes)
		}
	}
	write("writeback OUT", 0)
	if err := d.SetWriteback(false); err != nil {
		t.Fatal(err)
	}
	write("writethrough OUT", 1)

	// Restart: the first target dies, a second one takes the socket and
	// the front-end reconnects with its area.
	if err := c1.SimulateCrash(); err != nil {
		t.Fatal(err)
	}
	newCtrl()
	if err := d.Reconnect(sock); err != nil {
		t.Fatal(err)
	}
	write("writethrough OUT after the restart", 1)
	if cfg, err := d.ReadBlkConfig(); err != nil || cfg.Writeback != 0 {
		t.Errorf("config after the restart: %+v %v", cfg, err)
	}
	if !strings.Contains(logs.String(), "cache mode restored from the inflight area") {
		t.Errorf("no log line for the restored cache mode:\n%s", logs.String())
	}

	// The driver switches back; the next restart keeps that too.
	if err := d.SetWriteback(true); err != nil {
		t.Fatal(err)
	}
	write("writeback OUT after the restart", 0)
	c2 := e.ctrls[len(e.ctrls)-1]
	if err := c2.SimulateCrash(); err != nil {
		t.Fatal(err)
	}
	newCtrl()
	if err := d.Reconnect(sock); err != nil {
		t.Fatal(err)
	}
	write("writeback OUT after a second restart", 0)
}

// FuzzBlkRequest: arbitrary descriptor chains on a request queue of a live
// blk controller (issue 13), as FuzzRequest does for virtio-scsi: the
// input is one chain and the bytes its buffers point at (the same encoding,
// reqInput), so headers, segments and layouts are whatever the fuzzer
// makes. The target must complete the chain or break only that queue,
// never corrupt the used ring, then serve a correct OUT and IN with the
// data read back, and the other controller must keep answering.
package vhost_test

import (
	"bytes"
	"encoding/binary"
	"io"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"vhost-target/bdev/malloc"
	"vhost-target/reactor"
	"vhost-target/vhost"
	"vhost-target/vhost/frontend"
)

// blkFuzzTarget is the per-process target of FuzzBlkRequest: one adaptive
// reactor, the blk controller under attack (a 4096-byte block disk, so
// alignment is checked) and a second blk controller with a long-lived
// front-end.
type blkFuzzTarget struct {
	victim *vhost.Controller
	sock   string
	good   *frontend.Device
}

func newBlkFuzzTarget(f testing.TB) *blkFuzzTarget {
	r, err := reactor.New(0, -1, reactor.Adaptive)
	if err != nil {
		f.Fatal(err)
	}
	if err := r.Start(); err != nil {
		f.Fatal(err)
	}
	dir := f.TempDir()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	var disks []*malloc.Disk
	var ctrls []*vhost.Controller
	newCtrl := func(name string, bs uint32) string {
		d, err := malloc.New(name, 1<<20, bs, [16]byte{byte(len(name)), 0xb1})
		if err != nil {
			f.Fatal(err)
		}
		disks = append(disks, d)
		sock := filepath.Join(dir, name)
		c, err := vhost.NewController(vhost.Config{Name: name, Kind: vhost.KindBlk, Disk: d, SocketPath: sock, NumQueues: 2,
			SocketUID: -1, SocketGID: -1, Reactors: []*reactor.Reactor{r}, Logger: quiet})
		if err != nil {
			f.Fatal(err)
		}
		if err := c.Listen(); err != nil {
			f.Fatal(err)
		}
		ctrls = append(ctrls, c)
		return sock
	}
	ft := &blkFuzzTarget{sock: newCtrl("victim", 4096)}
	ft.victim = ctrls[0]
	goodSock := newCtrl("good", 512)
	ft.good, err = frontend.Dial(goodSock, frontend.Options{Blk: true, QueueSize: 16, Slots: 2, SlotDataSize: 4096,
		ScratchSize: 64 << 10, Timeout: 2 * time.Second})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() {
		ft.good.Close()
		for _, c := range ctrls {
			c.Close()
		}
		r.Stop()
		for _, d := range disks {
			d.Close()
		}
	})
	return ft
}

// goodFlush checks that the other controller still answers.
func (ft *blkFuzzTarget) goodFlush(t *testing.T) {
	t.Helper()
	if r, err := ft.good.DoBlk(frontend.BlkCommand{Type: frontend.BlkTFlush}); err != nil || r.Status != frontend.BlkSOK {
		t.Fatalf("the other controller stopped answering: %v %+v", err, r)
	}
}

// blkFuzzConn is the fuzzed front-end: a connection to the victim and the
// slot whose data buffer is the scratch area chains point into.
type blkFuzzConn struct {
	ft   *blkFuzzTarget
	d    *frontend.Device
	slot *frontend.Slot
}

func (c *blkFuzzConn) connect(t testing.TB) {
	var err error
	c.d, err = frontend.Dial(c.ft.sock, frontend.Options{Blk: true, NumQueues: 1, QueueSize: 64, Slots: 2,
		SlotDataSize: reqScratch, ScratchSize: 256 << 10, MemSize: 4 << 20, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	c.slot = c.d.Queue(0).Get()
}

// run makes the chain in describes available and waits for it. It reports
// whether the chain completed (and its used length); when the target broke
// the queue instead, it connects again and reports false.
func (c *blkFuzzConn) run(t *testing.T, in []byte) (done bool, used uint32) {
	done, used, writable, closed := runReqInput(t, c.d, c.slot, c.ft.victim, in)
	if !done {
		// A broken queue needs a device reset; start over on a new connection.
		c.d.Abort()
		eventually(t, "the session to end", 2*time.Second, func() bool { return c.ft.victim.Sessions() == 0 })
		c.connect(t)
		return false, 0
	}
	// A used length counts device-writable bytes the device wrote: never
	// more than the writable descriptors hold (each is in a chain once).
	if closed && uint64(used) > writable {
		t.Fatalf("used length %d for a chain with %d writable bytes", used, writable)
	}
	return true, used
}

// check has the queue serve correct requests (an OUT and an IN of the
// same 4 KiB, read back), and the other controller answer.
func (c *blkFuzzConn) check(t *testing.T, in []byte) {
	data := make([]byte, 4096)
	copy(data, in)
	sector := uint64(len(in)%200) * 8
	if resp, err := c.d.DoBlk(frontend.BlkCommand{Type: frontend.BlkTOut, Sector: sector, DataOut: data}); err != nil ||
		resp.Status != frontend.BlkSOK || resp.UsedLen != 1 {
		t.Fatalf("OUT after the fuzzed request: %v %+v", err, resp)
	}
	resp, err := c.d.DoBlk(frontend.BlkCommand{Type: frontend.BlkTIn, Sector: sector, DataInLen: len(data)})
	if err != nil || resp.Status != frontend.BlkSOK || resp.UsedLen != 4097 {
		t.Fatalf("IN after the fuzzed request: %v %+v", err, resp)
	}
	if !bytes.Equal(resp.DataIn, data) {
		t.Fatal("read-back after the fuzzed request differs")
	}
	c.ft.goodFlush(t)
}

func FuzzBlkRequest(f *testing.F) {
	for _, s := range blkRequestSeeds() {
		f.Add(s)
	}
	c := &blkFuzzConn{ft: newBlkFuzzTarget(f)}
	c.connect(f)
	f.Cleanup(func() { c.d.Abort() })
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) > 2048 {
			return
		}
		if done, _ := c.run(t, in); done {
			c.check(t, in)
		}
	})
}

// TestBlkRequestSeeds: the seeds are the requests they are named for, so
// the fuzzer starts from chains the target serves (and refuses) as it
// should: each completes with the used length and the status byte (at its
// place in the scratch area) expected.
func TestBlkRequestSeeds(t *testing.T) {
	c := &blkFuzzConn{ft: newBlkFuzzTarget(t)}
	c.connect(t)
	t.Cleanup(func() { c.d.Abort() })
	seeds := blkRequestSeeds()
	for name, want := range map[string]struct {
		used   uint32
		status byte   // 0xff: none written
		at     uint64 // status offset in the scratch area
	}{
		"in": {4097, 0, 512}, "out": {1, 0, 512}, "flush": {1, 0, 512}, "get-id": {21, 0, 512},
		"discard": {1, 0, 512}, "write-zeroes": {1, 0, 512}, "unsupp": {1, 2, 512}, "misaligned": {1, 1, 512},
		"indirect": {4097, 0, 512}, "split-header": {4097, 0, 8192}, "status-in-data": {4097, 0, 8192},
		"no-status": {0, 0xff, 512}, "short-header": {1, 1, 512}, "loop": {0, 0xff, 512}, "outside-mem": {0, 0xff, 512},
	} {
		in, ok := seeds[name]
		if !ok {
			t.Errorf("no seed %q", name)
			continue
		}
		c.d.WriteGuest(c.slot.DataGPA+want.at, []byte{0xff})
		done, used := c.run(t, in)
		var st [1]byte
		c.d.ReadGuest(c.slot.DataGPA+want.at, st[:])
		if !done || used != want.used || st[0] != want.status {
			t.Errorf("seed %s: done %v used %d status %#x, want used %d status %#x", name, done, used, st[0], want.used, want.status)
		}
		c.check(t, in)
	}
	if len(seeds) != 15 {
		t.Errorf("%d seeds, %d checked", len(seeds), 15)
	}
}

// blkRequestSeeds are well-formed and malformed virtio-blk chains in
// FuzzRequest's encoding (one buffer written at scratch offset 0).
func blkRequestSeeds() map[string][]byte {
	type dsc = fuzzDesc
	hdr := func(typ uint32, sector uint64, extra ...byte) []byte {
		h := make([]byte, frontend.BlkHeaderSize)
		binary.LittleEndian.PutUint32(h, typ)
		binary.LittleEndian.PutUint64(h[8:], sector)
		return append(h, extra...)
	}
	build := func(buf []byte, table []dsc, tableOff uint16, chain []dsc) []byte {
		return encodeReqInput(0, buf, table, tableOff, chain)
	}
	const w, nx, ind = byte(fWrite), byte(fNext), byte(fInd)
	seg := func(sector uint64, num, flags uint32) []byte {
		return frontend.EncodeBlkSegments(frontend.BlkSegment{Sector: sector, NumSectors: num, Flags: flags})
	}
	in := hdr(frontend.BlkTIn, 8)
	out := hdr(frontend.BlkTOut, 16)
	flush := hdr(frontend.BlkTFlush, 0)
	getID := hdr(frontend.BlkTGetID, 0)
	discard := hdr(frontend.BlkTDiscard, 0, seg(8, 8, 0)...)
	wz := hdr(frontend.BlkTWriteZeroes, 0, seg(16, 16, 1)...)
	return map[string][]byte{
		"in":             build(in, nil, 0, []dsc{{0, 16, nx, 1}, {4096, 4096, w | nx, 2}, {512, 1, w, 0}}),
		"out":            build(out, nil, 0, []dsc{{0, 16, nx, 1}, {4096, 8192, nx, 2}, {512, 1, w, 0}}),
		"flush":          build(flush, nil, 0, []dsc{{0, 16, nx, 1}, {512, 1, w, 0}}),
		"get-id":         build(getID, nil, 0, []dsc{{0, 16, nx, 1}, {1024, 20, w | nx, 2}, {512, 1, w, 0}}),
		"discard":        build(discard, nil, 0, []dsc{{0, 32, nx, 1}, {512, 1, w, 0}}),
		"write-zeroes":   build(wz, nil, 0, []dsc{{0, 16, nx, 1}, {16, 16, nx, 2}, {512, 1, w, 0}}),
		"unsupp":         build(hdr(99, 0), nil, 0, []dsc{{0, 16, nx, 1}, {512, 1, w, 0}}),
		"misaligned":     build(hdr(frontend.BlkTIn, 3), nil, 0, []dsc{{0, 16, nx, 1}, {4096, 512, w | nx, 2}, {512, 1, w, 0}}),
		"indirect":       build(in, []dsc{{0, 16, nx, 1}, {4096, 4096, w | nx, 2}, {512, 1, w, 0}}, 8192, []dsc{{8192, 48, ind, 0}}),
		"split-header":   build(in, nil, 0, []dsc{{0, 5, nx, 1}, {5, 11, nx, 2}, {4096, 2048, w | nx, 3}, {6144, 2049, w, 0}}),
		"status-in-data": build(in, nil, 0, []dsc{{0, 16, nx, 1}, {4096, 4097, w, 0}}),
		"no-status":      build(flush, nil, 0, []dsc{{0, 16, 0, 0}}),
		"short-header":   build(flush, nil, 0, []dsc{{0, 8, nx, 1}, {512, 1, w, 0}}),
		"loop":           build(flush, nil, 0, []dsc{{0, 16, nx, 1}, {512, 1, w | nx, 0}}),
		"outside-mem":    build(in, nil, 0, []dsc{{0, 16, nx, 1}, {0xc001, 4096, w | nx, 2}, {512, 1, w, 0}}),
	}
}

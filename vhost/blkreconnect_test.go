package vhost_test

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"vhost-target/bdev"
	"vhost-target/bdev/errbdev"
	"vhost-target/reactor"
	"vhost-target/vhost"
	"vhost-target/vhost/frontend"
)

// TestBlkReconnectResubmitsInflight is TestReconnectResubmitsInflight for a
// blk controller, as QEMU's vhost-user-blk reconnects (it has used the
// inflight area since QEMU 4.0): requests the dead target took and did not
// publish are run again by the next one, exactly once, with the right data.
//
// It failed on 731cc59, whose inflightRegion tracked only vrings >= 2 (right
// for scsi's control and event queues): a blk device's request queues 0 and
// 1 went untracked, and the next target restarted them at the used index
// (completed requests ran again, held ones were lost).
func TestBlkReconnectResubmitsInflight(t *testing.T) {
	const (
		delay = 600 * time.Millisecond
		held  = 4 // writes on queue 0, reads on queue 1
		n     = 4096
	)
	e := newEnv(t, 2, reactor.Adaptive)
	base := e.disk("base", 4<<20, 512)
	// Sectors below 1024 are slow: every request there is held for the delay.
	ed, err := errbdev.New(errbdev.Config{Name: "slow", Base: base, Rules: []errbdev.Rule{
		{Op: bdev.OpWrite, LBAStart: 0, LBACount: 1024, Delay: delay},
		{Op: bdev.OpRead, LBAStart: 0, LBACount: 1024, Delay: delay},
	}})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "b")
	newCtrl := func(logs io.Writer) *vhost.Controller { return blkControllerAt(t, e, sock, ed, 2, logs) }
	logs2 := &syncBuffer{}
	c1 := newCtrl(io.Discard)
	d := dial(t, sock, frontend.Options{Blk: true, NumQueues: 2, Slots: 8, SlotDataSize: n, Inflight: true})
	if fd, f := d.InflightFD(); fd < 0 || f.NumQueues != 2 {
		t.Fatalf("inflight area fd %d %+v", fd, f)
	}
	region := func(sector uint64) []byte { return base.Bytes()[sector*512 : sector*512+n] }
	pattern := func(b byte) []byte { return bytes.Repeat([]byte{b}, n) }
	wq, rq := d.Queue(0), d.Queue(1)
	var writes, reads, fast []*frontend.Slot
	for i := range held {
		sector := uint64(16 * i)
		s := wq.Get()
		copy(s.Data, pattern(byte(0xa0+i)))
		wq.PrepareBlk(s, frontend.BlkTOut, sector, frontend.DirOut, n)
		wq.Submit(s)
		writes = append(writes, s)
		s = wq.Get()
		copy(s.Data, pattern(byte(0xc0+i)))
		wq.PrepareBlk(s, frontend.BlkTOut, 1024+sector, frontend.DirOut, n)
		wq.Submit(s)
		fast = append(fast, s)
		copy(region(512+sector), pattern(byte(0x10+i)))
		s = rq.Get()
		rq.PrepareBlk(s, frontend.BlkTIn, 512+sector, frontend.DirIn, n)
		rq.Submit(s)
		reads = append(reads, s)
		s = rq.Get()
		rq.PrepareBlk(s, frontend.BlkTIn, 1024+sector, frontend.DirIn, n)
		rq.Submit(s)
		fast = append(fast, s)
	}
	wq.Kick()
	rq.Kick()
	fastDone := 0
	eventually(t, "fast requests completed", 2*time.Second, func() bool {
		for _, q := range []*frontend.Queue{wq, rq} {
			q.Reap(func(s *frontend.Slot) {
				if s.BlkStatus() != 0 || !slices.Contains(fast, s) {
					t.Fatalf("completion before the crash: status %d", s.BlkStatus())
				}
				fastDone++
			})
		}
		return fastDone == 2*held
	})
	used0 := []uint16{wq.UsedIdx(), rq.UsedIdx()}
	if err := c1.SimulateCrash(); err != nil {
		t.Fatal(err)
	}
	if wq.UsedIdx() != used0[0] || rq.UsedIdx() != used0[1] {
		t.Fatalf("used idx %d %d after the crash, %v before: a completion was published", wq.UsedIdx(), rq.UsedIdx(), used0)
	}
	for i := range held {
		copy(region(uint64(16*i)), pattern(0xee))
		copy(region(uint64(512+16*i)), pattern(byte(0x50+i)))
	}
	c2 := newCtrl(logs2)
	if err := d.Reconnect(sock); err != nil {
		t.Fatal(err)
	}
	completed := map[*frontend.Slot]int{}
	deadline := time.Now().Add(5 * time.Second)
	for len(completed) < 2*held {
		if time.Now().After(deadline) {
			var got []string
			for i, s := range append(writes, reads...) {
				got = append(got, fmt.Sprintf("%d:%d", i, completed[s]))
			}
			for qi, q := range []*frontend.Queue{wq, rq} {
				for i := uint16(0); i != q.UsedIdx(); i++ {
					id, ln := q.UsedElem(i)
					got = append(got, fmt.Sprintf("q%d used[%d]=%d/%d", qi, i, id, ln))
				}
				got = append(got, fmt.Sprint(q.Err()))
			}
			t.Fatalf("%d of %d held requests completed after the reconnect (%v; used %d %d, avail %d %d); target log:\n%s",
				len(completed), 2*held, got, wq.UsedIdx(), rq.UsedIdx(), wq.AvailIdx(), rq.AvailIdx(), logs2)
		}
		for _, q := range []*frontend.Queue{wq, rq} {
			q.Reap(func(s *frontend.Slot) { completed[s]++ })
		}
		time.Sleep(time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // a second completion would show up here
	for _, q := range []*frontend.Queue{wq, rq} {
		q.Reap(func(s *frontend.Slot) { completed[s]++ })
		if err := q.Err(); err != nil {
			t.Fatalf("used ring: %v", err)
		}
	}
	for i, s := range append(writes, reads...) {
		if completed[s] != 1 || s.BlkStatus() != 0 || s.UsedLen() != uint32(map[bool]int{true: n + 1, false: 1}[i >= held]) {
			t.Fatalf("request %d: completed %d times, status %d, used %d", i, completed[s], s.BlkStatus(), s.UsedLen())
		}
	}
	for i, s := range reads {
		if !bytes.Equal(s.Data[:n], pattern(byte(0x50+i))) {
			t.Fatalf("read %d returned %#x..., want %#x: not read again", i, s.Data[0], 0x50+i)
		}
	}
	for i := range held {
		if !bytes.Equal(region(uint64(16*i)), pattern(byte(0xa0+i))) {
			t.Fatalf("write %d: disk has %#x, want %#x: not written again", i, region(uint64(16 * i))[0], 0xa0+i)
		}
	}
	if st := c2.Stats.Snapshot().LUNs[0]; st.Writes != held || st.Reads != held {
		t.Errorf("new target ran %d writes and %d reads, want %d each", st.Writes, st.Reads, held)
	}
	for i := range held {
		wq.Put(writes[i])
		rq.Put(reads[i])
		wq.Put(fast[2*i])
		rq.Put(fast[2*i+1])
	}
	data := pattern(0x77)
	expectBlk(t, "OUT after the reconnect", doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTOut, Sector: 2048, DataOut: data}), 0, 1)
	r := doBlk(t, d, frontend.BlkCommand{Type: frontend.BlkTIn, Sector: 2048, DataInLen: n, Queue: 1})
	if r.Status != 0 || !bytes.Equal(r.DataIn, data) {
		t.Fatalf("IN after the reconnect: status %d", r.Status)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
}

// blkControllerAt starts a blk controller "b" of nq queues over disk on sock:
// a restarted target is a second one on the same socket.
func blkControllerAt(t *testing.T, e *env, sock string, disk bdev.Bdev, nq int, logs io.Writer) *vhost.Controller {
	t.Helper()
	c, err := vhost.NewController(vhost.Config{Name: "b", Kind: vhost.KindBlk, Disk: disk, SocketPath: sock, NumQueues: nq,
		Reactors: e.r, SocketUID: -1, SocketGID: -1, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Listen(); err != nil {
		t.Fatal(err)
	}
	e.ctrls = append(e.ctrls, c)
	return c
}

package vhost_test

// Goal: a restart of the target is invisible to a guest whose front-end
// reconnects with the inflight area (QEMU 8.2+ vhost-user-scsi, issue 11):
// requests taken and not published when the target "crashed" are executed
// again by the next target and completed exactly once, with the right data,
// and nothing else is run twice or skipped. Method: the Go front-end with
// Options.Inflight; reads and writes held in flight by an error bdev's delay,
// each followed on its ring by a fast request that completes and is
// published before the crash (so the used index alone, which is where QEMU
// restarts a ring, points past held requests and at completed ones: without
// the area the next target would run a completed request again and skip a
// held one);
// Controller.SimulateCrash (no publish, session dropped, bdev IOs finished
// unseen); the disk contents changed behind the dead target's back, so data
// can only be right if the writes were written again and the reads read
// again; a new Controller on the same socket; Device.Reconnect (same guest
// memory, rings and area; SET_VRING_BASE = used idx, as QEMU sends after a
// back-end crash). The front-end's used-ring check fails on a head completed
// twice or one not in flight; Close checks GET_VRING_BASE against what it
// made available.

import (
	"bytes"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"vhost-target/bdev"
	"vhost-target/bdev/errbdev"
	"vhost-target/reactor"
	"vhost-target/vhost"
	"vhost-target/vhost/frontend"
	"vhost-target/vhost/proto"
)

func TestReconnectResubmitsInflight(t *testing.T) {
	t.Run("busy", func(t *testing.T) { reconnectResubmits(t, reactor.Busy) })
	t.Run("adaptive", func(t *testing.T) { reconnectResubmits(t, reactor.Adaptive) })
}

func reconnectController(t *testing.T, e *env, sock string, lunBdev bdev.Bdev, logs io.Writer) *vhost.Controller {
	t.Helper()
	c, err := vhost.NewController(vhost.Config{Name: "c", SocketPath: sock, NumQueues: 2, Reactors: e.r,
		LUNs: []vhost.LUNSpec{lun(0, 0, lunBdev)}, SocketUID: -1, SocketGID: -1,
		Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Listen(); err != nil {
		t.Fatal(err)
	}
	e.ctrls = append(e.ctrls, c)
	return c
}

func reconnectResubmits(t *testing.T, mode reactor.Mode) {
	const (
		delay = 600 * time.Millisecond
		held  = 4 // writes on queue 0, reads on queue 1
		bs    = 512
		n     = 8 // blocks per request
	)
	e := newEnv(t, 2, mode)
	base := e.disk("base", 4<<20, bs)
	// LBAs below 1024 are slow: every request there is held for the delay.
	ed, err := errbdev.New(errbdev.Config{Name: "slow", Base: base, Rules: []errbdev.Rule{
		{Op: bdev.OpWrite, LBAStart: 0, LBACount: 1024, Delay: delay},
		{Op: bdev.OpRead, LBAStart: 0, LBACount: 1024, Delay: delay},
	}})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "c")
	logs1, logs2 := &syncBuffer{}, &syncBuffer{}
	c1 := reconnectController(t, e, sock, ed, logs1)
	d := dial(t, sock, frontend.Options{NumQueues: 2, Slots: 8, SlotDataSize: 4096, Inflight: true})
	if d.ProtocolFeatures()&(1<<proto.PFInflightShmFD) == 0 {
		t.Fatalf("INFLIGHT_SHMFD not negotiated: offered %#x", d.OfferedProtocolFeatures())
	}
	if fd, f := d.InflightFD(); fd < 0 || f.NumQueues != 4 || f.QueueSize != 128 {
		t.Fatalf("inflight area fd %d %+v", fd, f)
	}
	writeRead(t, d, 2000) // fast LBAs: the ordinary path, published before the crash

	region := func(lba uint32) []byte { return base.Bytes()[int(lba)*bs : (int(lba)+n)*bs] }
	pattern := func(b byte) []byte { return bytes.Repeat([]byte{b}, n*bs) }
	wq, rq := d.Queue(0), d.Queue(1)
	used0 := []uint16{wq.UsedIdx(), rq.UsedIdx()}
	var writes, reads, fast []*frontend.Slot
	for i := range held {
		s := wq.Get()
		copy(s.Data, pattern(byte(0xa0+i)))
		wq.Prepare(s, 0, 0, rw10(0x2a, uint32(16*i), n), frontend.DirOut, n*bs)
		wq.Submit(s)
		writes = append(writes, s)
		s = wq.Get()
		copy(s.Data, pattern(byte(0xc0+i)))
		wq.Prepare(s, 0, 0, rw10(0x2a, uint32(1024+16*i), n), frontend.DirOut, n*bs)
		wq.Submit(s)
		fast = append(fast, s)
		copy(region(uint32(512+16*i)), pattern(byte(0x10+i)))
		s = rq.Get()
		rq.Prepare(s, 0, 0, rw10(0x28, uint32(512+16*i), n), frontend.DirIn, n*bs)
		rq.Submit(s)
		reads = append(reads, s)
		s = rq.Get()
		rq.Prepare(s, 0, 0, rw10(0x28, uint32(1024+16*i), n), frontend.DirIn, n*bs)
		rq.Submit(s)
		fast = append(fast, s)
	}
	wq.Kick()
	rq.Kick()
	// The fast requests complete and are published; the slow ones wait.
	fastDone := 0
	eventually(t, "fast requests completed", 2*time.Second, func() bool {
		for _, q := range []*frontend.Queue{wq, rq} {
			q.Reap(func(s *frontend.Slot) {
				if s.Response() != 0 || s.Status() != 0 || !slices.Contains(fast, s) {
					t.Fatalf("completion before the crash: response %d status %#x", s.Response(), s.Status())
				}
				fastDone++
			})
		}
		return fastDone == 2*held
	})
	if st := c1.Stats.Snapshot().LUNs[0]; st.InFlight != 2*held {
		t.Fatalf("%d requests in flight on the bdev before the crash, want %d", st.InFlight, 2*held)
	}
	used0 = []uint16{wq.UsedIdx(), rq.UsedIdx()}

	// The crash: SimulateCrash returns once the held IOs have finished on the
	// bdev, unpublished.
	if err := c1.SimulateCrash(); err != nil {
		t.Fatal(err)
	}
	if wq.UsedIdx() != used0[0] || rq.UsedIdx() != used0[1] {
		t.Fatalf("used idx %d %d after the crash, %v before: a completion was published", wq.UsedIdx(), rq.UsedIdx(), used0)
	}
	if !bytes.Equal(region(0), pattern(0xa0)) {
		t.Fatal("the dead target's held write did not reach the disk")
	}
	// Behind the dead target's back: undo its writes and change what the reads
	// read. Only requests run again by the next target can make these right.
	for i := range held {
		copy(region(uint32(16*i)), pattern(0xee))
		copy(region(uint32(512+16*i)), pattern(byte(0x50+i)))
	}

	c2 := reconnectController(t, e, sock, ed, logs2)
	if err := d.Reconnect(sock); err != nil {
		t.Fatal(err)
	}
	completed := map[*frontend.Slot]int{}
	deadline := time.Now().Add(5 * time.Second)
	for len(completed) < 2*held {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d held requests completed after the reconnect; target log:\n%s", len(completed), 2*held, logs2)
		}
		for _, q := range []*frontend.Queue{wq, rq} {
			q.Reap(func(s *frontend.Slot) { completed[s]++ })
		}
		time.Sleep(time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // a second completion of any of them would show up here
	for _, q := range []*frontend.Queue{wq, rq} {
		q.Reap(func(s *frontend.Slot) { completed[s]++ })
		if err := q.Err(); err != nil {
			t.Fatalf("used ring: %v", err) // a head used twice, or one not in flight
		}
	}
	for i, s := range append(writes, reads...) {
		if completed[s] != 1 || s.Response() != 0 || s.Status() != 0 {
			t.Fatalf("request %d: completed %d times, response %d status %#x", i, completed[s], s.Response(), s.Status())
		}
	}
	// Each queue's used ring holds each held head exactly once since the crash.
	for qi, q := range []*frontend.Queue{wq, rq} {
		seen := map[uint32]bool{}
		for i := used0[qi]; i != q.UsedIdx(); i++ {
			id, _ := q.UsedElem(i)
			if seen[id] {
				t.Fatalf("queue %d: head %d twice in the used ring", qi, id)
			}
			seen[id] = true
		}
		if len(seen) != held {
			t.Fatalf("queue %d: %d used elements since the crash, want %d", qi, len(seen), held)
		}
	}
	for i, s := range reads {
		if !bytes.Equal(s.Data[:n*bs], pattern(byte(0x50+i))) {
			t.Fatalf("read %d returned %#x..., want %#x: not read again", i, s.Data[0], 0x50+i)
		}
	}
	for i := range held {
		if !bytes.Equal(region(uint32(16*i)), pattern(byte(0xa0+i))) {
			t.Fatalf("write %d: disk has %#x, want %#x: not written again", i, region(uint32(16 * i))[0], 0xa0+i)
		}
	}
	if !strings.Contains(logs2.String(), "resuming requests in flight") {
		t.Errorf("no resume line in the new target's log:\n%s", logs2)
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
	// The session goes on: new requests on both queues, then a clean stop
	// whose GET_VRING_BASE must equal what the front-end made available.
	writeRead(t, d, 2100)
	if r := do(t, d, frontend.Command{Queue: 1, CDB: rw10(0x28, 16, n), DataInLen: n * bs}); r.Status != 0 ||
		!bytes.Equal(r.DataIn, pattern(0xa1)) {
		t.Fatalf("read after the reconnect: status %#x data %#x", r.Status, r.DataIn[0])
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestReconnectIdleResetEvents: the area across a guest reset (RESET_DEVICE
// drops it, the next start asks for a new one, as QEMU frees its copy), a
// crash with nothing in flight (the reconnect resumes nothing and the rings
// go on from where they were), and the event ring, which is not tracked: the
// buffers the driver posted before the crash are still there for the next
// target, which delivers a hot-add event into one of them.
func TestReconnectIdleResetEvents(t *testing.T) {
	e := newEnv(t, 1, reactor.Adaptive)
	disk := e.disk("m0", 1<<20, 512)
	sock := filepath.Join(t.TempDir(), "c")
	logs := &syncBuffer{}
	c1 := reconnectController(t, e, sock, disk, logs)
	d := dial(t, sock, frontend.Options{NumQueues: 2, Slots: 4, SlotDataSize: 4096, Inflight: true})
	writeRead(t, d, 10)
	if err := d.Reset(); err != nil {
		t.Fatal(err)
	}
	if fd, _ := d.InflightFD(); fd < 0 {
		t.Fatal("no inflight area after the reset's start")
	}
	writeRead(t, d, 11)
	if err := c1.SimulateCrash(); err != nil {
		t.Fatal(err)
	}
	logs2 := &syncBuffer{}
	c2 := reconnectController(t, e, sock, disk, logs2)
	if err := d.Reconnect(sock); err != nil {
		t.Fatal(err)
	}
	writeRead(t, d, 12)
	writeRead(t, d, 13)
	if err := c2.AddLUN(lun(0, 1, e.disk("m1", 1<<20, 512))); err != nil {
		t.Fatal(err)
	}
	expectEvent(t, "hot-add after the reconnect", d, evTransportReset, 0, 1, reasonRescan)
	if strings.Contains(logs2.String(), "resuming requests") || !strings.Contains(logs2.String(), "inflight area received") {
		t.Errorf("want the area received and nothing resumed:\n%s", logs2)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
}

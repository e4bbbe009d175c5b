package vhost_test

// Runtime LUN management (issue 10) through a real controller and the Go
// front-end. Goal: what a running guest sees when LUNs are added, removed
// and resized: the virtio-scsi event for each (only where the feature was
// negotiated), the unit attention once per session, the new LUN answering
// at once, in-flight I/O to a removed LUN completing before RemoveLUN
// returns, the other LUNs untouched, events beyond the pending bound
// reported as EVENTS_MISSED, and changes racing with sessions that start and
// stop (run with -race -count=20). Method: memory disks, error bdevs that
// hold reads back to keep them in flight, and a bdev wrapper counting open
// channels.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"vhost-target/bdev"
	"vhost-target/bdev/errbdev"
	"vhost-target/reactor"
	"vhost-target/vhost"
	"vhost-target/vhost/dirtylog"
	"vhost-target/vhost/frontend"
	"vhost-target/vhost/proto"
)

// Event codes as the driver reads them (virtio 1.2 §5.6.6.3).
const (
	evTransportReset = 1
	evParamChange    = 3
	evMissed         = 1 << 31
	reasonRescan     = 1
	reasonRemoved    = 2
	reasonCapacity   = 0x2a | 0x09<<8
)

// newController starts a controller on e's reactors with luns and a log
// buffer.
func newController(t *testing.T, e *env, nq, maxSessions int, luns ...vhost.LUNSpec) (*vhost.Controller, string, *syncBuffer) {
	t.Helper()
	return newControllerWith(t, e, nq, maxSessions, nil, luns...)
}

// newControllerWith is newController with change applied to its Config.
func newControllerWith(t *testing.T, e *env, nq, maxSessions int, change func(*vhost.Config), luns ...vhost.LUNSpec) (*vhost.Controller, string, *syncBuffer) {
	t.Helper()
	logs := &syncBuffer{}
	sock := filepath.Join(t.TempDir(), "c")
	cfg := vhost.Config{Name: "c", SocketPath: sock, NumQueues: nq, MaxSessions: maxSessions,
		Reactors: e.r, LUNs: luns, SocketUID: -1, SocketGID: -1, Logger: slog.New(slog.NewTextHandler(logs, nil))}
	if change != nil {
		change(&cfg)
	}
	c, err := vhost.NewController(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Listen(); err != nil {
		t.Fatal(err)
	}
	e.ctrls = append(e.ctrls, c)
	return c, sock, logs
}

func dial(t *testing.T, sock string, o frontend.Options) *frontend.Device {
	t.Helper()
	if o.Timeout == 0 {
		o.Timeout = 5 * time.Second
	}
	d, err := frontend.Dial(sock, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Abort)
	return d
}

// do runs one command and fails the test on a transport error.
func do(t *testing.T, d *frontend.Device, c frontend.Command) *frontend.Response {
	t.Helper()
	r, err := d.Do(c)
	if err != nil {
		t.Fatalf("CDB %x to %d/%d: %v", c.CDB, c.Target, c.LUN, err)
	}
	return r
}

var (
	cdbTUR     = []byte{0, 0, 0, 0, 0, 0}
	cdbInquiry = []byte{0x12, 0, 0, 0, 36, 0}
)

func cdbReportLUNs() []byte { return []byte{0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0} } // 256 bytes

func cdbReadCapacity16() []byte {
	return []byte{0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0}
}

// expectSense checks a CHECK CONDITION with the given sense.
func expectSense(t *testing.T, what string, r *frontend.Response, key, asc, ascq byte) {
	t.Helper()
	k, a, q := r.SenseCode()
	if r.Response != 0 || r.Status != 2 || k != key || a != asc || q != ascq {
		t.Errorf("%s: response %d status %#x sense %x/%#x/%#x, want CHECK CONDITION %x/%#x/%#x",
			what, r.Response, r.Status, k, a, q, key, asc, ascq)
	}
}

func expectGood(t *testing.T, what string, r *frontend.Response) {
	t.Helper()
	if r.Response != 0 || r.Status != 0 {
		k, a, q := r.SenseCode()
		t.Errorf("%s: response %d status %#x sense %x/%#x/%#x, want GOOD", what, r.Response, r.Status, k, a, q)
	}
}

// expectEvent waits for one event and checks it.
func expectEvent(t *testing.T, what string, d *frontend.Device, event uint32, target uint8, lun uint16, reason uint32) {
	t.Helper()
	evs, err := d.WaitEvents(1, 5*time.Second)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if len(evs) != 1 {
		t.Fatalf("%s: %d events, want 1: %+v", what, len(evs), evs)
	}
	e := evs[0]
	if e.Event != event || e.Target != target || e.Lun != lun || e.Reason != reason || e.UsedLen != frontend.EventSize || e.LUN[0] != 1 {
		t.Errorf("%s: event %+v, want event %#x target %d lun %d reason %#x", what, e, event, target, lun, reason)
	}
}

// expectNoEvent checks that nothing arrives for a while.
func expectNoEvent(t *testing.T, what string, d *frontend.Device) {
	t.Helper()
	if evs, _ := d.WaitEvents(1, 100*time.Millisecond); len(evs) != 0 {
		t.Errorf("%s: unexpected events %+v", what, evs)
	}
}

// writeReadLUN writes one block of LUN (target, lun) at lba and reads it
// back, on queue q.
func writeReadLUN(t *testing.T, d *frontend.Device, target uint8, lun uint16, q int, lba uint32) {
	t.Helper()
	data := bytes.Repeat([]byte{byte(lba), byte(lun)}, 256)
	r := do(t, d, frontend.Command{Target: target, LUN: lun, Queue: q, CDB: rw10(0x2a, lba, 1), DataOut: data})
	expectGood(t, fmt.Sprintf("write %d/%d lba %d", target, lun, lba), r)
	r = do(t, d, frontend.Command{Target: target, LUN: lun, Queue: q, CDB: rw10(0x28, lba, 1), DataInLen: 512})
	expectGood(t, fmt.Sprintf("read %d/%d lba %d", target, lun, lba), r)
	if !bytes.Equal(r.DataIn, data) {
		t.Errorf("read %d/%d lba %d: other data", target, lun, lba)
	}
}

// reportedLUNs returns the LUN numbers REPORT LUNS to (target, 0) lists.
func reportedLUNs(t *testing.T, d *frontend.Device, target uint8) []uint16 {
	t.Helper()
	r := do(t, d, frontend.Command{Target: target, CDB: cdbReportLUNs(), DataInLen: 256})
	expectGood(t, "REPORT LUNS", r)
	n := binary.BigEndian.Uint32(r.DataIn[0:4]) / 8
	var out []uint16
	for i := uint32(0); i < n; i++ {
		e := r.DataIn[8+8*i:]
		out = append(out, (uint16(e[0])<<8|uint16(e[1]))&0x3fff)
	}
	return out
}

// countBdev counts the channels open on a bdev, so tests see every channel
// of a removed LUN closed.
type countBdev struct {
	bdev.Bdev
	open atomic.Int32
}

func (c *countBdev) Open() (bdev.Channel, error) {
	ch, err := c.Bdev.Open()
	if err != nil {
		return nil, err
	}
	c.open.Add(1)
	return &countChan{Channel: ch, c: c}, nil
}

type countChan struct {
	bdev.Channel
	c      *countBdev
	closed bool
}

func (ch *countChan) Close() error {
	if err := ch.Channel.Close(); err != nil {
		return err
	}
	if !ch.closed {
		ch.closed = true
		ch.c.open.Add(-1)
	}
	return nil
}

// EventFD passes the Waker through, as the wrapped channel may have one.
func (ch *countChan) EventFD() int {
	if w, ok := ch.Channel.(bdev.Waker); ok {
		return w.EventFD()
	}
	return -1
}

// TestEmptyController: a controller made with no LUNs serves a front-end
// (BAD_TARGET for every target), takes a LUN at runtime that the running
// session sees at once with a RESCAN event, and serves a second front-end
// after the first leaves.
func TestEmptyController(t *testing.T) {
	e := newEnv(t, 1, reactor.Busy)
	c, sock, _ := newController(t, e, 1, 1)
	if l := c.LUNs(); len(l) != 0 {
		t.Fatalf("LUNs of an empty controller: %v", l)
	}
	d := dial(t, sock, frontend.Options{})
	for _, tg := range []uint8{0, 7, 255} {
		if r := do(t, d, frontend.Command{Target: tg, CDB: cdbInquiry, DataInLen: 36}); r.Response != 3 {
			t.Errorf("INQUIRY to target %d of an empty controller: response %d, want BAD_TARGET", tg, r.Response)
		}
	}
	disk := e.disk("m0", 1<<20, 512)
	if err := c.AddLUN(lun(2, 0, disk)); err != nil {
		t.Fatal(err)
	}
	expectEvent(t, "hot-add to an empty controller", d, evTransportReset, 2, 0, reasonRescan)
	writeReadLUN(t, d, 2, 0, 0, 3)
	if got := c.LUNs(); len(got) != 1 || got[0].Target != 2 || got[0].LUN != 0 || got[0].Bdev != disk {
		t.Errorf("LUNs = %+v", got)
	}
	// A LUN above 255 is addressed in the event as in REPORT LUNS (flat
	// space, 0x40 in byte 2), as QEMU does and Linux expects.
	if err := c.AddLUN(lun(2, 300, e.disk("m300", 1<<20, 512))); err != nil {
		t.Fatal(err)
	}
	evs, err := d.WaitEvents(1, 5*time.Second)
	if err != nil || len(evs) != 1 || evs[0].LUN != [8]byte{1, 2, 0x41, 0x2c} || evs[0].Reason != reasonRescan {
		t.Fatalf("event for LUN 300: %+v %v", evs, err)
	}
	r := do(t, d, frontend.Command{Target: 2, CDB: cdbReportLUNs(), DataInLen: 256})
	if !bytes.Equal(r.DataIn[16:18], []byte{0x41, 0x2c}) {
		t.Errorf("REPORT LUNS entry of LUN 300: % x", r.DataIn[16:24])
	}
	writeReadLUN(t, d, 2, 300, 0, 5)
	if got := c.LUNs(); len(got) != 2 || got[1].LUN != 300 {
		t.Errorf("LUNs = %+v", got)
	}
	d.Close()
	d2 := dial(t, sock, frontend.Options{})
	writeReadLUN(t, d2, 2, 0, 0, 4)
}

// TestHotAdd: while a session writes and reads LUN 0 on one queue, a LUN is
// added at target 0 LUN 1 and another at target 5. The session gets one
// RESCAN event per LUN, the new LUNs answer INQUIRY, READ and WRITE on both
// queues at once, REPORT LUNS lists LUN 1, LUN 0 reports REPORTED LUNS DATA
// HAS CHANGED once (the I/O loop absorbs it, as Linux retries it), and the
// metrics list the new LUNs. Adding at a taken address fails.
func TestHotAdd(t *testing.T) {
	for _, mode := range []reactor.Mode{reactor.Busy, reactor.Adaptive} {
		t.Run(fmt.Sprintf("mode%d", mode), func(t *testing.T) { hotAdd(t, mode) })
	}
}

func hotAdd(t *testing.T, mode reactor.Mode) {
	e := newEnv(t, 2, mode)
	d0 := e.disk("m0", 4<<20, 512)
	c, sock, _ := newController(t, e, 2, 1, lun(0, 0, d0))
	d := dial(t, sock, frontend.Options{NumQueues: 2, RetryUnitAttention: true})

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var ios atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		for lba := uint32(0); ; lba = (lba + 1) % 64 {
			select {
			case <-stop:
				return
			default:
			}
			writeReadLUN(t, d, 0, 0, 1, lba)
			ios.Add(1)
		}
	}()
	waitIOs := func() {
		for n := ios.Load(); ios.Load() < n+3; {
			time.Sleep(time.Millisecond)
		}
	}
	waitIOs()
	d1 := &countBdev{Bdev: e.disk("m1", 2<<20, 512)}
	if err := c.AddLUN(lun(0, 1, d1)); err != nil {
		t.Fatal(err)
	}
	expectEvent(t, "hot-add of 0/1", d, evTransportReset, 0, 1, reasonRescan)
	r := do(t, d, frontend.Command{Target: 0, LUN: 1, CDB: cdbInquiry, DataInLen: 36})
	expectGood(t, "INQUIRY of the new LUN", r)
	if r.DataIn[0] != 0 {
		t.Errorf("INQUIRY of the new LUN: peripheral byte %#x, want a present disk (0)", r.DataIn[0])
	}
	writeReadLUN(t, d, 0, 1, 0, 9)
	if got := reportedLUNs(t, d, 0); len(got) != 2 || got[0] != 0 || got[1] != 1 {
		t.Errorf("REPORT LUNS after the hot-add: %v", got)
	}
	d5 := e.disk("m5", 1<<20, 4096)
	if err := c.AddLUN(lun(5, 0, d5)); err != nil {
		t.Fatal(err)
	}
	expectEvent(t, "hot-add of 5/0", d, evTransportReset, 5, 0, reasonRescan)
	r = do(t, d, frontend.Command{Target: 5, CDB: cdbReadCapacity16(), DataInLen: 32})
	expectGood(t, "READ CAPACITY(16) of 5/0", r)
	if last, bs := binary.BigEndian.Uint64(r.DataIn), binary.BigEndian.Uint32(r.DataIn[8:]); last != 255 || bs != 4096 {
		t.Errorf("READ CAPACITY(16) of 5/0: last LBA %d block %d", last, bs)
	}
	waitIOs()
	close(stop)
	wg.Wait()

	// The LUN-0 loop met REPORTED LUNS DATA HAS CHANGED once, for the one
	// LUN added to its target.
	uas := d.UnitAttentions()
	if len(uas) != 1 || uas[0] != (frontend.UnitAttention{Target: 0, LUN: 0, ASC: 0x3f, ASCQ: 0x0e}) {
		t.Errorf("unit attentions seen by LUN 0: %+v, want one 3F/0E", uas)
	}
	if r := do(t, d, frontend.Command{Target: 0, LUN: 1, CDB: cdbTUR}); r.IsUnitAttention() {
		t.Errorf("the new LUN reports a unit attention: %x", r.Sense)
	}
	if err := c.AddLUN(lun(0, 1, e.disk("m9", 1<<20, 512))); err == nil {
		t.Error("AddLUN at a taken address succeeded")
	}
	if err := c.AddLUN(lun(0, 16384, d5)); err == nil {
		t.Error("AddLUN of LUN 16384 succeeded")
	}
	snap := c.Stats.Snapshot()
	if len(snap.LUNs) != 3 || snap.LUNs[1].LUN != 1 || snap.LUNs[1].Bdev != "m1" || snap.LUNs[1].Writes != 1 || snap.LUNs[2].Target != 5 {
		t.Errorf("metrics after hot-adds: %+v", snap.LUNs)
	}
	d.Close()
	if n := d1.open.Load(); n != 0 {
		t.Errorf("%d channels of the added LUN open after the session closed", n)
	}
}

// TestHotRemove: reads to LUN 1 are held in flight by an error bdev when
// LUN 1 is removed. New commands to it get LOGICAL UNIT NOT SUPPORTED at
// once, RemoveLUN returns only after the held reads completed (with GOOD
// and their data) and every channel of the LUN is closed, then the REMOVED
// event arrives; LUN 0 keeps working (after one REPORTED LUNS DATA HAS
// CHANGED), the metrics forget LUN 1, and removing the last LUN of a target
// makes it answer BAD_TARGET.
func TestHotRemove(t *testing.T) {
	for _, mode := range []reactor.Mode{reactor.Busy, reactor.Adaptive} {
		t.Run(fmt.Sprintf("mode%d", mode), func(t *testing.T) { hotRemove(t, mode) })
	}
}

func hotRemove(t *testing.T, mode reactor.Mode) {
	const delay = 300 * time.Millisecond
	e := newEnv(t, 2, mode)
	d0 := e.disk("m0", 1<<20, 512)
	base := e.disk("base", 1<<20, 512)
	for i := range base.Bytes() {
		base.Bytes()[i] = 0x77
	}
	ed, err := errbdev.New(errbdev.Config{Name: "slow", Base: base, Rules: []errbdev.Rule{{Op: bdev.OpRead, Delay: delay}}})
	if err != nil {
		t.Fatal(err)
	}
	slow := &countBdev{Bdev: ed}
	d2 := e.disk("m2", 1<<20, 512)
	c, sock, logs := newController(t, e, 2, 1, lun(0, 0, d0), lun(0, 1, slow), lun(1, 0, d2))
	d := dial(t, sock, frontend.Options{NumQueues: 2, Slots: 8, SlotDataSize: 4096})
	eventually(t, "a channel of LUN 1 per queue", 2*time.Second, func() bool { return slow.open.Load() == 2 })

	// Eight reads held by the error bdev, on queue 0.
	q := d.Queue(0)
	const held = 8
	for i := 0; i < held; i++ {
		s := q.Get()
		q.Prepare(s, 0, 1, rw10(0x28, uint32(i), 8), frontend.DirIn, 4096)
		q.Submit(s)
	}
	q.Kick()
	eventually(t, "reads in flight", 2*time.Second, func() bool {
		for _, l := range c.Stats.Snapshot().LUNs {
			if l.LUN == 1 && l.InFlight == held {
				return true
			}
		}
		return false
	})
	t0 := time.Now()
	removed := make(chan error, 1)
	go func() { removed <- c.RemoveLUN(0, 1) }()

	// The LUN is gone for new commands at once (queue 1; queue 0 has the
	// held reads, which this goroutine reaps below).
	eventually(t, "LUN 1 gone from the table", time.Second, func() bool { return len(c.LUNs()) == 2 })
	r := do(t, d, frontend.Command{Target: 0, LUN: 1, Queue: 1, CDB: rw10(0x28, 0, 1), DataInLen: 512})
	expectSense(t, "READ of the LUN being removed", r, 0x5, 0x25, 0)
	r = do(t, d, frontend.Command{Target: 0, LUN: 1, Queue: 1, CDB: cdbInquiry, DataInLen: 36})
	if r.Status != 0 || r.DataIn[0] != 0x7f {
		t.Errorf("INQUIRY of the removed LUN: status %#x peripheral %#x, want GOOD and 0x7f (PQ 3, no device)", r.Status, r.DataIn[0])
	}
	select {
	case err := <-removed:
		t.Fatalf("RemoveLUN returned after %v with %d reads held for %v: %v", time.Since(t0), held, delay, err)
	default:
	}
	if evs := d.Events(); len(evs) != 0 {
		t.Errorf("events before the held reads completed: %+v", evs)
	}

	done := 0
	deadline := time.Now().Add(5 * time.Second)
	for done < held && time.Now().Before(deadline) {
		q.Reap(func(s *frontend.Slot) {
			done++
			if s.Response() != 0 || s.Status() != 0 || s.Data[0] != 0x77 {
				t.Errorf("held read: response %d status %#x sense %x data %#x", s.Response(), s.Status(), s.Sense(), s.Data[0])
			}
			q.Put(s)
		})
		time.Sleep(time.Millisecond)
	}
	if done != held {
		t.Fatalf("%d of %d held reads completed", done, held)
	}
	if err := <-removed; err != nil {
		t.Fatal(err)
	}
	if took := time.Since(t0); took < delay/2 {
		t.Errorf("RemoveLUN returned after %v, before the held reads could complete", took)
	}
	if n := slow.open.Load(); n != 0 {
		t.Errorf("%d channels of the removed LUN still open after RemoveLUN returned", n)
	}
	expectEvent(t, "hot-remove of 0/1", d, evTransportReset, 0, 1, reasonRemoved)
	expectSense(t, "READ of the removed LUN", do(t, d, frontend.Command{Target: 0, LUN: 1, CDB: rw10(0x28, 0, 1), DataInLen: 512}),
		0x5, 0x25, 0)

	// LUN 0: one unit attention for the changed inventory, then as before.
	expectSense(t, "LUN 0 after the remove", do(t, d, frontend.Command{CDB: cdbTUR}), 0x6, 0x3f, 0x0e)
	writeReadLUN(t, d, 0, 0, 0, 5)
	writeReadLUN(t, d, 0, 0, 1, 6)
	if got := reportedLUNs(t, d, 0); len(got) != 1 || got[0] != 0 {
		t.Errorf("REPORT LUNS after the remove: %v", got)
	}
	// Target 1 lost no LUN: no unit attention there.
	expectGood(t, "target 1 after a remove on target 0", do(t, d, frontend.Command{Target: 1, CDB: cdbTUR}))
	snap := c.Stats.Snapshot()
	for _, l := range snap.LUNs {
		if l.Target == 0 && l.LUN == 1 {
			t.Errorf("metrics still list the removed LUN: %+v", l)
		}
	}
	if len(snap.LUNs) != 2 {
		t.Errorf("metrics list %d LUNs, want 2", len(snap.LUNs))
	}

	// The last LUN of target 1: the target is gone.
	if err := c.RemoveLUN(1, 0); err != nil {
		t.Fatal(err)
	}
	expectEvent(t, "hot-remove of 1/0", d, evTransportReset, 1, 0, reasonRemoved)
	if r := do(t, d, frontend.Command{Target: 1, CDB: cdbInquiry, DataInLen: 36}); r.Response != 3 {
		t.Errorf("INQUIRY to an emptied target: response %d, want BAD_TARGET", r.Response)
	}
	if err := c.RemoveLUN(1, 0); err == nil {
		t.Error("removing a LUN twice succeeded")
	}
	// The slot is free for a new LUN, which starts with fresh counters.
	if err := c.AddLUN(lun(0, 1, d2)); err != nil {
		t.Fatal(err)
	}
	expectEvent(t, "hot-add at the freed slot", d, evTransportReset, 0, 1, reasonRescan)
	writeReadLUN(t, d, 0, 1, 1, 7)
	for _, l := range c.Stats.Snapshot().LUNs {
		if l.LUN == 1 && (l.Reads != 1 || l.Writes != 1 || l.Bdev != "m2") {
			t.Errorf("re-added LUN counters: %+v", l)
		}
	}
	if s := logs.String(); bytes.Contains([]byte(s), []byte("level=WARN")) || bytes.Contains([]byte(s), []byte("level=ERROR")) {
		t.Errorf("warnings logged:\n%s", s)
	}
}

// TestResize: a LUN's bdev grows under two sessions, one with
// VIRTIO_SCSI_F_CHANGE and one without. Each session gets UNIT ATTENTION
// CAPACITY DATA HAS CHANGED once, on whichever queue sends first and not on
// INQUIRY or REPORT LUNS; READ CAPACITY gives the new size and the new
// blocks can be written; only the CHANGE session gets the PARAM_CHANGE
// event. A shrink of the open bdev is refused and changes nothing. Both
// sessions get the RESCAN of a LUN added later (both negotiated HOTPLUG).
func TestResize(t *testing.T) {
	e := newEnv(t, 2, reactor.Busy)
	disk := e.disk("m0", 1<<20, 512)
	c, sock, _ := newController(t, e, 2, 2, lun(0, 0, disk))
	withChange := dial(t, sock, frontend.Options{NumQueues: 2})
	noChange := dial(t, sock, frontend.Options{NumQueues: 2, AckFeatures: func(offered uint64) uint64 {
		return offered &^ (1<<proto.FVirtioSCSIChange | 1<<proto.FRingEventIdx)
	}})
	if withChange.Features()&(1<<proto.FVirtioSCSIChange) == 0 || noChange.Features()&(1<<proto.FVirtioSCSIChange) != 0 {
		t.Fatalf("features %#x and %#x", withChange.Features(), noChange.Features())
	}
	if err := disk.Resize(3 << 20); err != nil {
		t.Fatal(err)
	}
	if err := c.CapacityChanged(disk); err != nil {
		t.Fatal(err)
	}
	expectEvent(t, "PARAM_CHANGE", withChange, evParamChange, 0, 0, reasonCapacity)
	expectNoEvent(t, "session without CHANGE", noChange)

	for _, d := range []*frontend.Device{withChange, noChange} {
		// Not reported by INQUIRY or REPORT LUNS, still pending after them.
		expectGood(t, "INQUIRY after the resize", do(t, d, frontend.Command{CDB: cdbInquiry, DataInLen: 36}))
		reportedLUNs(t, d, 0)
		expectSense(t, "first command after the resize", do(t, d, frontend.Command{Queue: 1, CDB: cdbTUR}), 0x6, 0x2a, 0x09)
		expectGood(t, "same session, other queue", do(t, d, frontend.Command{Queue: 0, CDB: cdbTUR}))
		expectGood(t, "same session, same queue", do(t, d, frontend.Command{Queue: 1, CDB: cdbTUR}))
		r := do(t, d, frontend.Command{CDB: cdbReadCapacity16(), DataInLen: 32})
		if last := binary.BigEndian.Uint64(r.DataIn); r.Status != 0 || last != 3<<20/512-1 {
			t.Errorf("READ CAPACITY(16) after the resize: status %#x last LBA %d", r.Status, last)
		}
		writeReadLUN(t, d, 0, 0, 0, 3<<20/512-1)
	}

	// REQUEST SENSE reports and clears the next one.
	if err := disk.Resize(4 << 20); err != nil {
		t.Fatal(err)
	}
	if err := c.CapacityChanged(disk); err != nil {
		t.Fatal(err)
	}
	r := do(t, noChange, frontend.Command{CDB: []byte{0x03, 0, 0, 0, 18, 0}, DataInLen: 18})
	if r.Status != 0 || r.DataIn[2]&0xf != 6 || r.DataIn[12] != 0x2a || r.DataIn[13] != 9 {
		t.Errorf("REQUEST SENSE with a pending UA: status %#x data %x", r.Status, r.DataIn)
	}
	expectGood(t, "after REQUEST SENSE", do(t, noChange, frontend.Command{CDB: cdbTUR}))
	expectEvent(t, "second PARAM_CHANGE", withChange, evParamChange, 0, 0, reasonCapacity)

	if err := disk.Resize(1 << 20); !errors.Is(err, bdev.ErrInUse) {
		t.Errorf("shrink of a bdev in use: %v, want ErrInUse", err)
	}
	r = do(t, withChange, frontend.Command{Queue: 1, CDB: cdbReadCapacity16(), DataInLen: 32})
	expectSense(t, "UA after the second resize", r, 0x6, 0x2a, 0x09)
	r = do(t, withChange, frontend.Command{Queue: 1, CDB: cdbReadCapacity16(), DataInLen: 32})
	if last := binary.BigEndian.Uint64(r.DataIn); last != 4<<20/512-1 {
		t.Errorf("a refused shrink changed the capacity: last LBA %d", last)
	}

	if err := c.AddLUN(lun(0, 3, e.disk("m3", 1<<20, 512))); err != nil {
		t.Fatal(err)
	}
	for _, d := range []*frontend.Device{withChange, noChange} {
		expectEvent(t, "RESCAN to each session", d, evTransportReset, 0, 3, reasonRescan)
		expectSense(t, "LUN inventory changed", do(t, d, frontend.Command{CDB: cdbTUR}), 0x6, 0x3f, 0x0e)
	}
	// A bdev no LUN uses: nothing happens.
	if err := c.CapacityChanged(e.disk("unused", 1<<20, 512)); err != nil {
		t.Error(err)
	}
}

// TestNoHotplugNoEvents: a front-end that acks neither HOTPLUG nor CHANGE
// gets no event; the LUN changes still show in its commands.
func TestNoHotplugNoEvents(t *testing.T) {
	e := newEnv(t, 1, reactor.Busy)
	disk := e.disk("m0", 1<<20, 512)
	c, sock, _ := newController(t, e, 1, 1, lun(0, 0, disk))
	d := dial(t, sock, frontend.Options{AckFeatures: func(offered uint64) uint64 {
		return offered &^ (1<<proto.FVirtioSCSIChange | 1<<proto.FVirtioSCSIHotplug)
	}})
	if err := c.AddLUN(lun(0, 1, e.disk("m1", 1<<20, 512))); err != nil {
		t.Fatal(err)
	}
	disk.Resize(2 << 20)
	c.CapacityChanged(disk)
	if err := c.RemoveLUN(0, 1); err != nil {
		t.Fatal(err)
	}
	expectNoEvent(t, "no HOTPLUG, no CHANGE", d)
	expectSense(t, "resized LUN", do(t, d, frontend.Command{CDB: cdbTUR}), 0x6, 0x2a, 0x09)
	expectSense(t, "then the inventory", do(t, d, frontend.Command{CDB: cdbTUR}), 0x6, 0x3f, 0x0e)
	expectGood(t, "then nothing", do(t, d, frontend.Command{CDB: cdbTUR}))
}

// TestEventsMissed: events raised while the driver has not started its
// event ring wait for it, up to the bound; past it they are dropped and the
// first event delivered carries VIRTIO_SCSI_T_EVENTS_MISSED, the others not.
func TestEventsMissed(t *testing.T) {
	e := newEnv(t, 1, reactor.Busy)
	disk := e.disk("m0", 1<<20, 512)
	c, sock, _ := newController(t, e, 1, 1, lun(0, 0, disk))
	d, err := frontend.NewUnstarted(sock, frontend.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Abort()
	if err := d.Negotiate(); err != nil {
		t.Fatal(err)
	}
	if err := d.SetFeatures(d.OfferedFeatures() &^ (1 << proto.FRingEventIdx)); err != nil {
		t.Fatal(err)
	}
	if err := d.SetMemTable(); err != nil {
		t.Fatal(err)
	}
	for _, i := range []int{0, 2} { // no event ring yet
		if err := d.StartRing(i); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.EnableRings(true); err != nil {
		t.Fatal(err)
	}
	const raised = 70 // more than the target keeps (64)
	for i := 0; i < raised; i++ {
		if err := c.CapacityChanged(disk); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.StartRing(frontend.EventVring); err != nil {
		t.Fatal(err)
	}
	if err := d.SetVringEnable(frontend.EventVring, true); err != nil {
		t.Fatal(err)
	}
	if err := d.PostEvents(); err != nil {
		t.Fatal(err)
	}
	evs, err := d.WaitEvents(64, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	expectNoEvent(t, "past the 64 kept", d)
	for i, ev := range evs {
		want := uint32(evParamChange)
		if i == 0 {
			want |= evMissed
		}
		if ev.Event != want || ev.Reason != reasonCapacity || ev.Target != 0 || ev.Lun != 0 {
			t.Errorf("event %d: %+v, want event %#x", i, ev, want)
		}
	}
	// After the overflow is reported, events are plain again.
	c.CapacityChanged(disk)
	expectEvent(t, "after the overflow", d, evParamChange, 0, 0, reasonCapacity)
	if err := d.Close(); err != nil {
		t.Error(err)
	}
}

// TestEventsAcrossReset: an event raised while the event ring is stopped
// is delivered when it restarts; a device reset drops what is pending (the
// driver rescans after a reset).
func TestEventsAcrossReset(t *testing.T) {
	e := newEnv(t, 1, reactor.Busy)
	c, sock, _ := newController(t, e, 1, 1, lun(0, 0, e.disk("m0", 1<<20, 512)))
	d := dial(t, sock, frontend.Options{})
	if _, err := d.GetVringBase(frontend.EventVring); err != nil { // stops the event ring
		t.Fatal(err)
	}
	if err := c.AddLUN(lun(0, 1, e.disk("m1", 1<<20, 512))); err != nil {
		t.Fatal(err)
	}
	if err := d.StartRing(frontend.EventVring); err != nil {
		t.Fatal(err)
	}
	// The buffers posted at the start are still in the ring.
	expectEvent(t, "after the event ring restarted", d, evTransportReset, 0, 1, reasonRescan)
	if err := d.Reset(); err != nil {
		t.Fatal(err)
	}
	expectNoEvent(t, "right after a reset", d)
}

// TestLUNChurnWithSessions races LUN changes with sessions starting,
// doing I/O and stopping (and being killed): every command gets an answer
// that fits some table version (GOOD, LOGICAL UNIT NOT SUPPORTED, BAD_TARGET
// or a unit attention), nothing leaks a channel, and nothing races (-race).
// Run it with -count=20.
func TestLUNChurnWithSessions(t *testing.T) {
	e := newEnv(t, 2, reactor.Adaptive)
	d0 := e.disk("m0", 1<<20, 512)
	churn := &countBdev{Bdev: e.disk("churn", 1<<20, 512)}
	size := &countBdev{Bdev: e.disk("size", 1<<20, 512)}
	c, sock, logs := newController(t, e, 2, 2, lun(0, 0, d0), lun(1, 0, size))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var failures atomic.Int32
	fail := func(format string, a ...any) {
		if failures.Add(1) <= 5 {
			t.Errorf(format, a...)
		}
	}
	for g := 0; g < 2; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				d, err := frontend.Dial(sock, frontend.Options{NumQueues: 2, Timeout: 5 * time.Second})
				if err != nil {
					fail("session %d.%d: %v", g, i, err)
					return
				}
				for k := 0; k < 6; k++ {
					for _, a := range []struct {
						target uint8
						lun    uint16
					}{{0, 0}, {0, 1}, {1, 0}, {2, 0}} {
						r, err := d.Do(frontend.Command{Target: a.target, LUN: a.lun, Queue: k % 2, CDB: rw10(0x28, uint32(k), 1), DataInLen: 512})
						if err != nil {
							fail("session %d.%d: %v", g, i, err)
							d.Abort()
							return
						}
						key, asc, _ := r.SenseCode()
						ok := r.Response == 0 && r.Status == 0 ||
							r.Response == 3 && a.target == 2 ||
							r.Response == 0 && r.Status == 2 && (key == 6 || key == 5 && asc == 0x25 && a.lun == 1 ||
								key == 5 && asc == 0x21 && a.target == 1) // a read past an end seen before a resize
						if !ok {
							fail("session %d.%d: %d/%d: response %d status %#x sense %x/%#x", g, i, a.target, a.lun, r.Response, r.Status, key, asc)
						}
					}
				}
				d.Events()
				if i%3 == 2 {
					d.Abort() // killed, as QEMU under SIGKILL
				} else if err := d.Close(); err != nil {
					fail("session %d.%d close: %v", g, i, err)
				}
			}
		}(g)
	}
	deadline := time.Now().Add(time.Second)
	if testing.Short() {
		deadline = time.Now().Add(300 * time.Millisecond)
	}
	added := 0
	for n := 0; time.Now().Before(deadline); n++ {
		if err := c.AddLUN(lun(0, 1, churn)); err != nil {
			t.Fatal(err)
		}
		added++
		if err := c.AddLUN(lun(2, 0, d0)); err != nil {
			t.Fatal(err)
		}
		if n%4 == 0 {
			c.CapacityChanged(size.Bdev)
		}
		time.Sleep(time.Duration(n%3) * time.Millisecond)
		if err := c.RemoveLUN(0, 1); err != nil {
			t.Fatal(err)
		}
		if n := churn.open.Load(); n != 0 {
			t.Fatalf("%d channels of the removed LUN open after RemoveLUN", n)
		}
		if err := c.RemoveLUN(2, 0); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	c.Close()
	if n := size.open.Load(); n != 0 {
		t.Errorf("%d channels open after the controller closed", n)
	}
	if s := logs.String(); bytes.Contains([]byte(s), []byte("level=ERROR")) {
		t.Errorf("errors logged:\n%s", s)
	}
	t.Logf("%d adds and removes", added)
}

// TestControllerCloseFreesQueues: closing a controller (vhost_delete_controller)
// with a session running stops its queues on their reactors and closes every
// channel, removes the socket, and a new controller on the same path takes a
// new front-end at once.
func TestControllerCloseFreesQueues(t *testing.T) {
	e := newEnv(t, 2, reactor.Adaptive)
	disk := &countBdev{Bdev: e.disk("m0", 1<<20, 512)}
	c, sock, _ := newController(t, e, 2, 1, lun(0, 0, disk))
	d := dial(t, sock, frontend.Options{NumQueues: 2, Timeout: 300 * time.Millisecond})
	writeReadLUN(t, d, 0, 0, 1, 1)
	eventually(t, "a channel per queue", 2*time.Second, func() bool { return disk.open.Load() == 2 })
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if n := disk.open.Load(); n != 0 {
		t.Errorf("%d channels open after Close", n)
	}
	if _, err := d.Do(frontend.Command{CDB: cdbTUR}); err == nil {
		t.Error("a command after the controller closed was answered")
	}
	c2, err := vhost.NewController(vhost.Config{Name: "c2", SocketPath: sock, NumQueues: 1, Reactors: e.r, SocketUID: -1, SocketGID: -1,
		LUNs: []vhost.LUNSpec{lun(0, 0, disk)}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := c2.Listen(); err != nil {
		t.Fatal(err)
	}
	e.ctrls = append(e.ctrls, c2)
	d2 := dial(t, sock, frontend.Options{})
	writeReadLUN(t, d2, 0, 0, 0, 1)
}

// TestIOPathNoAllocs: a READ through the whole target (virtqueue,
// virtio-scsi, LUN table, unit attention check, SCSI, malloc bdev, used
// ring) allocates nothing, with a table that changed at runtime and a
// session that has unit attention flags (so the per-command check takes its
// slow path). Allocations are counted in the whole process: reactor and
// front-end. Two ways: testing.AllocsPerRun, which runs with GOMAXPROCS 1,
// where a busy reactor would hold the only P for a whole time slice per
// request, so with an adaptive reactor that sleeps in epoll between
// requests (its sleep is covered too; not under -race, where the buffers of
// the eventfd reads around that sleep escape to the heap: reactor.sleep and
// queue.Disarm, measured); and the process's malloc count over 2000
// requests on a busy reactor, which runs under -race as well.
func TestIOPathNoAllocs(t *testing.T) {
	for _, v := range []struct {
		name              string
		inflight, logging bool
	}{
		{"", false, false},
		{"-inflight", true, false}, // INFLIGHT_SHMFD negotiated: every request marked and cleared in the area
		{"-logging", false, true},  // a live migration: every request's pages and used ring marked in the log
	} {
		name, inflight, logging := v.name, v.inflight, v.logging
		t.Run("adaptive"+name, func(t *testing.T) {
			if raceEnabled {
				t.Skip("in a -race build the 8-byte buffers of the eventfd reads around an epoll sleep escape to the heap")
			}
			q, run, bad := allocsTarget(t, reactor.Adaptive, inflight, logging)
			if n := testing.AllocsPerRun(1000, run); n != 0 {
				t.Errorf("a READ through the target allocates %v per request", n)
			}
			if *bad != 0 || q.Inflight() != 0 {
				t.Errorf("%d reads failed, %d in flight", *bad, q.Inflight())
			}
		})
		t.Run("busy"+name, func(t *testing.T) {
			q, run, bad := allocsTarget(t, reactor.Busy, inflight, logging)
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			for i := 0; i < 20000; i++ {
				run()
			}
			runtime.ReadMemStats(&after)
			// Mallocs counts the whole process (ReadMemStats itself, the
			// runtime and test goroutines on a loaded machine): a few dozen
			// are noise, one per request would be 20000.
			if n := after.Mallocs - before.Mallocs; n > 100 {
				t.Errorf("20000 READs through the target made %d allocations", n)
			}
			if *bad != 0 || q.Inflight() != 0 {
				t.Errorf("%d reads failed, %d in flight", *bad, q.Inflight())
			}
		})
	}
}

// allocsTarget starts a controller whose table and unit attention state
// changed at runtime, and returns a function that runs one READ of LUN 1.
func allocsTarget(t *testing.T, mode reactor.Mode, inflight, logging bool) (*frontend.Queue, func(), *int) {
	e := newEnv(t, 1, mode)
	d0, d1 := e.disk("m0", 1<<20, 512), e.disk("m1", 1<<20, 512)
	c, sock, _ := newControllerWith(t, e, 1, 1, func(c *vhost.Config) { c.Migration = logging }, lun(0, 0, d0))
	o := frontend.Options{Slots: 4, SlotDataSize: 4096, Inflight: inflight}
	if logging {
		o.ProtocolMask = 1<<proto.PFMQ | 1<<proto.PFReplyAck | 1<<proto.PFLogShmFD
	}
	dev := dial(t, sock, o)
	if fd, _ := dev.InflightFD(); inflight != (fd >= 0) {
		t.Fatalf("inflight area fd %d with Options.Inflight %v", fd, inflight)
	}
	var log *dirtylog.Log
	if logging {
		log, _ = giveLog(t, dev)
		setLogging(t, dev, true)
	}
	if err := c.AddLUN(lun(0, 1, d1)); err != nil {
		t.Fatal(err)
	}
	if err := d1.Resize(2 << 20); err != nil {
		t.Fatal(err)
	}
	if err := c.CapacityChanged(d1); err != nil {
		t.Fatal(err)
	}
	expectSense(t, "UA", do(t, dev, frontend.Command{LUN: 1, CDB: cdbTUR}), 0x6, 0x2a, 0x09)
	expectSense(t, "UA", do(t, dev, frontend.Command{LUN: 0, CDB: cdbTUR}), 0x6, 0x3f, 0x0e)
	q := dev.Queue(0)
	q.SetInterrupts(false)
	cdb := rw10(0x28, 2000, 8) // in the grown part
	bad := new(int)
	reap := func(s *frontend.Slot) {
		if s.Response() != 0 || s.Status() != 0 {
			*bad++
		}
		q.Put(s)
	}
	run := func() {
		s := q.Get()
		q.Prepare(s, 0, 1, cdb, frontend.DirIn, 4096)
		q.Submit(s)
		q.Kick()
		for q.Reap(reap) == 0 {
			runtime.Gosched()
		}
	}
	for i := 0; i < 100; i++ {
		run()
	}
	if logging {
		marked := 0
		for p := uint64(0); p < log.Pages(); p++ {
			if log.Marked(p) {
				marked++
			}
		}
		if marked == 0 {
			t.Fatal("logging on, and nothing marked")
		}
	}
	return q, run, bad
}

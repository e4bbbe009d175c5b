package vhost_test

import (
	"testing"
	"time"

	"vhost-target/bdev"
	"vhost-target/bdev/errbdev"
	"vhost-target/reactor"
	"vhost-target/vhost/frontend"
)

// TestTMFWaitsForOlderRequests: an ABORT TASK is answered only once the
// request it may abort has completed, even when that takes longer than the
// 10 s the target used to wait (after which it answered FUNCTION COMPLETE
// with the bdev still due to write the read into the guest's buffer, which
// the guest believes it owns again). And it waits for the requests in flight
// when it came only: a request started after it on another queue, held just
// as long, does not hold the answer (with a wait for empty queues, a busy
// guest's abort would never be answered). Meanwhile other I/O is served.
func TestTMFWaitsForOlderRequests(t *testing.T) {
	const hold = 11 * time.Second // longer than the old 10 s bound
	e := newEnv(t, 2, reactor.Adaptive)
	base := e.disk("base", 4<<20, 512)
	ed, err := errbdev.New(errbdev.Config{Name: "slow", Base: base, Rules: []errbdev.Rule{
		{Op: bdev.OpRead, LBAStart: 300, LBACount: 8, Delay: hold},
	}})
	if err != nil {
		t.Fatal(err)
	}
	sock := e.controller("tmf", 3, lun(0, 0, ed))
	c := e.ctrls[len(e.ctrls)-1]
	d, err := frontend.Dial(sock, frontend.Options{NumQueues: 3, Slots: 4, SlotDataSize: 4096, Timeout: 3 * hold})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Abort()
	for qi := 0; qi < 3; qi++ { // every ring runs before A and the TMF
		if r, err := d.Do(frontend.Command{Queue: qi, CDB: []byte{0, 0, 0, 0, 0, 0}}); err != nil || r.Status != 0 {
			t.Fatalf("TEST UNIT READY on queue %d: %v %+v", qi, err, r)
		}
	}

	submit := func(qi int) (*frontend.Queue, time.Time) {
		q := d.Queue(qi)
		s := q.Get()
		q.Prepare(s, 0, 0, rw10(0x28, 300, 8), frontend.DirIn, 4096)
		q.Submit(s)
		q.Kick()
		return q, time.Now()
	}
	reaped := func(q *frontend.Queue) int {
		return q.Reap(func(s *frontend.Slot) {
			if s.Response() != 0 || s.Status() != 0 {
				t.Errorf("held read: response %d status %#x", s.Response(), s.Status())
			}
			q.Put(s)
		})
	}

	// A: the request the guest gives up on, in flight before the TMF.
	qa, startA := submit(0)
	time.Sleep(100 * time.Millisecond)
	tmfDone := make(chan byte, 1)
	go func() {
		r, err := d.TMF(0, 0, frontend.TMFAbortTask, 0)
		if err != nil {
			t.Errorf("TMF: %v", err)
		}
		tmfDone <- r
	}()
	// B: started once the target runs the TMF (its counter moved; the
	// epoch changes right after), so it is newer than the TMF.
	for c.Stats.Snapshot().TMFs == 0 {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	qb, startB := submit(1)

	// Other I/O goes on while the TMF waits.
	served := 0
	for len(tmfDone) == 0 && served < 20 {
		r, err := d.Do(frontend.Command{Queue: 2, CDB: rw10(0x28, 0, 8), DataInLen: 4096})
		if err != nil || r.Status != 0 {
			t.Fatalf("read during the TMF: %v %+v", err, r)
		}
		served++
		time.Sleep(10 * time.Millisecond)
	}
	if served < 20 {
		t.Errorf("TMF answered after %d other reads, before the held read was due", served)
	}

	resp := <-tmfDone
	answered := time.Now()
	if resp != 0 {
		t.Errorf("ABORT TASK: response %d, want 0 (FUNCTION COMPLETE)", resp)
	}
	// A's used element was published before the answer.
	if n := reaped(qa); n != 1 {
		t.Errorf("ABORT TASK answered %v after A was submitted with A not completed (held %v)",
			answered.Sub(startA).Round(time.Millisecond), hold)
	}
	// B, newer, is still held: the TMF did not wait for it.
	if n := reaped(qb); n != 0 || time.Since(startB) >= hold {
		t.Errorf("ABORT TASK answered only when B, started after it, completed (%v after B)", answered.Sub(startB))
	}
	deadline := time.Now().Add(3 * hold)
	for reaped(qb) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("B never completed")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// A second TMF with nothing in flight is answered (the epochs reset).
	if r, err := d.TMF(0, 0, frontend.TMFLogicalUnitReset, 0); err != nil || r != 0 {
		t.Errorf("LUN RESET: %v, response %d", err, r)
	}
	if got := c.Stats.Snapshot().TMFs; got != 2 {
		t.Errorf("TMFs counted %d, want 2", got)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestTMFDeviceStopWhileWaiting: a device stop (GET_VRING_BASE, the control
// ring first as QEMU sends it) while an abort waits for a held request does
// not wait for the abort: the control queue answers it and stops, and the
// request queue's own stop drains the held request, so the stop reports
// every request completed.
func TestTMFDeviceStopWhileWaiting(t *testing.T) {
	const hold = 2 * time.Second
	e := newEnv(t, 1, reactor.Adaptive)
	base := e.disk("base", 4<<20, 512)
	ed, err := errbdev.New(errbdev.Config{Name: "slow", Base: base, Rules: []errbdev.Rule{
		{Op: bdev.OpRead, LBAStart: 300, LBACount: 8, Delay: hold},
	}})
	if err != nil {
		t.Fatal(err)
	}
	sock := e.controller("tmfstop", 1, lun(0, 0, ed))
	c := e.ctrls[len(e.ctrls)-1]
	d, err := frontend.Dial(sock, frontend.Options{NumQueues: 1, Slots: 4, SlotDataSize: 4096, Timeout: 10 * hold})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Abort()
	// The queue runs (Dial's last messages ask no reply: without a command
	// first, the TMF below could reach the target before the ring starts).
	if r, err := d.Do(frontend.Command{CDB: []byte{0, 0, 0, 0, 0, 0}}); err != nil || r.Status != 0 {
		t.Fatalf("TEST UNIT READY: %v %+v", err, r)
	}
	q := d.Queue(0)
	s := q.Get()
	q.Prepare(s, 0, 0, rw10(0x28, 300, 8), frontend.DirIn, 4096)
	q.Submit(s)
	q.Kick()
	start := time.Now()
	tmfDone := make(chan error, 1)
	go func() {
		r, err := d.TMF(0, 0, frontend.TMFAbortTask, 0)
		if err == nil && r != 0 {
			t.Errorf("ABORT TASK: response %d", r)
		}
		tmfDone <- err
	}()
	for c.Stats.Snapshot().TMFs == 0 {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	if len(tmfDone) != 0 {
		t.Fatal("ABORT TASK answered with the request it waits for still held")
	}
	if err := d.Close(); err != nil {
		t.Errorf("stop while the TMF waits: %v", err)
	}
	if took := time.Since(start); took < hold {
		t.Errorf("stop returned %v after the held read was submitted, before it could complete (%v)", took, hold)
	}
	if err := <-tmfDone; err != nil {
		t.Errorf("TMF: %v", err)
	}
}

package vhost_test

import (
	"testing"
	"time"

	"vhost-target/bdev"
	"vhost-target/bdev/errbdev"
	"vhost-target/reactor"
	"vhost-target/vhost"
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
	c, d := heldReadDevice(t, 2, 3, hold)
	submit := func(qi int) (*frontend.Queue, time.Time) { return submitHeldRead(d, qi), time.Now() }
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
	const hold = 3 * time.Second
	c, d := heldReadDevice(t, 1, 1, hold)
	submitHeldRead(d, 0)
	start := time.Now()
	tmfDone := make(chan error, 1)
	var answered time.Time
	go func() {
		r, err := d.TMF(0, 0, frontend.TMFAbortTask, 0)
		answered = time.Now()
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
	// The stop ended the wait (the control queue's quit), not the read's
	// completion: without that, the answer would come only after hold.
	if a := answered.Sub(start); a >= hold {
		t.Errorf("ABORT TASK answered %v after the held read was submitted: the stop did not end its wait (hold %v)", a, hold)
	}
}

// heldReadDevice serves a LUN on which reads of blocks 300..307 are held
// for hold, on a controller of nq queues over the given number of reactors,
// and dials it. Every ring runs before it returns (Dial's last messages ask
// no reply: without a command first, a TMF could reach the target before a
// ring starts).
func heldReadDevice(t *testing.T, reactors, nq int, hold time.Duration) (*vhost.Controller, *frontend.Device) {
	t.Helper()
	e := newEnv(t, reactors, reactor.Adaptive)
	base := e.disk("base", 4<<20, 512)
	ed, err := errbdev.New(errbdev.Config{Name: "slow", Base: base, Rules: []errbdev.Rule{
		{Op: bdev.OpRead, LBAStart: 300, LBACount: 8, Delay: hold},
	}})
	if err != nil {
		t.Fatal(err)
	}
	sock := e.controller("tmf", nq, lun(0, 0, ed))
	d, err := frontend.Dial(sock, frontend.Options{NumQueues: nq, Slots: 4, SlotDataSize: 4096, Timeout: 3 * hold})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Abort)
	for qi := 0; qi < nq; qi++ {
		if r, err := d.Do(frontend.Command{Queue: qi, CDB: []byte{0, 0, 0, 0, 0, 0}}); err != nil || r.Status != 0 {
			t.Fatalf("TEST UNIT READY on queue %d: %v %+v", qi, err, r)
		}
	}
	return e.ctrls[len(e.ctrls)-1], d
}

// submitHeldRead submits a read of the held blocks on queue qi, without
// waiting for it.
func submitHeldRead(d *frontend.Device, qi int) *frontend.Queue {
	q := d.Queue(qi)
	s := q.Get()
	q.Prepare(s, 0, 0, rw10(0x28, 300, 8), frontend.DirIn, 4096)
	q.Submit(s)
	q.Kick()
	return q
}

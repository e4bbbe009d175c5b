package vhost_test

// Faults injected below the SCSI layer (bdev/errbdev) as a guest sees them
// through the front-end: the right sense data, the error counters, and no
// request left hanging, synchronous or with a full queue.

import (
	"bytes"
	"io"
	"log/slog"
	"math/rand"
	"path/filepath"
	"testing"
	"time"

	"vhost-target/bdev"
	"vhost-target/bdev/errbdev"
	"vhost-target/reactor"
	"vhost-target/vhost"
	"vhost-target/vhost/frontend"
)

// senseKey returns key, ASC, ASCQ from fixed or descriptor sense data.
func senseKey(s []byte) (key, asc, ascq byte) {
	switch {
	case len(s) >= 14 && s[0]&0x7f == 0x70:
		return s[2] & 0xf, s[12], s[13]
	case len(s) >= 4 && s[0]&0x7f == 0x72:
		return s[1] & 0xf, s[2], s[3]
	}
	return 0xff, 0xff, 0xff
}

func TestInjectedErrors(t *testing.T) {
	const delay = 50 * time.Millisecond
	e := newEnv(t, 2, reactor.Adaptive)
	base := e.disk("base", 4<<20, 512)
	ed, err := errbdev.New(errbdev.Config{Name: "err0", Base: base, Rules: []errbdev.Rule{
		{Op: bdev.OpRead, LBAStart: 100, LBACount: 10, Err: bdev.ErrIO},
		{Op: bdev.OpWrite, LBAStart: 200, LBACount: 10, Err: bdev.ErrIO},
		{Op: bdev.OpRead, LBAStart: 300, LBACount: 10, Delay: delay},
		{Op: bdev.OpRead, LBAStart: 400, LBACount: 10, Err: bdev.ErrIO, Delay: delay},
	}})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "err")
	c, err := vhost.NewController(vhost.Config{Name: "err", SocketPath: sock, NumQueues: 2, Reactors: e.r, SocketUID: -1, SocketGID: -1,
		LUNs: []vhost.LUNSpec{lun(0, 0, ed)}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Listen(); err != nil {
		t.Fatal(err)
	}
	e.ctrls = append(e.ctrls, c)
	d, err := frontend.Dial(sock, frontend.Options{NumQueues: 2, Slots: 32, SlotDataSize: 8192, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Abort()
	medium := func() uint64 { return c.Stats.Snapshot().LUNs[0].Errors[vhost.ErrMedium] }

	type want struct {
		name      string
		cdb       []byte
		out       []byte
		in        int
		status    byte
		asc, ascq byte
		minTime   time.Duration
	}
	data := bytes.Repeat([]byte{0x5a}, 8*512)
	cases := []want{
		{name: "read in the bad range", cdb: rw10(0x28, 96, 8), in: 4096, status: 2, asc: 0x11, ascq: 0},
		{name: "read before the bad range", cdb: rw10(0x28, 92, 8), in: 4096},
		{name: "write in the bad range", cdb: rw10(0x2a, 205, 8), out: data, status: 2, asc: 0x0c, ascq: 0},
		{name: "read of the write-error range", cdb: rw10(0x28, 205, 8), in: 4096},
		{name: "write in the read-error range", cdb: rw10(0x2a, 100, 8), out: data},
		{name: "delayed read", cdb: rw10(0x28, 300, 8), in: 4096, minTime: delay},
		{name: "delayed read error", cdb: rw10(0x28, 405, 1), in: 512, status: 2, asc: 0x11, ascq: 0, minTime: delay},
	}
	errs := 0
	for _, tc := range cases {
		m0 := medium()
		t0 := time.Now()
		r, err := d.Do(frontend.Command{CDB: tc.cdb, DataOut: tc.out, DataInLen: tc.in})
		took := time.Since(t0)
		if err != nil || r.Response != 0 {
			t.Fatalf("%s: %v %+v", tc.name, err, r)
		}
		if r.Status != tc.status || took < tc.minTime {
			t.Errorf("%s: status %#x after %v, want %#x after at least %v", tc.name, r.Status, took, tc.status, tc.minTime)
		}
		if tc.status == 2 {
			errs++
			if k, a, q := senseKey(r.Sense); k != 3 || a != tc.asc || q != tc.ascq {
				t.Errorf("%s: sense key %#x ASC %#x ASCQ %#x (%x), want MEDIUM ERROR %#x/%#x", tc.name, k, a, q, r.Sense, tc.asc, tc.ascq)
			}
			if medium() != m0+1 {
				t.Errorf("%s: medium error counter %d -> %d, want +1", tc.name, m0, medium())
			}
		} else if medium() != m0 {
			t.Errorf("%s: medium error counter moved", tc.name)
		}
		if tc.out == nil && tc.status == 0 && len(r.DataIn) != tc.in {
			t.Errorf("%s: %d bytes read", tc.name, len(r.DataIn))
		}
	}

	// A full queue on both queues mixing failing, delayed and good reads:
	// every request completes, the failures are exactly those in the bad
	// ranges, and nothing hangs.
	rng := rand.New(rand.NewSource(3))
	m0 := medium()
	wantErrs := 0
	total := 0
	for round := 0; round < 4; round++ {
		for qi := 0; qi < 2; qi++ {
			q := d.Queue(qi)
			for q.Free() > 0 {
				s := q.Get()
				lba := uint32(rng.Intn(5)) * 100 // 0, 100 (error), 200, 300 (delay), 400 (delay+error)
				if lba == 100 || lba == 400 {
					wantErrs++
				}
				q.Prepare(s, 0, 0, rw10(0x28, lba+uint32(rng.Intn(8)), 1), frontend.DirIn, 512)
				q.Submit(s)
				total++
			}
			q.Kick()
		}
		got, bad := 0, 0
		deadline := time.Now().Add(5 * time.Second)
		for got < 64 {
			for qi := 0; qi < 2; qi++ {
				q := d.Queue(qi)
				got += q.Reap(func(s *frontend.Slot) {
					if s.Response() != 0 {
						t.Errorf("response %d", s.Response())
					}
					if s.Status() != 0 {
						bad++
						if k, a, _ := senseKey(s.Sense()); k != 3 || a != 0x11 {
							t.Errorf("async read: sense %x", s.Sense())
						}
					}
					q.Put(s)
				})
			}
			if time.Now().After(deadline) {
				t.Fatalf("round %d: %d of 64 requests completed in 5 s", round, got)
			}
			time.Sleep(100 * time.Microsecond)
		}
		errs += bad
	}
	if n := medium() - m0; n != uint64(wantErrs) {
		t.Errorf("async: medium errors counted %d, want %d", n, wantErrs)
	}
	// Stopping the device reports every request completed (GET_VRING_BASE).
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d sync commands and %d async reads; %d medium errors seen by the guest and counted", len(cases), total, errs)
}

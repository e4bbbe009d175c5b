package vhost_test

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"vhost-target/reactor"
	"vhost-target/vhost"
	"vhost-target/vhost/frontend"
)

// TestCallFDAfterEnable replays QEMU's start order, where a ring's call fd
// is installed only after the ring is enabled (vhost-scsi-common unmasks the
// queues after vhost_dev_start): the first command completes while the
// target still holds the previous call fd, which QEMU no longer reads. The
// new call fd must then be signalled, or the guest waits forever for its
// first INQUIRY (issue 9 part 1: one boot in three hung). Deterministic:
// the command is completed (seen by polling) before the swap.
func TestCallFDAfterEnable(t *testing.T) {
	for _, mode := range []reactor.Mode{reactor.Busy, reactor.Adaptive} {
		for _, vring := range []int{frontend.ControlVring, 2} {
			t.Run(fmt.Sprintf("mode%d-vring%d", mode, vring), func(t *testing.T) { callAfterEnable(t, mode, vring) })
		}
	}
}

func callAfterEnable(t *testing.T, mode reactor.Mode, vring int) {
	e := newEnv(t, 1, mode)
	sock := e.controller("c0", 1, lun(0, 0, e.disk("m0", 1<<20, 512)))
	dev, err := frontend.NewUnstarted(sock, frontend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	// Negotiate installs the init-time call fds (QEMU's masked notifiers).
	if err := dev.Negotiate(); err != nil {
		t.Fatal(err)
	}
	if err := dev.SetFeatures(dev.OfferedFeatures()); err != nil {
		t.Fatal(err)
	}
	if err := dev.SetMemTable(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := dev.StartRing(i); err != nil {
			t.Fatal(err)
		}
	}
	if err := dev.EnableRings(true); err != nil {
		t.Fatal(err)
	}
	// Completed and seen by polling the used ring, signalled on the old fd.
	if vring == frontend.ControlVring {
		if _, err := dev.TMF(0, 0, 5 /* LUN RESET */, 0); err != nil {
			t.Fatal(err)
		}
	} else if _, err := dev.Do(frontend.Command{CDB: []byte{0x12, 0, 0, 0, 36, 0}, DataInLen: 36}); err != nil {
		t.Fatal(err)
	}
	if err := dev.SetVringCall(vring); err != nil {
		t.Fatal(err)
	}
	if !dev.Vring(vring).WaitCallFD(2 * time.Second) {
		t.Errorf("mode %v vring %d: the call fd installed after a completion was never signalled", mode, vring)
	}
	dev.Close()
}

// syncBuffer is a log sink shared by the controller's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// sessionsController starts a controller with maxSessions and a log buffer.
func sessionsController(t *testing.T, e *env, maxSessions int) (*vhost.Controller, string, *syncBuffer) {
	logs := &syncBuffer{}
	sock := filepath.Join(t.TempDir(), "c0")
	c, err := vhost.NewController(vhost.Config{
		Name: "c0", SocketPath: sock, NumQueues: 1, MaxSessions: maxSessions, Reactors: e.r,
		LUNs: []vhost.LUNSpec{lun(0, 0, e.disk("m0", 1<<20, 512))}, SocketUID: -1, SocketGID: -1,
		Logger: slog.New(slog.NewTextHandler(logs, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Listen(); err != nil {
		t.Fatal(err)
	}
	e.ctrls = append(e.ctrls, c)
	return c, sock, logs
}

// writeRead writes one block at lba through dev and reads it back.
func writeRead(t *testing.T, dev *frontend.Device, lba uint32) {
	t.Helper()
	data := bytes.Repeat([]byte{byte(lba)}, 512)
	if r, err := dev.Do(frontend.Command{CDB: rw10(0x2a, lba, 1), DataOut: data}); err != nil || r.Status != 0 || r.Response != 0 {
		t.Fatalf("write lba %d: %v %+v", lba, err, r)
	}
	r, err := dev.Do(frontend.Command{CDB: rw10(0x28, lba, 1), DataInLen: 512})
	if err != nil || r.Status != 0 || !bytes.Equal(r.DataIn, data) {
		t.Fatalf("read lba %d: %v %+v", lba, err, r)
	}
}

// TestMaxSessionsDefault: a second front-end on a controller is refused
// while the first is connected (the default max_sessions is 1), with a WARN
// naming both and the refusal counted; the first keeps working, and once it
// hangs up a new front-end is admitted at once.
func TestMaxSessionsDefault(t *testing.T) {
	e := newEnv(t, 1, reactor.Busy)
	c, sock, logs := sessionsController(t, e, 0)
	dev1, err := frontend.Dial(sock, frontend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	writeRead(t, dev1, 1)
	dev2, err := frontend.NewUnstarted(sock, frontend.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := dev2.Negotiate(); err == nil {
		t.Fatal("second front-end negotiated with max_sessions 1")
	}
	dev2.Close()
	if got := c.Stats.Snapshot().Refused; got != 1 {
		t.Errorf("refused = %d, want 1", got)
	}
	if n := c.Sessions(); n != 1 {
		t.Errorf("sessions = %d, want 1", n)
	}
	log := logs.String()
	if !strings.Contains(log, "front-end refused") || !strings.Contains(log, fmt.Sprintf("pid %d", os.Getpid())) ||
		!strings.Contains(log, "connected=\"session 1 (pid") {
		t.Errorf("no WARN naming the refused and the connected front-end:\n%s", log)
	}
	writeRead(t, dev1, 2)
	// The first front-end goes away without a clean stop, as a killed QEMU
	// does; the next one connects at once and must be served.
	dev1.Abort()
	for i := 0; i < 5; i++ {
		dev, err := frontend.Dial(sock, frontend.Options{})
		if err != nil {
			t.Fatalf("reattach %d after the previous front-end hung up: %v\n%s", i, err, logs.String())
		}
		writeRead(t, dev, uint32(10+i))
		dev.Abort()
	}
	if got := c.Stats.Snapshot().Refused; got != 1 {
		t.Errorf("refused = %d after reattaching, want 1", got)
	}
}

// TestMaxSessionsTwo: with max_sessions 2 both front-ends are served, each
// with its own rings and memory, the WARN names both, and a third is refused.
func TestMaxSessionsTwo(t *testing.T) {
	e := newEnv(t, 1, reactor.Busy)
	c, sock, logs := sessionsController(t, e, 2)
	dev1, err := frontend.Dial(sock, frontend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev1.Close()
	dev2, err := frontend.Dial(sock, frontend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev2.Close()
	writeRead(t, dev1, 1)
	writeRead(t, dev2, 2)
	// Each sees the other's writes only through the shared LUN.
	r, err := dev2.Do(frontend.Command{CDB: rw10(0x28, 1, 1), DataInLen: 512})
	if err != nil || r.DataIn[0] != 1 {
		t.Fatalf("session 2 reading session 1's block: %v %+v", err, r)
	}
	if !strings.Contains(logs.String(), "another front-end connected while one is served") {
		t.Errorf("no WARN for the second session:\n%s", logs.String())
	}
	dev3, err := frontend.NewUnstarted(sock, frontend.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := dev3.Negotiate(); err == nil {
		t.Fatal("third front-end negotiated with max_sessions 2")
	}
	dev3.Close()
	if n, refused := c.Sessions(), c.Stats.Snapshot().Refused; n != 2 || refused != 1 {
		t.Errorf("sessions %d refused %d, want 2 and 1", n, refused)
	}
	writeRead(t, dev1, 3)
	writeRead(t, dev2, 4)
}

// TestInterruptDrivenStarts connects 25 times per poll mode with a front-end
// that, like a guest, learns of completions only through its call fd, in
// QEMU's order (call fds swapped after SET_VRING_ENABLE), and sends its
// first command and task management function at once: every one must be
// signalled on the fd the front-end listens to.
func TestInterruptDrivenStarts(t *testing.T) {
	for _, mode := range []reactor.Mode{reactor.Busy, reactor.Adaptive} {
		e := newEnv(t, 1, mode)
		sock := e.controller(fmt.Sprintf("c%d", mode), 2, lun(0, 0, e.disk("m0", 1<<20, 512)))
		for i := 0; i < 25; i++ {
			dev, err := frontend.Dial(sock, frontend.Options{NumQueues: 2, InterruptDriven: true, Timeout: 3 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			for q := 0; q < 2; q++ {
				if r, err := dev.Do(frontend.Command{Queue: q, CDB: []byte{0x12, 0, 0, 0, 36, 0}, DataInLen: 36}); err != nil || r.Status != 0 {
					t.Fatalf("mode %v connection %d queue %d: INQUIRY: %v", mode, i, q, err)
				}
			}
			if _, err := dev.TMF(0, 0, frontend.TMFLogicalUnitReset, 0); err != nil {
				t.Fatalf("mode %v connection %d: LUN RESET: %v", mode, i, err)
			}
			dev.Close()
		}
	}
}

// TestLateNotification: a driver that asks for an interrupt for completions
// already published without one (its used_event store raced our used->idx
// store, which a guest whose barrier does not reach the host does: QEMU TCG
// with one vCPU, issue 11) is sent it, once, instead of never.
func TestLateNotification(t *testing.T) {
	for _, mode := range []reactor.Mode{reactor.Busy, reactor.Adaptive} {
		e := newEnv(t, 1, mode)
		name := fmt.Sprintf("c%d", mode)
		sock := e.controller(name, 1, lun(0, 0, e.disk("m0", 1<<20, 512)))
		dev, err := frontend.Dial(sock, frontend.Options{NumQueues: 1, Timeout: 3 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if dev.Features()&(1<<29) == 0 {
			t.Fatal("VIRTIO_RING_F_EVENT_IDX not negotiated")
		}
		q := dev.Queue(0)
		q.SetInterrupts(false)
		inquiry := func() {
			if r, err := dev.Do(frontend.Command{Queue: 0, CDB: []byte{0x12, 0, 0, 0, 36, 0}, DataInLen: 36}); err != nil || r.Status != 0 {
				t.Fatalf("mode %v: INQUIRY: %v", mode, err)
			}
		}
		for range 3 {
			inquiry()
		}
		// The first completion after start is always signalled, and so is a
		// new call fd (the front-end sends one after start, as QEMU does).
		time.Sleep(20 * time.Millisecond)
		q.DrainCall()
		inquiry()
		if q.WaitCallFD(50 * time.Millisecond) {
			t.Fatalf("mode %v: signalled with interrupts suppressed", mode)
		}
		// The driver now says it has seen all but the last completion and
		// wants to be told of it, too late for the device's decision.
		q.SetUsedEvent(q.UsedIdx() - 1)
		if !q.WaitCallFD(5 * time.Second) {
			t.Fatalf("mode %v: the completion the driver asked about was never signalled: %+v", mode, e.ctrls[len(e.ctrls)-1].QueueStates())
		}
		q.DrainCall()
		if q.WaitCallFD(50 * time.Millisecond) {
			t.Fatalf("mode %v: signalled twice", mode)
		}
		var late uint64
		for _, qc := range e.ctrls[len(e.ctrls)-1].Stats.Snapshot().Queues {
			late += qc.Renotified
		}
		if late != 1 {
			t.Fatalf("mode %v: %d late notifications counted, want 1", mode, late)
		}
		dev.Close()
	}
}

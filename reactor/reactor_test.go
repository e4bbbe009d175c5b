package reactor

import (
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

type countPoller struct{ n atomic.Int64 }

func (c *countPoller) Poll() int { c.n.Add(1); return 0 }

func TestReactorCallAndPollers(t *testing.T) {
	r, err := New(0, 0, Busy)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	defer r.Stop()
	p := &countPoller{}
	if err := r.Call(func() { r.AddPoller(p) }); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for p.n.Load() < 100 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if p.n.Load() < 100 {
		t.Fatalf("poller ran %d times", p.n.Load())
	}
	var cpu int
	r.Call(func() {
		var set unix.CPUSet
		unix.SchedGetaffinity(0, &set)
		cpu = set.Count()
	})
	if cpu != 1 {
		t.Fatalf("reactor thread may run on %d CPUs, want 1", cpu)
	}
	r.Call(func() { r.RemovePoller(p) })
	n := p.n.Load()
	time.Sleep(10 * time.Millisecond)
	if p.n.Load() != n {
		t.Fatal("poller still called after RemovePoller")
	}
}

// sleepPoller has work only when its eventfd has been written.
type sleepPoller struct {
	fd          int
	armed, work atomic.Int64
}

func (s *sleepPoller) Poll() int {
	var b [8]byte
	if n, _ := unix.Read(s.fd, b[:]); n == 8 {
		s.work.Add(1)
		return 1
	}
	return 0
}
func (s *sleepPoller) Arm() bool { s.armed.Add(1); return true }
func (s *sleepPoller) Disarm()   {}

func TestAdaptiveSleepsAndWakes(t *testing.T) {
	r, err := New(1, -1, Adaptive)
	if err != nil {
		t.Fatal(err)
	}
	fd, _ := unix.Eventfd(0, unix.EFD_NONBLOCK)
	defer unix.Close(fd)
	p := &sleepPoller{fd: fd}
	if err := r.WatchFD(fd); err != nil {
		t.Fatal(err)
	}
	r.Start()
	defer r.Stop()
	r.Call(func() { r.AddPoller(p) })
	time.Sleep(50 * time.Millisecond)
	it := r.Stats.Iterations.Load()
	time.Sleep(50 * time.Millisecond)
	// Asleep: iterations advance only by a short spin after each 100 ms epoll timeout.
	if d := r.Stats.Iterations.Load() - it; d > 5000 { // a spinning reactor does millions
		t.Fatalf("idle adaptive reactor iterated %d times in 50 ms", d)
	}
	if r.Stats.Sleeps.Load() == 0 && p.armed.Load() == 0 {
		t.Fatal("reactor never slept")
	}
	var one = [8]byte{1}
	unix.Write(fd, one[:])
	deadline := time.Now().Add(2 * time.Second)
	for p.work.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if p.work.Load() == 0 {
		t.Fatal("kick did not wake the reactor")
	}
	// A message wakes it too.
	done := make(chan struct{})
	r.Send(func() { close(done) })
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("message did not wake the reactor")
	}
}

type armPoller struct{}

func (armPoller) Poll() int { return 0 }
func (armPoller) Arm() bool { return true }
func (armPoller) Disarm()   {}

// TestSleepNoAllocs: a sleep and wake-up (arm, epoll_wait, drain the wake
// eventfd, disarm) allocates nothing. A reactor at a few thousand IOPS
// sleeps about once per I/O, so an allocation here is one per I/O; in -race
// builds a local buffer handed to read(2) escapes, which CI once caught as
// ~0.4 allocations per I/O on a loaded machine.
func TestSleepNoAllocs(t *testing.T) {
	r, err := New(0, -1, Adaptive)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Stop()
	r.pollers = []Poller{armPoller{}}
	one := []byte{1, 0, 0, 0, 0, 0, 0, 0}
	n := testing.AllocsPerRun(200, func() {
		// A pending wake-up makes epoll_wait return at once.
		_, _ = unix.Write(r.wakefd, one)
		r.sleep()
	})
	if n != 0 {
		t.Errorf("%.1f allocations per sleep", n)
	}
	if got := r.Stats.Sleeps.Load(); got < 200 {
		t.Errorf("%d sleeps counted, want at least 200 (the test did not sleep)", got)
	}
}

// Package reactor runs pollers on goroutines locked to OS threads and pinned
// to CPUs, in the style of SPDK's reactors: each loop drains a bounded batch
// of control messages from a lock-free ring, then calls every poller once.
// A poller reports how much work it did; the loop accounts busy and idle time
// from that. In adaptive mode an idle reactor arms notifications and sleeps
// in epoll until a kick, a completion or a message wakes it.
//
// The package knows nothing of vhost, SCSI or bdevs: it runs Pollers.
package reactor

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	_ "unsafe" // for go:linkname

	"golang.org/x/sys/unix"
)

// Poller is polled by its reactor once per loop iteration.
type Poller interface {
	// Poll does a bounded amount of work and returns how much (0 = idle).
	Poll() int
}

// Sleeper is a Poller that can sleep with its reactor in adaptive mode.
type Sleeper interface {
	Poller
	// Arm enables the notifications that will wake the reactor (for a
	// virtqueue: clear VRING_USED_F_NO_NOTIFY) and then re-checks for work.
	// It returns false when work is already pending: the reactor must not sleep.
	Arm() bool
	// Disarm undoes Arm after the reactor wakes (and drains wake-up fds).
	Disarm()
}

// Mode selects how an idle reactor waits.
type Mode int

const (
	Busy     Mode = iota // spin forever
	Adaptive             // spin, then sleep in epoll after IdleSpin of idleness
)

// IdleSpin is how long an adaptive reactor spins with no work before sleeping.
const IdleSpin = 200 * time.Microsecond

// Stats are a reactor's counters. Only the reactor writes them; readers load
// them atomically.
type Stats struct {
	BusyNanos  atomic.Int64
	IdleNanos  atomic.Int64
	Iterations atomic.Uint64
	Sleeps     atomic.Uint64
}

// Reactor is one polling loop on one CPU.
type Reactor struct {
	id    int
	cpu   int
	mode  Mode
	inbox *Ring[func()]
	// pollers is touched only by the reactor goroutine.
	pollers []Poller

	epfd, wakefd int
	sleeping     atomic.Bool
	stopping     atomic.Bool
	done         chan struct{}
	started      bool
	now          int64 // time of the current iteration; reactor goroutine only
	// scratch for draining wakefd and epoll events: a field, not a local,
	// because a slice handed to a syscall escapes in -race builds and would
	// cost an allocation per sleep. Reactor goroutine only.
	drain     [8]byte
	evs       [16]unix.EpollEvent
	closeOnce sync.Once
	pinErr    error

	Stats Stats
}

// inboxSize bounds the control messages waiting for one reactor.
const inboxSize = 1024

// New creates a reactor for cpu (-1 = not pinned) with the given id.
func New(id, cpu int, mode Mode) (*Reactor, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("reactor %d: epoll_create1: %w", id, err)
	}
	wakefd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("reactor %d: eventfd: %w", id, err)
	}
	r := &Reactor{id: id, cpu: cpu, mode: mode, inbox: NewRing[func()](inboxSize),
		epfd: epfd, wakefd: wakefd, done: make(chan struct{})}
	if err := r.WatchFD(wakefd); err != nil {
		unix.Close(epfd)
		unix.Close(wakefd)
		return nil, err
	}
	return r, nil
}

// ID returns the reactor's id; CPU its CPU.
func (r *Reactor) ID() int  { return r.id }
func (r *Reactor) CPU() int { return r.cpu }

// Mode returns the poll mode.
func (r *Reactor) Mode() Mode { return r.mode }

// Start launches the loop. It returns once the thread is locked and pinned.
func (r *Reactor) Start() error {
	if r.started {
		return errors.New("reactor: already started")
	}
	r.started = true
	ready := make(chan error, 1)
	go r.run(ready)
	return <-ready
}

func (r *Reactor) run(ready chan<- error) {
	// Never unlocked: when this goroutine ends the pinned thread is destroyed
	// with it instead of returning to the scheduler with our affinity.
	runtime.LockOSThread()
	if r.cpu >= 0 {
		var set unix.CPUSet
		set.Set(r.cpu)
		if err := unix.SchedSetaffinity(0, &set); err != nil {
			ready <- fmt.Errorf("reactor %d: pin to CPU %d: %w", r.id, r.cpu, err)
			close(r.done)
			return
		}
	}
	ready <- nil
	defer close(r.done)
	r.loop()
}

const msgBatch = 8

// statsFlush is how many iterations the loop accumulates in locals before
// publishing them to the atomic Stats (atomic adds cost a locked instruction).
const statsFlush = 256

// nanotime is the runtime's monotonic clock (one vDSO read; time.Now reads
// the wall clock too, which doubles the cost of every loop iteration). The
// runtime keeps this linkname stable because many packages use it.
//
//go:linkname nanotime runtime.nanotime
func nanotime() int64

var epoch = nanotime()

// monotonic returns nanoseconds since process start, never 0.
func monotonic() int64 { return nanotime() - epoch + 1 }

// Now returns the time of the current loop iteration (monotonic ns, never 0).
// Pollers use it instead of reading the clock per request.
func (r *Reactor) Now() int64 { return r.now }

func (r *Reactor) loop() {
	r.now = monotonic()
	var idleSince int64
	idle := false
	var busyNs, idleNs int64
	var iters uint64
	flush := func() {
		r.Stats.BusyNanos.Add(busyNs)
		r.Stats.IdleNanos.Add(idleNs)
		r.Stats.Iterations.Add(iters)
		busyNs, idleNs, iters = 0, 0, 0
	}
	for !r.stopping.Load() {
		work := 0
		for i := 0; i < msgBatch; i++ {
			fn, ok := r.inbox.Pop()
			if !ok {
				break
			}
			fn()
			work++
		}
		for _, p := range r.pollers {
			work += p.Poll()
		}
		// One clock read per iteration, shared by the accounting and (as
		// Now) by the next iteration's pollers.
		now := monotonic()
		d := now - r.now
		r.now = now
		if iters++; iters == statsFlush {
			flush()
		}
		if work > 0 {
			busyNs += d
			idle = false
			continue
		}
		idleNs += d
		if r.mode != Adaptive {
			continue
		}
		if !idle {
			idle, idleSince = true, now
			continue
		}
		if now-idleSince >= int64(IdleSpin) {
			flush()
			r.sleep()
			r.now = monotonic()
			r.Stats.IdleNanos.Add(r.now - now)
			idle = false
		}
	}
	flush()
	// Drain messages sent before Stop so their senders are not left waiting.
	for {
		fn, ok := r.inbox.Pop()
		if !ok {
			break
		}
		fn()
	}
}

// sleep arms every sleeper and waits in epoll. Any sleeper that finds work
// pending, or a queued message, cancels the sleep.
func (r *Reactor) sleep() {
	r.sleeping.Store(true)
	armed := 0
	ok := true
	for _, p := range r.pollers {
		s, isSleeper := p.(Sleeper)
		if !isSleeper {
			ok = false // a poller that cannot sleep keeps the reactor spinning
			break
		}
		armed++
		if !s.Arm() {
			ok = false
			break
		}
	}
	// Sequentially consistent with Send: either Send sees sleeping or we see the message.
	if ok && r.inbox.Len() == 0 && !r.stopping.Load() {
		_, _ = unix.EpollWait(r.epfd, r.evs[:], 1000) // wakefd ends it for messages and Stop
		r.Stats.Sleeps.Add(1)
	}
	r.sleeping.Store(false)
	_, _ = unix.Read(r.wakefd, r.drain[:])
	for _, p := range r.pollers[:armed] {
		p.(Sleeper).Disarm()
	}
}

// WatchFD adds an eventfd whose readability wakes the sleeping reactor.
func (r *Reactor) WatchFD(fd int) error {
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(fd)}
	if err := unix.EpollCtl(r.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return fmt.Errorf("reactor %d: epoll add fd %d: %w", r.id, fd, err)
	}
	return nil
}

// UnwatchFD removes fd; call it before closing fd.
func (r *Reactor) UnwatchFD(fd int) {
	_ = unix.EpollCtl(r.epfd, unix.EPOLL_CTL_DEL, fd, nil)
}

// ErrStopped is returned when sending to a stopped reactor.
var ErrStopped = errors.New("reactor: stopped")

// ErrInboxFull is returned when the reactor's message ring is full.
var ErrInboxFull = errors.New("reactor: inbox full")

// Send queues fn to run on the reactor goroutine. Safe from any goroutine.
func (r *Reactor) Send(fn func()) error {
	if r.stopping.Load() {
		return ErrStopped
	}
	if !r.inbox.Push(fn) {
		return ErrInboxFull
	}
	if r.sleeping.Load() {
		var b [8]byte
		b[0] = 1
		_, _ = unix.Write(r.wakefd, b[:])
	}
	return nil
}

// Call runs fn on the reactor and waits for it. Must not be called from the
// reactor itself. On a reactor that has not started, fn runs inline.
func (r *Reactor) Call(fn func()) error {
	if !r.started {
		fn()
		return nil
	}
	ch := make(chan struct{})
	for {
		err := r.Send(func() { fn(); close(ch) })
		if err == nil {
			break
		}
		if err != ErrInboxFull {
			return err
		}
		time.Sleep(50 * time.Microsecond)
	}
	select {
	case <-ch:
		return nil
	case <-r.done:
		// The loop drains the inbox on exit, so ch is closed too unless the
		// message lost the race with the final drain.
		select {
		case <-ch:
			return nil
		default:
			return ErrStopped
		}
	}
}

// AddPoller registers p. Call it on the reactor (inside Call/Send).
func (r *Reactor) AddPoller(p Poller) { r.pollers = append(r.pollers, p) }

// RemovePoller unregisters p. Call it on the reactor; safe from inside p.Poll.
func (r *Reactor) RemovePoller(p Poller) {
	for i, q := range r.pollers {
		if q == p {
			// Copy into a new slice so a loop ranging over the old one is unaffected.
			n := make([]Poller, 0, len(r.pollers)-1)
			n = append(n, r.pollers[:i]...)
			r.pollers = append(n, r.pollers[i+1:]...)
			return
		}
	}
}

// Stop ends the loop and waits for it, then closes the reactor's fds.
func (r *Reactor) Stop() {
	if !r.started {
		r.closeFDs()
		return
	}
	r.stopping.Store(true)
	var b [8]byte
	b[0] = 1
	_, _ = unix.Write(r.wakefd, b[:])
	<-r.done
	r.closeFDs()
}

// closeFDs closes the epoll and wake fds once, however often Stop is called.
func (r *Reactor) closeFDs() {
	r.closeOnce.Do(func() {
		unix.Close(r.epfd)
		unix.Close(r.wakefd)
	})
}

package vhost

import (
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"vhost-target/vhost/dirtylog"
	"vhost-target/vhost/virtq"
)

// sideQueue is what the control and event queues share: a vring served on
// its own goroutine, off the reactors (both are rare and may wait: a TMF on
// in-flight I/O, an event on the control plane), woken by its kick eventfd
// and signalled through a call fd the control plane may swap at any time.
type sideQueue struct {
	s    *session
	vq   *virtq.Queue
	kick *os.File // nil: no kick fd, poll on a timer

	mu   sync.Mutex // guards call against setCall from the control plane
	call int
	log  *dirtylog.Log // the session's dirty page log while it migrates (migration.go)

	quit chan struct{}
	done chan struct{}
}

// init takes the vring's fds: the kick fd becomes an *os.File on Go's
// netpoller, so the goroutine parks instead of holding a thread.
func (sq *sideQueue) init(s *session, v *vring, vq *virtq.Queue) {
	sq.s, sq.vq, sq.call = s, vq, v.call
	if s.logging() {
		sq.log = s.dirty
	}
	sq.quit, sq.done = make(chan struct{}), make(chan struct{})
	if v.kick >= 0 {
		if dup, err := unix.Dup(v.kick); err == nil {
			unix.SetNonblock(dup, true)
			sq.kick = os.NewFile(uintptr(dup), "kick")
		}
	}
	vq.SetNotification(true)
}

// setCall swaps the call fd and signals it once, as queue.setCall does: an
// answer published just before the swap was signalled on the old fd.
func (sq *sideQueue) setCall(fd int) {
	sq.mu.Lock()
	sq.call = fd
	if fd >= 0 {
		unix.Write(fd, callValue[:])
	}
	sq.mu.Unlock()
}

// publish makes the pushed used elements visible and signals the driver if
// it asked to be.
func (sq *sideQueue) publish() {
	if sq.vq.Publish() {
		sq.mu.Lock()
		if sq.call >= 0 {
			unix.Write(sq.call, callValue[:])
		}
		sq.mu.Unlock()
	}
}

// wakeups returns what the goroutine waits on besides quit: kicks (closed
// when the kick fd fails; a nil channel then blocks, see sleep) and, without
// a kick fd, a 5 ms ticker, since the front-end then expects us to poll.
// With a kick fd the eventfd counter keeps any kick that lands between Pop
// and Read, so no timer is needed and an idle queue costs nothing. release
// stops the ticker.
func (sq *sideQueue) wakeups() (kicks chan struct{}, tick <-chan time.Time, release func()) {
	kicks = make(chan struct{}, 1)
	if sq.kick != nil {
		go func() {
			var b [8]byte
			for {
				if _, err := sq.kick.Read(b[:]); err != nil {
					close(kicks)
					return
				}
				select {
				case kicks <- struct{}{}:
				default:
				}
			}
		}()
		return kicks, nil, func() {}
	}
	t := time.NewTicker(5 * time.Millisecond)
	return kicks, t.C, t.Stop
}

// stop ends the goroutine and returns the next avail index.
func (sq *sideQueue) stop() uint16 {
	close(sq.quit)
	<-sq.done
	if sq.kick != nil {
		sq.kick.Close()
	}
	return sq.vq.LastAvail()
}

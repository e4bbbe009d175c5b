package vhost

import (
	"encoding/binary"
	"sync"

	"vhost-target/vhost/proto"
	"vhost-target/vhost/virtq"
)

// virtio-scsi events (virtio 1.2 §5.6.6.3, struct virtio_scsi_event).
const (
	evTransportReset = 1       // VIRTIO_SCSI_T_TRANSPORT_RESET: needs VIRTIO_SCSI_F_HOTPLUG
	evParamChange    = 3       // VIRTIO_SCSI_T_PARAM_CHANGE: needs VIRTIO_SCSI_F_CHANGE
	evEventsMissed   = 1 << 31 // VIRTIO_SCSI_T_EVENTS_MISSED, or'ed into the event field

	evReasonRescan  = 1 // VIRTIO_SCSI_EVT_RESET_RESCAN: Linux scsi_add_device()s the LUN
	evReasonRemoved = 2 // VIRTIO_SCSI_EVT_RESET_REMOVED: Linux scsi_remove_device()s it
	// evReasonCapacityChanged is a PARAM_CHANGE reason: the ASC in bits 0-7,
	// the ASCQ in bits 8-15 (Linux virtscsi_handle_param_change reads them
	// so, and rescans the disk for 2A/00, 2A/01 and 2A/09).
	evReasonCapacityChanged = 0x2a | 0x09<<8

	eventSize = 4 + 8 + 4 // event, lun[8], reason

	// eventsPendingMax bounds the events a session keeps while the driver
	// has no event buffer posted (Linux posts 8). Past it events are
	// dropped and the next one delivered carries EVENTS_MISSED, on which
	// Linux rescans the whole host and drops the LUNs that no longer answer.
	eventsPendingMax = 64
)

// virtioEvent is one event waiting for a buffer.
type virtioEvent struct {
	event  uint32
	lun    [8]byte
	reason uint32
}

// eventLUN addresses (target, lun) as REPORT LUNS does (peripheral device
// addressing up to 255, flat space above), which is what QEMU puts in its
// events (virtio_scsi_push_event) and what Linux turns back into the LUN
// number it scanned.
func eventLUN(target uint8, lun uint16) [8]byte {
	var b [8]byte
	b[0], b[1] = 1, target
	if lun > 0xff {
		b[2] = 0x40 | byte(lun>>8)
	}
	b[3] = byte(lun)
	return b
}

// sessionEvents is a session's side of the event queue: the events raised
// for it and not yet delivered. It outlives the event ring (the driver may
// not have started it yet, or stopped it), and is emptied by a device reset.
type sessionEvents struct {
	mu      sync.Mutex
	pending []virtioEvent // oldest first, at most eventsPendingMax
	missed  bool          // an event was dropped: set EVENTS_MISSED on the next one delivered
	wake    chan struct{} // capacity 1: tells a running event queue to look
}

// event queues an event for s if s negotiated the feature the event needs;
// the event queue's goroutine delivers it when the driver has a buffer
// posted. Any goroutine.
func (s *session) event(kind uint32, target uint8, lun uint16, reason uint32) {
	need := uint(proto.FVirtioSCSIHotplug)
	if kind == evParamChange {
		need = proto.FVirtioSCSIChange
	}
	if s.negotiated.Load()&(1<<need) == 0 {
		return
	}
	e := &s.events
	e.mu.Lock()
	if len(e.pending) < eventsPendingMax {
		e.pending = append(e.pending, virtioEvent{event: kind, lun: eventLUN(target, lun), reason: reason})
	} else {
		e.missed = true
	}
	e.mu.Unlock()
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// next returns the oldest pending event as it is to be delivered.
func (e *sessionEvents) next() (virtioEvent, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.pending) == 0 {
		return virtioEvent{}, false
	}
	ev := e.pending[0]
	if e.missed {
		ev.event |= evEventsMissed
	}
	return ev, true
}

// waiting reports whether events are pending.
func (e *sessionEvents) waiting() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.pending) > 0
}

// delivered drops the oldest pending event (next's), and the missed flag
// it carried.
func (e *sessionEvents) delivered(ev virtioEvent) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if ev.event&evEventsMissed != 0 {
		e.missed = false
	}
	e.pending = append(e.pending[:0], e.pending[1:]...)
}

// reset forgets every event: the driver is being reset and will scan.
func (e *sessionEvents) reset() {
	e.mu.Lock()
	e.pending, e.missed = e.pending[:0], false
	e.mu.Unlock()
}

// eventQueue serves the event vring on its own goroutine (sideQueue), as
// ctrlQueue serves the control vring: events are rare, and the pending list
// is shared with the control plane under a mutex. Undelivered events stay
// pending across a stop, for the next start.
type eventQueue struct {
	sideQueue
}

func startEventQueue(s *session, v *vring, vq *virtq.Queue) *eventQueue {
	eq := &eventQueue{}
	eq.init(s, v, vq)
	go eq.run()
	return eq
}

func (eq *eventQueue) run() {
	defer close(eq.done)
	kicks, tickC, release := eq.wakeups()
	defer release()
	for {
		if !eq.deliver() {
			// The driver broke the ring: nothing more until it is reset.
			<-eq.quit
			return
		}
		if eq.s.events.waiting() && eq.vq.HasAvail() {
			continue // posted after the last Pop, before notifications were on
		}
		select {
		case <-eq.quit:
			return
		case _, ok := <-kicks: // the driver posted buffers
			if !ok {
				kicks = nil
			}
		case <-eq.s.events.wake: // the control plane raised an event
		case <-tickC:
		}
	}
}

// deliver fills posted buffers with pending events, oldest first, and
// signals the driver. A chain that cannot hold an event (too short, or
// device-readable) is completed with length 0, as SPDK's eventq_enqueue
// does, and the event waits for the next. It returns false when the ring is
// broken.
func (eq *eventQueue) deliver() bool {
	var c virtq.Chain
	for {
		ev, ok := eq.s.events.next()
		if !ok {
			break
		}
		ok, err := eq.vq.Pop(&c)
		if err != nil {
			if ce, isChain := err.(*virtq.ChainError); isChain {
				eq.vq.Push(ce.Head, 0)
				eq.s.log.Warn("malformed event queue chain", "err", err)
				continue
			}
			eq.s.log.Error("event queue broken by the driver", "err", err)
			eq.publish()
			return false
		}
		if !ok {
			break
		}
		if c.ReadLen != 0 || c.WriteLen < eventSize {
			eq.vq.Push(c.Head, 0)
			eq.s.log.Warn("event queue buffer cannot hold an event", "readable", c.ReadLen, "writable", c.WriteLen)
			continue
		}
		var b [eventSize]byte
		binary.LittleEndian.PutUint32(b[0:], ev.event)
		copy(b[4:12], ev.lun[:])
		binary.LittleEndian.PutUint32(b[12:], ev.reason)
		scatter(c.Writable(), b[:])
		eq.push(&c, eventSize)
		eq.s.events.delivered(ev)
		eq.s.log.Debug("event delivered", "event", ev.event, "target", ev.lun[1], "reason", ev.reason)
	}
	eq.publish()
	// With EVENT_IDX the driver kicks only past avail_event, which
	// SetNotification moves to the current index; buffers posted before
	// that are found on the next pass (a kick or an event wakes it).
	eq.vq.SetNotification(true)
	return true
}

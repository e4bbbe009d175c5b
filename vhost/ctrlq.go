package vhost

import (
	"encoding/binary"

	"vhost-target/vhost/virtq"
)

// Control queue request types and TMF subtypes (virtio spec 5.6.6.2).
const (
	ctrlTMF         = 0
	ctrlANQuery     = 1
	ctrlANSubscribe = 2

	tmfAbortTask       = 0
	tmfAbortTaskSet    = 1
	tmfClearACA        = 2
	tmfClearTaskSet    = 3
	tmfITNexusReset    = 4
	tmfLUNReset        = 5
	tmfQueryTask       = 6
	tmfQueryTaskSet    = 7
	tmfFunctionDone    = 0
	tmfFunctionSucceed = 10
	tmfFunctionReject  = 11

	tmfReqSize = 4 + 4 + 8 + 8 // type, subtype, lun, tag
	anReqSize  = 4 + 8 + 4     // type, lun, event_requested
	anRespSize = 4 + 1         // event_actual, response
)

// ctrlQueue serves the control queue on its own goroutine (sideQueue):
// task management is rare, and answering it may wait for in-flight I/O.
type ctrlQueue struct {
	sideQueue
}

func startCtrlQueue(s *session, v *vring, vq *virtq.Queue) *ctrlQueue {
	cq := &ctrlQueue{}
	cq.init(s, v, vq)
	go cq.run()
	return cq
}

func (cq *ctrlQueue) run() {
	defer close(cq.done)
	kicks, tickC, release := cq.wakeups()
	defer release()
	var c virtq.Chain
	for {
		for {
			ok, err := cq.vq.Pop(&c)
			if err != nil {
				if ce, isChain := err.(*virtq.ChainError); isChain {
					cq.vq.Push(ce.Head, 0)
					cq.s.log.Warn("malformed control queue chain", "err", err)
					continue
				}
				cq.s.log.Error("control queue broken by the driver", "err", err)
				<-cq.quit
				return
			}
			if !ok {
				break
			}
			cq.push(&c, cq.handle(&c))
		}
		cq.publish()
		// With EVENT_IDX the driver kicks only when avail->idx passes
		// avail_event, which SetNotification moves to the current index; then
		// look once more for a chain added before the driver could see it.
		cq.vq.SetNotification(true)
		if cq.vq.HasAvail() {
			continue
		}
		select {
		case <-cq.quit:
			return
		case _, ok := <-kicks:
			if !ok {
				kicks = nil
			}
		case <-tickC:
		}
	}
}

// handle answers one control request and returns the bytes written.
func (cq *ctrlQueue) handle(c *virtq.Chain) uint32 {
	var req [tmfReqSize]byte
	if c.ReadLen < 4 {
		return 0
	}
	n := min(int(c.ReadLen), len(req))
	gather(req[:n], c.Readable())
	typ := binary.LittleEndian.Uint32(req[0:])
	switch typ {
	case ctrlTMF:
		if c.ReadLen < tmfReqSize || c.WriteLen < 1 {
			return 0
		}
		resp := cq.tmf(binary.LittleEndian.Uint32(req[4:]), req[8:16])
		scatter(c.Writable(), []byte{resp})
		return 1
	case ctrlANQuery, ctrlANSubscribe:
		if c.ReadLen < anReqSize || c.WriteLen < anRespSize {
			return 0
		}
		// No asynchronous notifications are supported: event_actual 0, OK.
		scatter(c.Writable(), []byte{0, 0, 0, 0, respOK})
		return anRespSize
	}
	return 0
}

// tmf runs a task-management function. Affected commands must complete before
// the TMF does (virtio spec 5.6.6.2.1); our commands cannot be cancelled once
// submitted, so an abort or reset waits until every request the session had
// in flight when it arrived has completed (session.waitTaskSet; not for the
// queues to be empty, which a busy guest's other queues may never be), then
// reports FUNCTION COMPLETE. Linux waits for this answer with no timeout, so
// every path answers; the wait runs on this goroutine, off the reactors.
func (cq *ctrlQueue) tmf(subtype uint32, lun []byte) byte {
	if lun[0] != 1 {
		return respBadTarget
	}
	t := cq.s.c.table.Load().targets[lun[1]]
	if t == nil {
		return respBadTarget
	}
	if lun[2] != 0 && lun[2]&0xc0 != 0x40 {
		return respIncorrectLUN
	}
	id := (uint16(lun[2])<<8 | uint16(lun[3])) & 0x3fff
	if t.find(id) == nil && subtype != tmfITNexusReset {
		return respIncorrectLUN
	}
	switch subtype {
	case tmfAbortTask, tmfAbortTaskSet, tmfClearTaskSet, tmfLUNReset, tmfITNexusReset:
		cq.s.c.Stats.tmfs.Add(1)
		cq.s.waitTaskSet(cq.quit)
		return tmfFunctionDone
	case tmfQueryTask, tmfQueryTaskSet:
		if cq.s.inflight() > 0 {
			return tmfFunctionSucceed
		}
		return tmfFunctionDone
	case tmfClearACA:
		return tmfFunctionReject
	}
	return tmfFunctionReject
}

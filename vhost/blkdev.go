package vhost

import (
	"encoding/binary"
	"errors"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"vhost-target/bdev"
	"vhost-target/vhost/blk"
	"vhost-target/vhost/proto"
	"vhost-target/vhost/virtq"
)

// The vhost-user-blk device (issue 13). A blk controller is the same
// controller as a scsi one with three differences, each decided here:
//
//   - Its disk is the LUN table's one LUN (target 0, LUN 0), so channels,
//     counters, draining and resizes are the SCSI LUN's code; lunRef.disk
//     holds its virtio-blk view (vhost/blk), rebuilt on a capacity change.
//   - Every vring is a request queue (no control or event queue): queue i is
//     vring i. queue.execute hands chains to executeBlk.
//   - It has a config space (protocol feature CONFIG): GET_CONFIG answers
//     from blk.Disk.Config, SET_CONFIG takes the writeback byte, and a
//     resize tells the front-end through the back-end request channel
//     (BACKEND_REQ, CONFIG_CHANGE_MSG).

// blkSegMax is the seg_max advertised: data segments of one request. A
// chain holds at most virtq.MaxSegments host segments, two of which the
// header and the status take (a guest buffer split across memory regions
// takes one more, which the slack in MaxSegments covers for QEMU's
// seg_max = 126 default).
const blkSegMax = 126

// backendConfigChangeMsg is VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, sent on
// the back-end request channel.
const backendConfigChangeMsg = 2

// configWriteback is the offset of the writeback byte in struct
// virtio_blk_config.
const configWriteback = 32

// blkSession is a blk session's own state.
type blkSession struct {
	// writeThrough is set when the driver switched the cache to
	// writethrough (SET_CONFIG writeback = 0): a write then completes only
	// once it is durable (a flush follows it on a bdev with a volatile
	// cache). Read by reactors at each write. Kept across device resets, as
	// QEMU keeps its copy of the config space and does not send it again,
	// and across target restarts in the inflight area (inflight.go).
	writeThrough atomic.Bool

	// backend is the back-end request channel (SET_BACKEND_REQ_FD), or -1.
	// Written by the session goroutine, used by whoever reports a resize.
	backendMu sync.Mutex
	backend   int
}

// isBlk reports whether the controller presents virtio-blk.
func (c *Controller) isBlk() bool { return c.cfg.Kind == KindBlk }

// firstRequest is the vring index of request queue 0.
func (s *session) firstRequest() int {
	if s.c.isBlk() {
		return 0
	}
	return 2
}

// disk returns the blk controller's disk as of now.
func (c *Controller) disk() *blk.Disk {
	if t := c.table.Load().targets[0]; t != nil && len(t.luns) > 0 {
		return t.luns[0].disk
	}
	return nil
}

// blkOffered is the feature set of a blk controller: the disk's virtio-blk
// features and the ring features every controller offers.
func (s *session) blkOffered() uint64 {
	f := uint64(1)<<proto.FVersion1 | 1<<proto.FRingIndirectDesc | 1<<proto.FRingEventIdx | 1<<proto.FProtocolFeatures
	if d := s.c.disk(); d != nil {
		f |= d.Features()
	}
	return f
}

// blkConfig answers GET_CONFIG: the config space at the offset and size
// asked (zeroes beyond what the device describes: a newer QEMU asks for a
// longer struct, with fields we do not offer).
func (s *session) blkConfig(m *proto.Msg) error {
	cfg, _, err := proto.DecodeConfig(m)
	if err != nil {
		return err
	}
	var space [proto.ConfigMaxSize]byte
	if d := s.c.disk(); d != nil {
		d.Config(space[:], uint16(s.c.cfg.NumQueues), blkSegMax, !s.blk.writeThrough.Load())
	}
	b := make([]byte, proto.ConfigHeaderSize+int(cfg.Size))
	binary.LittleEndian.PutUint32(b[0:], cfg.Offset)
	binary.LittleEndian.PutUint32(b[4:], cfg.Size)
	binary.LittleEndian.PutUint32(b[8:], cfg.Flags)
	if uint64(cfg.Offset)+uint64(cfg.Size) <= uint64(len(space)) {
		copy(b[proto.ConfigHeaderSize:], space[cfg.Offset:])
	}
	return s.conn.Reply(m.Request, b)
}

// blkSetConfig takes SET_CONFIG: the writeback byte is the one field a
// driver may write (VIRTIO_BLK_F_CONFIG_WCE). Any other write is refused
// (a non-zero answer when the front-end asks for one) and logged; it does
// not end the session.
func (s *session) blkSetConfig(m *proto.Msg) (replied bool, err error) {
	cfg, data, err := proto.DecodeConfig(m)
	if err != nil {
		return false, err
	}
	ok := cfg.Offset == configWriteback && len(data) == 1 && data[0] <= 1
	if ok {
		s.blk.writeThrough.Store(data[0] == 0)
		s.saveState() // for a restarted target: QEMU will not send it again
		s.log.Info("driver set the cache mode", "writeback", data[0] == 1)
	} else {
		s.log.Warn("SET_CONFIG refused: only the writeback byte is writable", "offset", cfg.Offset, "size", cfg.Size)
	}
	if !m.NeedReply() {
		return false, nil
	}
	var v uint64
	if !ok {
		v = 1
	}
	return true, s.conn.ReplyU64(m.Request, v)
}

// setBackendReq keeps the back-end request channel of a blk session that
// negotiated BACKEND_REQ; other sessions drop the fd (the caller closes it).
func (s *session) setBackendReq(m *proto.Msg) {
	if !s.c.isBlk() || s.protoFeatures&(1<<proto.PFBackendReq) == 0 {
		return
	}
	s.blk.backendMu.Lock()
	if s.blk.backend >= 0 {
		unix.Close(s.blk.backend)
	}
	s.blk.backend = m.FDs[0]
	m.FDs[0] = -1 // taken
	s.blk.backendMu.Unlock()
}

// closeBackendReq closes the back-end request channel (teardown).
func (s *session) closeBackendReq() {
	s.blk.backendMu.Lock()
	if s.blk.backend >= 0 {
		unix.Close(s.blk.backend)
		s.blk.backend = -1
	}
	s.blk.backendMu.Unlock()
}

// configChanged tells the front-end that the config space changed (a
// resize): CONFIG_CHANGE_MSG on the back-end request channel, on which QEMU
// reads the config again and, if the capacity moved, interrupts the guest.
// Without the channel the guest sees the new size at its next config read.
// Never blocks: a front-end that does not read its channel misses it.
func (s *session) configChanged() {
	s.blk.backendMu.Lock()
	defer s.blk.backendMu.Unlock()
	if s.blk.backend < 0 {
		s.log.Info("disk changed; the front-end has no back-end request channel to be told on")
		return
	}
	var hdr [proto.HeaderSize]byte
	binary.LittleEndian.PutUint32(hdr[0:], backendConfigChangeMsg)
	binary.LittleEndian.PutUint32(hdr[4:], proto.FlagVersion)
	if err := unix.Send(s.blk.backend, hdr[:], unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL); err != nil {
		s.log.Warn("could not send CONFIG_CHANGE_MSG on the back-end request channel", "err", err)
		return
	}
	s.log.Info("config change sent to the front-end")
}

// Errors of the blk path, counted as the SCSI path counts its sense.
func blkErrorKind(err error) ErrorKind {
	switch {
	case errors.Is(err, blk.ErrReadOnly):
		return ErrDataProtect
	case errors.Is(err, blk.ErrAlign), errors.Is(err, blk.ErrRange), errors.Is(err, blk.ErrSegments),
		errors.Is(err, blk.ErrFlags), errors.Is(err, blk.ErrUnsupp), errors.Is(err, blk.ErrTooMany):
		return ErrIllegalRequest
	case errors.Is(err, bdev.ErrBusy):
		return ErrBusy
	case err != nil:
		return ErrMedium
	}
	return ErrOther
}

// executeBlk runs one virtio-blk request: answered at once, or submitted
// to the disk's bdev (IODone → blkDone).
func (q *queue) executeBlk(r *request) {
	br := r.br
	r.lun, r.start = -1, 0
	t := q.s.c.table.Load().targets[0]
	if t == nil || len(t.luns) == 0 {
		// Never for a blk controller (its disk is not removable); a request
		// without a disk fails alone.
		br.Status = blk.StatusIOErr
		q.st.BadRequests++
		q.finishBlk(r)
		return
	}
	ref := &t.luns[0]
	r.lun = ref.slot
	act, err := ref.disk.Prepare(br, r.chain.Readable(), r.chain.Writable())
	if err != nil {
		switch err {
		case blk.ErrNoStatus, blk.ErrShortHdr:
			q.st.BadRequests++
		default:
			q.lunSt[r.lun].Errors[blkErrorKind(err)]++
		}
		q.finishBlk(r)
		return
	}
	if act == blk.Answer {
		q.finishBlk(r)
		return
	}
	r.start = q.now
	q.lunSt[r.lun].InFlight++
	q.chans[r.lun].Submit(&br.IO) // completes through IODone, maybe inline
}

// blkDone completes a submitted blk request. A write on a writethrough
// disk with a volatile cache goes back to the bdev once more as a flush.
func (q *queue) blkDone(r *request) {
	br := r.br
	io := &br.IO
	if io.Op == bdev.OpWrite && io.Err == nil && q.s.blk.writeThrough.Load() && q.s.c.disk().Info().WriteCache {
		io.Op, io.Iov = bdev.OpFlush, nil
		q.lunSt[r.lun].Flushes++ // the flushes metric counts what the bdev was asked
		q.chans[r.lun].Submit(io)
		return
	}
	br.Complete()
	st := &q.lunSt[r.lun]
	st.InFlight--
	d := q.now - r.start
	st.Latency[latencyBucket(d)]++
	st.LatencyNanos += uint64(d)
	if io.Err != nil {
		st.Errors[blkErrorKind(io.Err)]++
	}
	switch br.Type {
	case blk.TypeIn:
		st.Reads++
		st.ReadBytes += io.Len
	case blk.TypeOut:
		st.Writes++
		st.WriteBytes += io.Len
	case blk.TypeFlush:
		st.Flushes++
	case blk.TypeDiscard, blk.TypeWriteZeroes:
		st.Unmaps++
	}
	q.finishBlk(r)
}

// finishBlk writes the status and pushes the used element. While logging,
// every device-writable byte of the chain is marked: the status is its
// last byte, after data the device may have left unwritten (GET_ID).
func (q *queue) finishBlk(r *request) {
	written := r.br.Finish()
	if q.log != nil && written > 0 {
		q.markWritten(r, r.chain.WriteLen)
	}
	q.push(r, written)
}

// blkRequests gives each slot of a blk queue its request state, with data
// segment scratch for the longest chain.
func (q *queue) blkRequests() {
	brs := make([]blk.Request, len(q.slots))
	for i := range q.slots {
		r := &q.slots[i]
		r.br = &brs[i]
		r.br.Iov = r.data[:0:virtq.MaxSegments]
		r.br.IO.Done = r
	}
}

package vhost

import (
	"fmt"
	"math"

	"golang.org/x/sys/unix"

	"vhost-target/vhost/proto"
	"vhost-target/vhost/virtq"
)

// inflightArea is a session's inflight I/O tracking area (PROTOCOL_F_INFLIGHT_SHMFD, vhost-user.rst
// "Inflight I/O tracking"): one region per vring, each laid out by virtq (inflight.go there), in memory the
// front-end keeps across a back-end crash and hands to the next back-end with SET_INFLIGHT_FD. The session
// owns it (lifecycle.go): it is replaced only with every ring stopped and unmapped at reset and teardown,
// after every ring has stopped, so no queue ever holds a slice of an unmapped area.
type inflightArea struct {
	mapping   []byte // the whole mmap, from file offset 0
	area      []byte // [mmap_offset, mmap_offset+mmap_size)
	numQueues uint16
	queueSize uint16
	stride    uint64
	// state is the session state kept after the queue regions (below), or
	// nil when the area has no room for it (one another back-end made).
	state []byte
}

// The session state an area keeps for the next back-end. The area is the
// back-end's to lay out and the front-end only hands it on (vhost-user.rst:
// the front-end keeps it across a back-end restart), so an area we allocate
// carries, after the queue regions, what a restarted target must know that
// the front-end will not send again: a blk driver's choice of writethrough,
// which QEMU sent once with SET_CONFIG and keeps in its own copy of the
// config space. Without it, a target restarted under a guest that chose
// writethrough would acknowledge writes before they are durable while the
// guest sends no flushes. Layout: 8 bytes of magic, then one flags byte.
const (
	inflightStateBytes = 64
	inflightStateMagic = "vtstate1"
	stateWriteThrough  = 1 << 0
)

// stateAt returns the state block of an area whose queue regions take need
// bytes, or nil when the area has no room for one.
func stateAt(area []byte, need uint64) []byte {
	if uint64(len(area)) < need+inflightStateBytes {
		return nil
	}
	return area[need : need+inflightStateBytes : need+inflightStateBytes]
}

// saveState writes the session's state into its area, if the area has room.
func (s *session) saveState() {
	a := s.inflightArea
	if a == nil || a.state == nil {
		return
	}
	var flags byte
	if s.blk.writeThrough.Load() {
		flags |= stateWriteThrough
	}
	a.state[len(inflightStateMagic)] = flags
	copy(a.state, inflightStateMagic)
}

// restoreState takes the state a previous back-end left in a received area
// (read once: the front-end's memory). An area without our magic (new, or
// another back-end's) leaves the session as it is and gets our state.
func (s *session) restoreState(a *inflightArea) {
	if a.state == nil {
		return
	}
	if string(a.state[:len(inflightStateMagic)]) == inflightStateMagic {
		flags := a.state[len(inflightStateMagic)]
		wt := flags&stateWriteThrough != 0
		if wt != s.blk.writeThrough.Load() {
			s.blk.writeThrough.Store(wt)
			s.log.Info("cache mode restored from the inflight area (the driver's choice before a restart)",
				"writeback", !wt)
		}
	}
}

// inflightAreaMax bounds an area: every vring at the largest split ring size (about 33 MiB), and our state.
var inflightAreaMax = (2+MaxQueues)*virtq.InflightQueueBytes(virtq.MaxSize) + inflightStateBytes

// region returns vring idx's region, or nil when the area was laid out for fewer vrings.
func (a *inflightArea) region(idx int) []byte {
	if idx >= int(a.numQueues) {
		return nil
	}
	off := uint64(idx) * a.stride // cannot overflow: numQueues*stride ≤ len(area), checked when mapped
	return a.area[off : off+a.stride : off+a.stride]
}

func (a *inflightArea) close() {
	if a != nil && a.mapping != nil {
		unix.Munmap(a.mapping)
		a.mapping, a.area = nil, nil
	}
}

// checkInflightShape checks the queue count and size of an inflight description against our bounds and
// returns the area size they need. Guest-controlled input: every failure is a protocol error.
func (s *session) checkInflightShape(req proto.Request, f proto.Inflight) (uint64, error) {
	if s.protoFeatures&(1<<proto.PFInflightShmFD) == 0 {
		return 0, protoErr("%v without PROTOCOL_F_INFLIGHT_SHMFD negotiated", req)
	}
	if f.NumQueues == 0 || int(f.NumQueues) > len(s.vrings) {
		return 0, protoErr("%v: %d queues (we serve at most %d vrings)", req, f.NumQueues, len(s.vrings))
	}
	if f.QueueSize == 0 || f.QueueSize&(f.QueueSize-1) != 0 || uint32(f.QueueSize) > virtq.MaxSize {
		return 0, protoErr("%v: queue size %d is not a power of two in 1..%d", req, f.QueueSize, virtq.MaxSize)
	}
	// Cannot overflow: at most 66 queues of InflightQueueBytes(32768).
	return uint64(f.NumQueues) * virtq.InflightQueueBytes(f.QueueSize), nil
}

// getInflightFD allocates a zeroed area for the front-end's queues in a sealed memfd (it cannot grow or
// shrink under either side's mapping), makes it the session's and replies with its fd, as
// libvhost-user's vu_get_inflight_fd and DPDK's vhost_user_get_inflight_fd do.
func (s *session) getInflightFD(m *proto.Msg) error {
	f, err := proto.DecodeInflight(m)
	if err != nil {
		return err
	}
	size, err := s.checkInflightShape(m.Request, f)
	if err != nil {
		return err
	}
	fd, err := unix.MemfdCreate("vhost-target-inflight", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return fmt.Errorf("GET_INFLIGHT_FD: memfd: %w", err)
	}
	defer unix.Close(fd) // the mapping and the front-end's copy keep the memory
	need := size
	size += inflightStateBytes
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		return fmt.Errorf("GET_INFLIGHT_FD: ftruncate %d: %w", size, err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_GROW|unix.F_SEAL_SHRINK|unix.F_SEAL_SEAL); err != nil {
		return fmt.Errorf("GET_INFLIGHT_FD: seal: %w", err)
	}
	mapping, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("GET_INFLIGHT_FD: mmap %d: %w", size, err)
	}
	a := &inflightArea{mapping: mapping, area: mapping, numQueues: f.NumQueues, queueSize: f.QueueSize,
		stride: virtq.InflightQueueBytes(f.QueueSize), state: stateAt(mapping, need)}
	for i := range int(f.NumQueues) {
		virtq.InitInflight(a.region(i), f.QueueSize)
	}
	reply := proto.Inflight{MmapSize: size, NumQueues: f.NumQueues, QueueSize: f.QueueSize}.Encode()
	if err := s.conn.Send(m.Request, proto.FlagVersion|proto.FlagReply, reply, fd); err != nil {
		a.close()
		return err
	}
	s.log.Debug("inflight area allocated", "queues", f.NumQueues, "queue_size", f.QueueSize, "bytes", size)
	return s.replaceInflight(a)
}

// setInflightFD maps the area the front-end hands over (after a reconnect: the one a previous back-end
// allocated) after checking its shape, size and offset against the fd, so that touching it cannot SIGBUS:
// the fd must be a regular file (a memfd) long enough, sealed against shrinking.
func (s *session) setInflightFD(m *proto.Msg) error {
	f, err := proto.DecodeInflight(m)
	if err != nil {
		return err
	}
	need, err := s.checkInflightShape(m.Request, f)
	if err != nil {
		return err
	}
	switch {
	case f.MmapSize < need || f.MmapSize > inflightAreaMax:
		return protoErr("SET_INFLIGHT_FD: %d bytes for %d queues of %d (need %d, at most %d)",
			f.MmapSize, f.NumQueues, f.QueueSize, need, inflightAreaMax)
	case f.MmapOffset%8 != 0 || f.MmapOffset > math.MaxInt-f.MmapSize:
		return protoErr("SET_INFLIGHT_FD: mmap offset %#x", f.MmapOffset)
	}
	fd := m.FDs[0]
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return protoErr("SET_INFLIGHT_FD: fstat: %v", err)
	}
	end := f.MmapOffset + f.MmapSize // cannot overflow: checked above
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Size < 0 || uint64(st.Size) < end {
		return protoErr("SET_INFLIGHT_FD: fd is not a file of at least %d bytes (mode %#o, %d bytes)", end, st.Mode, st.Size)
	}
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil || seals&unix.F_SEAL_SHRINK == 0 {
		return protoErr("SET_INFLIGHT_FD: fd is not sealed against shrinking (seals %#x, %v)", seals, err)
	}
	mapping, err := unix.Mmap(fd, 0, int(end), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return protoErr("SET_INFLIGHT_FD: mmap %d bytes: %v", end, err)
	}
	a := &inflightArea{mapping: mapping, area: mapping[f.MmapOffset:end:end], numQueues: f.NumQueues,
		queueSize: f.QueueSize, stride: virtq.InflightQueueBytes(f.QueueSize)}
	a.state = stateAt(a.area, need)
	s.log.Info("inflight area received: rings starting now resume requests in flight", "queues", f.NumQueues,
		"queue_size", f.QueueSize, "bytes", f.MmapSize)
	s.restoreState(a)
	return s.replaceInflight(a)
}

// replaceInflight makes a the session's area. Running rings hold slices of the old one: they are drained
// and stopped first, and restart on the new one.
func (s *session) replaceInflight(a *inflightArea) error {
	return s.restartAround(func() error {
		s.inflightArea.close()
		s.inflightArea = a
		s.saveState()
		return nil
	})
}

// inflightRegion returns the region vring v tracks its requests in, or nil. Only request queues are tracked
// (every vring of a blk device, from 2 on for scsi): the control and event queues complete every chain in the order they take them (ctrlq.go, eventq.go), so
// after a crash the SET_VRING_BASE = used->idx that QEMU sends (virtio_queue_restore_last_avail_idx) starts
// them at the first chain not completed, and nothing is lost or run twice without tracking.
func (s *session) inflightRegion(v *vring) []byte {
	if s.inflightArea == nil || v.idx < s.firstRequest() {
		return nil
	}
	return s.inflightArea.region(v.idx)
}

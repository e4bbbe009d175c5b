package vhost

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"vhost-target/vhost/dirtylog"
	"vhost-target/vhost/guestmem"
	"vhost-target/vhost/proto"
	"vhost-target/vhost/virtq"
)

// Features the target offers.
const (
	offeredFeatures = 1<<proto.FVersion1 | 1<<proto.FRingIndirectDesc | 1<<proto.FRingEventIdx |
		1<<proto.FProtocolFeatures | 1<<proto.FVirtioSCSIHotplug | 1<<proto.FVirtioSCSIChange
	offeredProtocolFeatures = 1<<proto.PFMQ | 1<<proto.PFReplyAck | 1<<proto.PFResetDevice |
		1<<proto.PFConfigureMemSlots | 1<<proto.PFInflightShmFD
	// maxMemSlots answers GET_MAX_MEM_SLOTS: regions ADD_MEM_REG may build up
	// (QEMU caps it at its own 512 slots; libvhost-user and rust-vmm use 509).
	maxMemSlots = guestmem.MaxRegions
	// refusedFeatures would change the ring format or address translation; we
	// implement neither, so a front-end that insists is refused (notes A.5).
	refusedFeatures = 1<<proto.FRingPacked | 1<<proto.FAccessPlatform | 1<<proto.FVirtioSCSIT10PI
)

// errProtocol marks a front-end message that breaks the protocol: the
// connection is closed with one log line.
var errProtocol = errors.New("protocol error")

func protoErr(format string, a ...any) error {
	return fmt.Errorf("%w: %s", errProtocol, fmt.Sprintf(format, a...))
}

// vring is the control plane's view of one virtqueue.
type vring struct {
	idx     int
	num     uint32
	base    uint16 // next avail index; updated when a running queue stops
	addr    proto.VringAddr
	addrSet bool
	kickSet bool // SET_VRING_KICK seen since the last stop
	kick    int  // eventfd or -1 (polling)
	call    int  // eventfd or -1
	enabled bool

	req  *queue      // running request queue (scsi: idx >= 2; blk: every vring)
	ctrl *ctrlQueue  // running control queue (scsi, idx == 0)
	evq  *eventQueue // running event queue (scsi, idx == 1)
}

// session is one connected front-end (lifecycle.go has its states).
type session struct {
	c     *Controller
	conn  *proto.Conn
	uconn *net.UnixConn
	log   *slog.Logger
	id    uint64 // per controller, from 1, in log lines
	peer  string // the front-end process, for log lines
	// hungUp is set (under c.mu) when the connection ends; the session
	// still drains its queues but no longer counts against max_sessions.
	hungUp bool

	features, protoFeatures uint64
	featuresAcked           bool
	owner                   bool
	mem                     *guestmem.Table
	vrings                  [2 + MaxQueues]vring
	// inflightArea is the inflight I/O tracking area (inflight.go), nil
	// until GET_INFLIGHT_FD or SET_INFLIGHT_FD.
	inflightArea *inflightArea
	// dirty is the dirty page log (migration.go), nil until SET_LOG_BASE.
	dirty *dirtylog.Log
	// logKick is the eventfd of SET_LOG_FD, or -1: request queues write it
	// after publishing while logging, as libvhost-user does (QEMU sends
	// none; it reads the shared log when it syncs).
	logKick int
	broken  bool
	// blk is a blk controller's session state (blkdev.go).
	blk blkSession

	// live lists the running request queues for the control queue's
	// goroutine (task management waits for their in-flight requests).
	qmu  sync.Mutex
	live []*queue

	// negotiated mirrors features for the control plane's goroutines
	// (which events the driver wants); 0 until SET_FEATURES, after a reset.
	negotiated atomic.Uint64
	// events are the virtio-scsi events not yet delivered (eventq.go).
	events sessionEvents
	// ua holds the unit attentions pending for this session (the I_T
	// nexus), by LUN slot (luns.go): written under Controller.lunsMu,
	// cleared by the reactor that reports one.
	ua atomic.Pointer[uaFlags]
}

func newSession(c *Controller, conn *net.UnixConn, id uint64, peer string) *session {
	s := &session{c: c, conn: proto.NewConn(conn), uconn: conn, log: c.log.With("session", id), id: id, peer: peer, logKick: -1}
	s.events.wake = make(chan struct{}, 1)
	s.blk.backend = -1
	for i := range s.vrings {
		s.vrings[i] = vring{idx: i, kick: -1, call: -1}
	}
	return s
}

// shutdown asks serve to end: it drains and releases everything on its way out.
func (s *session) shutdown() { s.uconn.CloseRead() }

func (s *session) serve() {
	s.log.Info("front-end connected", "peer", s.peer)
	s.c.Stats.connections.Add(1)
	defer func() {
		s.c.hangUp(s)
		s.teardown()
		s.conn.Close()
		s.log.Info("front-end disconnected; session state dropped")
	}()
	for {
		m, err := s.conn.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
				return
			}
			s.c.Stats.protocolErrors.Add(1)
			s.log.Warn("closing connection: bad message", "err", err)
			return
		}
		if s.log.Enabled(nil, slog.LevelDebug) {
			s.log.Debug("message", "request", m.Request.String(), "flags", m.Flags, "payload", fmt.Sprintf("%x", m.Payload), "fds", len(m.FDs))
		}
		if err := s.handle(m); err != nil {
			m.CloseFDs()
			s.c.Stats.protocolErrors.Add(1)
			s.log.Warn("closing connection", "request", m.Request.String(), "err", err)
			return
		}
		m.CloseFDs() // any fd a handler did not take
	}
}

// fdRule says how many fds a message may carry.
func wantFDs(m *proto.Msg) (min, max int) {
	switch m.Request {
	case proto.SetMemTable:
		return 0, proto.MaxMemRegions // DecodeMemTable requires one per region
	case proto.SetVringKick, proto.SetVringCall, proto.SetVringErr:
		if len(m.Payload) == 8 && m.Payload[1]&1 != 0 { // bit 8 of the u64: no fd
			return 0, 0
		}
		return 1, 1
	case proto.SetLogFD, proto.SetBackendReqFD, proto.AddMemReg, proto.SetInflightFD:
		return 1, 1
	case proto.SetLogBase:
		return 0, 1 // setLogBase refuses none with a message of its own
	case proto.RemMemReg:
		return 0, 1 // QEMU before 7.1 sent the region's fd; the spec now says none
	}
	return 0, 0
}

func (s *session) handle(m *proto.Msg) error {
	// The REPLY flag on a request and payload bytes past a message's body are
	// ignored, as DPDK's lib/vhost and libvhost-user ignore them (both read
	// the payload into a union); a payload shorter than its body is still
	// refused by its decoder. See the table in vhost/peers_test.go.
	if n, ok := proto.BodySize(m); ok && len(m.Payload) > n {
		m.Payload = m.Payload[:n]
	}
	if lo, hi := wantFDs(m); len(m.FDs) < lo || len(m.FDs) > hi {
		return protoErr("%d fds attached, want %d..%d", len(m.FDs), lo, hi)
	}
	replied := false
	var err error
	switch m.Request {
	case proto.GetFeatures:
		err, replied = s.conn.ReplyU64(m.Request, s.offered()), true
	case proto.SetFeatures:
		err = s.setFeatures(m)
	case proto.GetProtocolFeatures:
		err, replied = s.conn.ReplyU64(m.Request, s.offeredProtocol()), true
	case proto.SetProtocolFeatures:
		var v uint64
		if v, err = proto.U64(m); err == nil {
			// Bits we never offered are ignored rather than fatal (notes A.5).
			s.protoFeatures = v & s.offeredProtocol()
		}
	case proto.GetQueueNum:
		err, replied = s.conn.ReplyU64(m.Request, uint64(s.firstRequest()+s.c.cfg.NumQueues)), true
	case proto.SetOwner:
		s.owner = true
	case proto.ResetOwner, proto.ResetDevice:
		s.reset()
	case proto.SetMemTable:
		err = s.setMemTable(m)
	case proto.GetMaxMemSlots:
		err, replied = s.conn.ReplyU64(m.Request, maxMemSlots), true
	case proto.AddMemReg, proto.RemMemReg:
		err = s.changeMemReg(m)
	case proto.SetVringNum:
		err = s.setVringNum(m)
	case proto.SetVringAddr:
		err = s.setVringAddr(m)
	case proto.SetVringBase:
		err = s.setVringBase(m)
	case proto.GetVringBase:
		err, replied = s.getVringBase(m), true
	case proto.SetVringKick, proto.SetVringCall, proto.SetVringErr:
		err = s.setVringFD(m)
	case proto.SetVringEnable:
		err = s.setVringEnable(m)
	case proto.GetConfig:
		if s.c.isBlk() {
			err, replied = s.blkConfig(m), true
			break
		}
		// vhost-user-scsi's config space comes from QEMU, not us; we do not
		// offer PROTOCOL_F_CONFIG. Refuse cleanly: a reply with size 0.
		var cfg proto.Config
		if cfg, _, err = proto.DecodeConfig(m); err == nil {
			var b [proto.ConfigHeaderSize]byte
			binary.LittleEndian.PutUint32(b[0:], cfg.Offset)
			binary.LittleEndian.PutUint32(b[8:], cfg.Flags)
			err, replied = s.conn.Reply(m.Request, b[:]), true
		}
	case proto.SetConfig:
		if s.c.isBlk() {
			replied, err = s.blkSetConfig(m)
			break
		}
		if _, _, err = proto.DecodeConfig(m); err == nil && m.NeedReply() {
			err, replied = s.conn.ReplyU64(m.Request, 1), true // refused: we have no config space
		}
	case proto.GetInflightFD:
		err, replied = s.getInflightFD(m), true
	case proto.SetInflightFD:
		err = s.setInflightFD(m)
	case proto.SetLogBase:
		err, replied = s.setLogBase(m), true
	case proto.SetLogFD:
		err = s.setLogFD(m)
	case proto.SetBackendReqFD:
		// Kept by a blk session that negotiated it; otherwise accepted and
		// dropped (closed by the caller).
		s.setBackendReq(m)
	default:
		return protoErr("unsupported request %v (%d)", m.Request, uint32(m.Request))
	}
	if err != nil {
		return err
	}
	// NEED_REPLY is answered whether or not REPLY_ACK was negotiated, as DPDK
	// and libvhost-user answer it: a front-end that asks waits for the ack.
	if !replied && m.NeedReply() {
		return s.conn.ReplyU64(m.Request, 0)
	}
	return nil
}

func (s *session) setFeatures(m *proto.Msg) error {
	v, err := proto.U64(m)
	if err != nil {
		return err
	}
	refused := uint64(refusedFeatures)
	if s.c.isBlk() {
		refused &^= 1 << proto.FVirtioSCSIT10PI // a SCSI bit; unused in virtio-blk
	}
	if v&refused != 0 {
		return protoErr("front-end requires features %#x we do not implement (packed ring, IOMMU or T10-PI)", v&refused)
	}
	// Extra bits such as VIRTIO_F_RING_RESET or ANY_LAYOUT arrive unoffered from
	// QEMU 7.2; they change nothing we do, so they are tolerated.
	before := s.features
	s.features = v
	s.featuresAcked = true
	s.negotiated.Store(v)
	if err := s.logChanged(before); err != nil {
		return err
	}
	// Without PROTOCOL_FEATURES rings are enabled as soon as they start.
	return s.updateAll()
}

// vringState decodes a {index, num} payload and finds its vring.
func (s *session) vringState(m *proto.Msg) (*vring, proto.VringState, error) {
	st, err := proto.DecodeVringState(m)
	if err != nil {
		return nil, st, err
	}
	v, err := s.vringIndex(st.Index)
	return v, st, err
}

func (s *session) vringIndex(idx uint32) (*vring, error) {
	if idx >= uint32(len(s.vrings)) || s.c.isBlk() && idx >= MaxQueues {
		return nil, protoErr("vring index %d out of range (max %d)", idx, len(s.vrings)-1)
	}
	return &s.vrings[idx], nil
}

func (s *session) setMemTable(m *proto.Msg) error {
	regs, err := proto.DecodeMemTable(m)
	if err != nil {
		return err
	}
	gr := make([]guestmem.Region, len(regs))
	for i, r := range regs {
		gr[i] = guestmem.Region{GPA: r.GPA, Size: r.Size, UVA: r.UVA, MmapOffset: r.MmapOffset}
	}
	if s.mem != nil && s.mem.Equal(gr) && s.mem.SameFiles(m.FDs) {
		return nil // QEMU resends the same table at every start (notes A.3)
	}
	// Quiesce every running ring before the old mappings go away: requests in
	// flight write into guest memory.
	err = s.restartAround(func() error {
		t, err := guestmem.Map(gr, m.FDs)
		if err != nil {
			return protoErr("SET_MEM_TABLE: %v", err)
		}
		if s.mem != nil {
			s.mem.Close()
		}
		s.mem = t
		return nil
	})
	if err != nil {
		return err
	}
	return s.updateAll()
}

// changeMemReg handles ADD_MEM_REG and REM_MEM_REG (CONFIGURE_MEM_SLOTS):
// QEMU sends these instead of SET_MEM_TABLE once the feature is negotiated,
// one region at a time, also while rings run (memory hotplug). Like a changed
// SET_MEM_TABLE, the rings are drained and stopped around the change.
func (s *session) changeMemReg(m *proto.Msg) error {
	r, err := proto.DecodeSingleRegion(m)
	if err != nil {
		return err
	}
	gr := guestmem.Region{GPA: r.GPA, Size: r.Size, UVA: r.UVA, MmapOffset: r.MmapOffset}
	err = s.restartAround(func() error {
		var t *guestmem.Table
		var err error
		if m.Request == proto.AddMemReg {
			t, err = guestmem.Add(s.mem, gr, m.FDs[0])
		} else {
			t, err = guestmem.Remove(s.mem, gr)
		}
		if err != nil {
			return protoErr("%v: %v", m.Request, err)
		}
		s.mem = t
		s.log.Debug("memory region changed", "request", m.Request.String(), "gpa", r.GPA, "size", r.Size,
			"regions", len(t.Regions()))
		return nil
	})
	if err != nil {
		return err
	}
	return s.updateAll()
}

func (s *session) setVringNum(m *proto.Msg) error {
	v, st, err := s.vringState(m)
	if err != nil {
		return err
	}
	// Size 0 leaves the ring unconfigured (it never starts), as DPDK and
	// libvhost-user accept it; other sizes must suit our masks.
	if st.Num != 0 && (st.Num&(st.Num-1) != 0 || st.Num > virtq.MaxSize) {
		return protoErr("vring %d: size %d is not a power of two in 1..%d", st.Index, st.Num, virtq.MaxSize)
	}
	if v.running() {
		// DPDK and libvhost-user apply a new size to a running ring, SPDK's
		// target stops the session first: drain and stop it, then restart.
		s.stop(v)
	}
	v.num = st.Num
	return s.update(v)
}

func (s *session) setVringAddr(m *proto.Msg) error {
	a, err := proto.DecodeVringAddr(m)
	if err != nil {
		return err
	}
	v, err := s.vringIndex(a.Index)
	if err != nil {
		return err
	}
	if v.running() {
		// Re-addressing a running ring: stop it, then restart on the new rings.
		s.stop(v)
	}
	v.addr, v.addrSet = a, true
	if s.mem != nil {
		if _, err := s.mem.UVA(a.Desc, 1); err != nil {
			return protoErr("vring %d: descriptor table address %#x: %v", a.Index, a.Desc, err)
		}
		if _, err := s.mem.UVA(a.Avail, 1); err != nil {
			return protoErr("vring %d: avail ring address %#x: %v", a.Index, a.Avail, err)
		}
		if _, err := s.mem.UVA(a.Used, 1); err != nil {
			return protoErr("vring %d: used ring address %#x: %v", a.Index, a.Used, err)
		}
	}
	return s.update(v)
}

func (s *session) setVringBase(m *proto.Msg) error {
	v, st, err := s.vringState(m)
	if err != nil {
		return err
	}
	if v.running() {
		// As for SET_VRING_NUM: drain and stop, then restart at the new base.
		s.stop(v)
	}
	// A split ring's index is 16 bits; DPDK and libvhost-user keep the low
	// 16 bits of num and ignore the rest (packed rings use them).
	v.base = uint16(st.Num)
	return s.update(v)
}

// getVringBase stops the ring, draining in-flight requests, then replies with
// the next avail index (notes A.4).
func (s *session) getVringBase(m *proto.Msg) error {
	v, st, err := s.vringState(m)
	if err != nil {
		return err
	}
	s.stop(v)
	// The ring is now stopped: a restart needs a new SET_VRING_KICK.
	v.kickSet = false
	if v.kick >= 0 {
		unix.Close(v.kick)
		v.kick = -1
	}
	return s.conn.Reply(m.Request, proto.VringState{Index: st.Index, Num: uint32(v.base)}.Encode())
}

func (s *session) setVringFD(m *proto.Msg) error {
	val, err := proto.U64(m)
	if err != nil {
		return err
	}
	// Bits 0-7 are the index and bit 8 says "no fd"; DPDK and libvhost-user
	// ignore the others, and so do we.
	v, err := s.vringIndex(uint32(val & proto.VringIndexMask))
	if err != nil {
		return err
	}
	fd := -1
	if val&proto.VringNoFDBit == 0 {
		if m.Request != proto.SetVringErr {
			// A reactor reads the kick fd and writes the call fd without
			// blocking only if they are eventfds; a pipe could stall it and
			// every other guest it serves.
			if err := checkEventFD(m.FDs[0]); err != nil {
				return protoErr("%v vring %d: %v", m.Request, v.idx, err)
			}
		}
		fd = m.FDs[0]
		m.FDs[0] = -1 // taken
	}
	switch m.Request {
	case proto.SetVringKick:
		if v.running() {
			s.stop(v)
		}
		if v.kick >= 0 {
			unix.Close(v.kick)
		}
		v.kick, v.kickSet = fd, true
		return s.update(v)
	case proto.SetVringCall:
		old := v.call
		v.call = fd
		// A running queue swaps its call fd on its own reactor; the old fd is
		// closed only after the swap, so no signal goes to a closed fd.
		switch {
		case v.req != nil:
			v.req.setCall(fd)
		case v.ctrl != nil:
			v.ctrl.setCall(fd)
		case v.evq != nil:
			v.evq.setCall(fd)
		}
		if old >= 0 {
			unix.Close(old)
		}
	case proto.SetVringErr:
		if fd >= 0 {
			unix.Close(fd) // we never report ring errors through it
		}
	}
	return nil
}

func (s *session) setVringEnable(m *proto.Msg) error {
	v, st, err := s.vringState(m)
	if err != nil {
		return err
	}
	// Any non-zero num enables, as in DPDK (!!num) and libvhost-user (a
	// bool): SPDK's initiator sends the queue size (issue 9). Arrives for
	// rings that were never configured too (notes A.7): not an error.
	v.enabled = st.Num != 0
	return s.update(v)
}

// checkEventFD returns an error unless fd is an eventfd.
func checkEventFD(fd int) error {
	link, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil {
		return fmt.Errorf("fd: %w", err)
	}
	if link != "anon_inode:[eventfd]" {
		return fmt.Errorf("fd is not an eventfd (%s)", link)
	}
	return nil
}

func (v *vring) running() bool { return v.req != nil || v.ctrl != nil || v.evq != nil }

// ready reports whether a ring should be processed: memory, size, addresses
// and a kick, and enabled (or PROTOCOL_FEATURES not negotiated, in which case
// rings are enabled when started).
func (s *session) ready(v *vring) bool {
	enabled := v.enabled || (s.featuresAcked && s.features&(1<<proto.FProtocolFeatures) == 0)
	return !s.broken && s.mem != nil && v.num != 0 && v.addrSet && v.kickSet && enabled
}

// update starts or stops v to match ready(v).
func (s *session) update(v *vring) error {
	want := s.ready(v)
	if want == v.running() {
		return nil
	}
	if !want {
		s.stop(v)
		return nil
	}
	cfg := virtq.Config{
		Size: v.num, DescUVA: v.addr.Desc, AvailUVA: v.addr.Avail, UsedUVA: v.addr.Used,
		LastAvail: v.base,
		EventIdx:  s.features&(1<<proto.FRingEventIdx) != 0,
		Indirect:  s.features&(1<<proto.FRingIndirectDesc) != 0,
		Inflight:  s.inflightRegion(v),
	}
	s.ringLog(v, &cfg)
	vq, err := virtq.New(s.mem, cfg)
	if err != nil {
		return protoErr("vring %d: %v", v.idx, err)
	}
	if n := len(vq.Resubmits()); n > 0 {
		// The next avail index comes from the area (used idx + requests in
		// flight), not from SET_VRING_BASE, which QEMU sets to the used idx
		// after a back-end crash.
		s.log.Info("resuming requests in flight when the previous back-end ended", "vring", v.idx,
			"requests", n, "next_avail", vq.LastAvail(), "vring_base", v.base)
	}
	switch {
	case s.c.isBlk():
		// Every vring of a blk device is a request queue.
	case v.idx == 0:
		v.ctrl = startCtrlQueue(s, v, vq)
		return nil
	case v.idx == 1:
		v.evq = startEventQueue(s, v, vq)
		return nil
	}
	q, err := startQueue(s, v, vq)
	if err != nil {
		return err
	}
	v.req = q
	s.qmu.Lock()
	s.live = append(s.live, q)
	s.qmu.Unlock()
	return nil
}

func (s *session) updateAll() error {
	for i := range s.vrings {
		if err := s.update(&s.vrings[i]); err != nil {
			return err
		}
	}
	return nil
}

// stop stops a running ring and records where it stopped.
func (s *session) stop(v *vring) {
	switch {
	case v.req != nil:
		q := v.req
		v.base = q.stop()
		v.req = nil
		s.qmu.Lock()
		s.live = slices.DeleteFunc(s.live, func(x *queue) bool { return x == q })
		s.qmu.Unlock()
	case v.ctrl != nil:
		v.base = v.ctrl.stop()
		v.ctrl = nil
	case v.evq != nil:
		v.base = v.evq.stop()
		v.evq = nil
	}
}

// restartAround drains and stops the running rings, applies change (which
// swaps something they hold slices of: guest memory, the inflight area, the
// dirty page log) and starts them again on it. An error from change leaves
// them stopped; the caller's protocol error then ends the session.
func (s *session) restartAround(change func() error) error {
	running := s.stopAll()
	if err := change(); err != nil {
		return err
	}
	for _, v := range running {
		if err := s.update(v); err != nil {
			return err
		}
	}
	return nil
}

// stopAll stops every running ring and returns them.
func (s *session) stopAll() []*vring {
	var running []*vring
	for i := range s.vrings {
		if v := &s.vrings[i]; v.running() {
			s.stop(v)
			running = append(running, v)
		}
	}
	return running
}

// reset handles RESET_DEVICE / RESET_OWNER: rings stopped and forgotten,
// features cleared; the connection and its ownership stay.
func (s *session) reset() {
	s.stopAll()
	// The area describes rings that are now forgotten (QEMU frees its copy
	// on a device reset and asks for a new one at the next start).
	s.inflightArea.close()
	s.inflightArea = nil
	if err := s.dirty.Close(); err != nil {
		s.log.Warn("unmapping the dirty page log", "err", err)
	}
	s.dirty = nil
	if s.logKick >= 0 {
		unix.Close(s.logKick)
		s.logKick = -1
	}
	for i := range s.vrings {
		v := &s.vrings[i]
		if v.kick >= 0 {
			unix.Close(v.kick)
		}
		// The call fd survives a reset: QEMU 7.2 sets call fds once at device
		// init, before its RESET_DEVICEs (notes A.0); a missing interrupt hangs
		// a guest, a spurious one costs nothing.
		*v = vring{idx: i, kick: -1, call: v.call}
	}
	s.features, s.featuresAcked, s.broken = 0, false, false
	s.negotiated.Store(0)
	// The driver scans again after a reset: stale events would only
	// repeat what it finds.
	s.events.reset()
}

// teardown releases everything the session holds, after draining.
func (s *session) teardown() {
	s.reset()
	for i := range s.vrings {
		if v := &s.vrings[i]; v.call >= 0 {
			unix.Close(v.call)
			v.call = -1
		}
	}
	if s.mem != nil {
		s.mem.Close()
		s.mem = nil
	}
	s.closeBackendReq()
}

// onQueues runs f for each of the session's running queues on that queue's
// reactor (between its polls), one after another.
func (s *session) onQueues(f func(q *queue)) {
	s.qmu.Lock()
	defer s.qmu.Unlock()
	for _, q := range s.live {
		q.r.Call(func() { f(q) })
	}
}

// inflight counts the requests in flight on the session's running queues.
func (s *session) inflight() int {
	n := 0
	s.onQueues(func(q *queue) { n += q.inflight })
	return n
}

// waitTaskSet waits until every request in flight on the session's
// queues when it is called has completed, however much I/O the guest starts
// meanwhile: what an ABORT TASK or a reset must wait for before it answers
// (virtio spec 5.6.6.2.1, SAM-5 7.11). Our requests cannot be cancelled
// once submitted, and until one completes the bdev may still write into the
// guest buffers the aborted command named; a TMF answered earlier lets the
// guest reuse them. So there is no time limit (QEMU waits the same way for
// requests it cannot cancel); the wait is logged every 30 s after the first
// 10 s. It ends early only when quit closes (the control
// queue stops: the device is stopping and its queues drain on their own).
func (s *session) waitTaskSet(quit <-chan struct{}) {
	// One message per queue: requests its reactor has taken before it runs
	// are in an older epoch, those taken after in the new one. It first
	// polls the queue, so chains the driver made available before the TMF
	// (kicked, but not yet seen by a reactor that was asleep or busy) are
	// taken as older too.
	s.onQueues(func(q *queue) {
		if !q.stopping {
			q.Poll()
		}
		q.epoch++
		q.older = q.inflight
	})
	start := time.Now()
	warnAt := start.Add(10 * time.Second)
	pause := 50 * time.Microsecond
	t := time.NewTimer(pause)
	defer t.Stop()
	for {
		n := s.olderInFlight()
		if n == 0 {
			if d := time.Since(start); d >= 10*time.Second {
				s.log.Info("task management: requests in flight when it came have completed; answering", "waited", d.Round(time.Millisecond))
			}
			return
		}
		if now := time.Now(); now.After(warnAt) {
			s.log.Warn("task management: waiting for requests in flight when it came (a bdev not completing?)",
				"requests", n, "waited", now.Sub(start).Round(time.Second))
			warnAt = now.Add(30 * time.Second)
		}
		t.Reset(pause)
		select {
		case <-quit:
			s.log.Warn("task management: control queue stopping while requests it waits for are in flight; answering",
				"requests", n, "waited", time.Since(start).Round(time.Millisecond))
			return
		case <-t.C:
		}
		pause = min(2*pause, 5*time.Millisecond)
	}
}

// olderInFlight counts the requests older than the last TMF still in flight
// on the session's running queues. A queue stopped since has drained (or
// given up on) its requests; one started since has none that old.
func (s *session) olderInFlight() int {
	n := 0
	s.onQueues(func(q *queue) { n += q.older })
	return n
}

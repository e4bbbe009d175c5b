// Package frontend is the VMM side of vhost-user-scsi and vhost-user-blk: it
// plays QEMU 7.2 against a vhost-user socket so tests, fuzzers and the load
// generator can drive the target without a VM (Options.Blk: vhost-user-blk). It shares no code with the target's
// rings (vhost/virtq) on purpose: the driver-side split ring here is a second,
// independent reading of the virtio spec.
//
// Guest memory is one or two memfds mapped MAP_SHARED; descriptors carry
// guest physical addresses (GPA 0 upward) while SET_VRING_ADDR carries this
// process's virtual addresses, so a target that mixes the two fails loudly.
package frontend

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"vhost-target/vhost/proto"
)

// Virtio-scsi vring indexes (a vhost-user-blk device has request queues
// only: vring i is request queue i).
const (
	ControlVring = 0
	EventVring   = 1
	firstRequest = 2
)

// Options configure a front-end. Zero values pick the defaults noted.
type Options struct {
	NumQueues  int    // request queues; vrings = 2 + NumQueues (Blk: NumQueues) (default 1)
	QueueSize  uint16 // power of two (default 128)
	MemSize    uint64 // guest RAM bytes (default: 64 MiB, doubled until the layout fits)
	Regions    int    // 1 (default) or 2 memfds at GPA 0 and MemSize/2
	MmapOffset uint64 // guest bytes start this far into each memfd (exercises mmap_offset)
	HugePages  bool   // MFD_HUGETLB memfds (sizes must be 2 MiB multiples)

	NoEventIdx         bool // do not ack VIRTIO_RING_F_EVENT_IDX even if offered
	NoIndirect         bool // do not ack VIRTIO_RING_F_INDIRECT_DESC even if offered
	NoProtocolFeatures bool // do not ack VHOST_USER_F_PROTOCOL_FEATURES
	// AckFeatures, if set, picks the SET_FEATURES value from the offered
	// bits, overriding the default (VERSION_1, PROTOCOL_FEATURES, INDIRECT,
	// EVENT_IDX, HOTPLUG, CHANGE where offered and not disabled above).
	// It may return bits never offered, as QEMU 7.2 does (notes A.5).
	AckFeatures func(offered uint64) uint64
	// ProtocolMask limits the protocol features acked (default MQ,
	// REPLY_ACK, RESET_DEVICE); QEMU acks whatever it knows of the offer.
	ProtocolMask      uint64
	NeedReplyAll      bool // with REPLY_ACK, ask for an ack on every message that has no reply body
	SkipControlQueues bool // like SeaBIOS: configure only the request queues
	// RetryUnitAttention makes Do send a command again when the device
	// answers it with UNIT ATTENTION, recording the condition
	// (Device.UnitAttentions), as a guest's SCSI layer does.
	RetryUnitAttention bool
	// InterruptDriven makes Do and Control wait for the call eventfd before
	// looking at the used ring, as a guest driver does, instead of polling
	// it: a completion whose interrupt is lost then times out, as it hangs
	// a guest (issue 9: a polling front-end could never see that bug).
	InterruptDriven bool

	// Peer picks whose message sequence to play (default PeerQEMU); PeerSPDK
	// also sets the three options below.
	Peer Peer
	// EnableNum is the num sent with SET_VRING_ENABLE to enable a ring
	// (default 1; PeerSPDK: the queue size, as SPDK's initiator sends it).
	EnableNum uint32
	// QueueNumAlways sends GET_QUEUE_NUM even when MQ was not negotiated, as
	// SPDK's initiator does.
	QueueNumAlways bool
	// GPAIsUVA describes guest memory with guest physical address = this
	// process's virtual address, as SPDK's initiator does ("use vaddr!"):
	// descriptors and the memory table then carry virtual addresses, and
	// GPAs no longer start at 0.
	GPAIsUVA bool

	Timeout      time.Duration // per synchronous operation (default 10 s)
	Slots        int           // async slots per request queue (default QueueSize)
	SlotDataSize int           // data buffer per slot (default 64 KiB)
	ScratchSize  int           // Do buffer arena per request queue (default 2 MiB)
	EventBuffers int           // event-queue buffers kept posted (default 8)
	VringBase    uint16        // first avail/used index (tests wrap-around)

	// Inflight acks PROTOCOL_F_INFLIGHT_SHMFD when offered and plays QEMU
	// 8.2+'s vhost-user-scsi start: GET_INFLIGHT_FD once (the area is kept
	// for the device's life), SET_INFLIGHT_FD before SET_FEATURES at every
	// start. Reconnect hands the area to the next back-end. (QEMU's
	// vhost-user-blk does this since 4.0, so a QEMU-like blk device sets it.)
	Inflight bool

	// Blk makes the device vhost-user-blk, as QEMU's vhost-user-blk-pci
	// drives it (hw/block/vhost-user-blk.c): the vrings are the NumQueues
	// request queues only (vring i is request queue i, no control or event
	// queue); the feature ack is virtio-blk's (BlkFeatures); protocol feature
	// CONFIG is acked by default and Negotiate reads the config space with
	// GET_CONFIG (offset 0, ConfigLen bytes) after the per-vring CALL/ERR fds,
	// as QEMU does at realize (it refuses a back-end without CONFIG).
	// Requests go through DoBlk and the slots' PrepareBlk. Only PeerQEMU.
	Blk bool
	// ConfigLen is the GET_CONFIG size at connect (default
	// BlkConfigLenQEMU: QEMU's vhost-user-blk with its discard and
	// write-zeroes properties on, as they are by default).
	ConfigLen int
	// NoGetConfig skips the GET_CONFIG at connect (and the CONFIG
	// requirement).
	NoGetConfig bool
	// BackendReq acks PROTOCOL_F_BACKEND_REQ when offered and, right after
	// GET_QUEUE_NUM, hands the back-end one end of a socketpair with
	// SET_BACKEND_REQ_FD (NEED_REPLY with REPLY_ACK), as QEMU's
	// vhost_setup_backend_channel does. What the back-end sends on it is
	// kept for WaitBackend (CONFIG_CHANGE_MSG: HandleConfigChange).
	BackendReq bool
}

const defaultProtocolMask = 1<<proto.PFMQ | 1<<proto.PFReplyAck | 1<<proto.PFResetDevice

// defaultBlkProtocolMask is what QEMU's vhost-user-blk acks of the same
// offer, plus CONFIG (vhost_user_blk_connect sets supports_config).
const defaultBlkProtocolMask = defaultProtocolMask | 1<<proto.PFConfig

// Peer is a front-end whose vhost-user message sequence Dial, Negotiate,
// Start, Reset and Close play.
type Peer int

const (
	// PeerQEMU is QEMU 7.2's vhost-user-scsi (notes A.0): GET_FEATURES,
	// protocol features, GET_QUEUE_NUM (with MQ), SET_OWNER, CALL and ERR fds
	// for every vring; at DRIVER_OK SET_FEATURES, SET_MEM_TABLE (NEED_REPLY),
	// NUM/BASE/ADDR/KICK per ring, SET_VRING_ENABLE 1 for every vring and a
	// second CALL fd each; stopped with SET_VRING_ENABLE 0 and GET_VRING_BASE,
	// reset with RESET_DEVICE.
	PeerQEMU Peer = iota
	// PeerSPDK is SPDK's virtio-user initiator (bdev_virtio trtype user,
	// lib/virtio/virtio_vhost_user.c and virtio.c): SET_OWNER right after
	// connecting; GET_FEATURES, SET_FEATURES (VERSION_1, INOUT, HOTPLUG,
	// EVENT_IDX, PROTOCOL_FEATURES), then GET/SET_PROTOCOL_FEATURES (MQ and
	// CONFIG only: no REPLY_ACK, no RESET_DEVICE); SET_VRING_ENABLE with num =
	// the queue size for every vring when it sets the queue up, before any
	// memory or ring message; at DRIVER_OK GET_QUEUE_NUM whether or not MQ was
	// negotiated, a CALL fd per vring (once, no ERR fds), SET_MEM_TABLE with
	// GPA = UVA and mmap_offset 0, GET_FEATURES as a barrier (it has no
	// REPLY_ACK), then NUM, BASE 0, ADDR (log 0), KICK per vring; stopped with
	// GET_VRING_BASE per vring only (never SET_VRING_ENABLE 0), reset by
	// negotiating the features again.
	PeerSPDK
)

func (o *Options) fill() error {
	if o.NumQueues == 0 {
		o.NumQueues = 1
	}
	if o.QueueSize == 0 {
		o.QueueSize = 128
	}
	if o.Regions == 0 {
		o.Regions = 1
	}
	if o.Peer == PeerSPDK {
		// virtio_user_setup_queue sends SET_VRING_ENABLE with the
		// {index, num = vq_nentries} state it describes the queue with.
		if o.EnableNum == 0 {
			o.EnableNum = uint32(o.QueueSize)
		}
		o.QueueNumAlways, o.GPAIsUVA = true, true
		if o.ProtocolMask == 0 {
			o.ProtocolMask = 1<<proto.PFMQ | 1<<proto.PFConfig // VIRTIO_USER_SUPPORTED_PROTOCOL_FEATURES
		}
	}
	if o.EnableNum == 0 {
		o.EnableNum = 1
	}
	if o.ProtocolMask == 0 {
		o.ProtocolMask = defaultProtocolMask
		if o.Blk {
			o.ProtocolMask = defaultBlkProtocolMask
		}
	}
	if o.Inflight {
		o.ProtocolMask |= 1 << proto.PFInflightShmFD
	}
	if o.BackendReq {
		o.ProtocolMask |= 1 << proto.PFBackendReq
	}
	if o.ConfigLen == 0 {
		o.ConfigLen = BlkConfigLenQEMU
	}
	if o.Timeout == 0 {
		o.Timeout = 10 * time.Second
	}
	if o.Slots == 0 {
		o.Slots = int(o.QueueSize)
	}
	if o.SlotDataSize == 0 {
		o.SlotDataSize = 64 << 10
	}
	if o.ScratchSize == 0 {
		o.ScratchSize = 2 << 20
	}
	if o.EventBuffers == 0 {
		o.EventBuffers = 8
	}
	maxQueues := 254 // 256 vrings, two of them control and event
	if o.Blk {
		maxQueues = 256
	}
	switch {
	case o.NumQueues < 1 || o.NumQueues > maxQueues:
		return fmt.Errorf("frontend: %d request queues", o.NumQueues)
	case o.Blk && o.Peer != PeerQEMU:
		return fmt.Errorf("frontend: vhost-user-blk is modelled on QEMU only (Peer %d)", o.Peer)
	case o.ConfigLen < 0 || o.ConfigLen > proto.ConfigMaxSize:
		return fmt.Errorf("frontend: config length %d", o.ConfigLen)
	case o.QueueSize&(o.QueueSize-1) != 0 || o.QueueSize > proto.MaxQueueSizeSplitRing:
		return fmt.Errorf("frontend: queue size %d is not a power of two <= 32768", o.QueueSize)
	case o.Regions != 1 && o.Regions != 2:
		return fmt.Errorf("frontend: %d regions (want 1 or 2)", o.Regions)
	case o.Peer != PeerQEMU && o.Peer != PeerSPDK:
		return fmt.Errorf("frontend: unknown peer %d", o.Peer)
	case o.Slots < 0 || o.SlotDataSize < 0 || o.ScratchSize < 0 || o.EventBuffers > int(o.QueueSize):
		return fmt.Errorf("frontend: bad slot/scratch/event sizes")
	}
	return nil
}

// Device is one front-end connection with its guest memory and vrings.
type Device struct {
	o        Options
	conn     *proto.Conn
	mem      *memory
	vrings   []*Queue
	eventGPA uint64

	offered, features uint64
	offeredPF, pf     uint64
	queueNum          uint64
	tag               atomic.Uint64
	closed            bool

	uaMu sync.Mutex
	uas  []UnitAttention // absorbed by Do (Options.RetryUnitAttention)

	// The inflight area (Options.Inflight): the description and fd the
	// back-end's GET_INFLIGHT_FD answered, kept across Reconnect; -1 none.
	inflight   proto.Inflight
	inflightFD int

	config     []byte // the config space GET_CONFIG read at connect (Blk)
	configRead bool   // GET_CONFIG at connect done: a Reconnect does not repeat it
	backend    *backendChannel
}

// NewUnstarted connects and builds guest memory and rings but sends nothing:
// tests drive the start sequence step by step (Negotiate, SetFeatures,
// SetMemTable, StartRing, EnableRings, PostEvents) or send their own messages.
func NewUnstarted(socket string, o Options) (*Device, error) {
	if err := o.fill(); err != nil {
		return nil, err
	}
	d := &Device{o: o, inflightFD: -1}
	if err := d.layout(); err != nil {
		return nil, err
	}
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		d.release()
		return nil, fmt.Errorf("frontend: connect %s: %w", socket, err)
	}
	d.conn = proto.NewConn(c)
	return d, nil
}

// Dial connects and runs the QEMU 7.2 start sequence (notes A.0), or
// Options.Peer's.
func Dial(socket string, o Options) (*Device, error) {
	d, err := NewUnstarted(socket, o)
	if err != nil {
		return nil, err
	}
	if err := d.Negotiate(); err != nil {
		d.Abort()
		return nil, err
	}
	if err := d.Start(); err != nil {
		d.Abort()
		return nil, err
	}
	return d, nil
}

// layout sizes guest memory and places rings, slots and scratch in it.
func (d *Device) layout() error {
	o := &d.o
	size := o.MemSize
	auto := size == 0
	if auto {
		size = 64 << 20
	}
	for {
		err := d.place(size)
		if err == nil {
			break
		}
		if !auto || !errors.Is(err, errNoFit) || size >= 64<<30 {
			return fmt.Errorf("frontend: layout in %d bytes: %w", size, err)
		}
		size *= 2
	}
	o.MemSize = size
	mem, err := newMemory(size, o.Regions, o.MmapOffset, o.HugePages)
	if err != nil {
		return err
	}
	d.mem = mem
	if o.GPAIsUVA {
		d.rebase()
	}
	for _, q := range d.vrings {
		q.setup(mem)
		for i := range q.slots {
			s := &q.slots[i]
			s.req = mem.slice(s.reqGPA, ReqSize)
			s.resp = mem.slice(s.respGPA, RespSize)
			s.ind = mem.slice(s.indGPA, 4*descSize)
			s.Data = mem.slice(s.DataGPA, o.SlotDataSize)
		}
		q.resetState()
	}
	return nil
}

// place assigns GPAs for everything; it touches no memory.
func (d *Device) place(size uint64) error {
	o := &d.o
	a := newAllocator(size, o.Regions)
	n := o.QueueSize
	d.vrings = make([]*Queue, d.reqBase()+o.NumQueues)
	for i := range d.vrings {
		q := &Queue{d: d, index: i, size: n, base: o.VringBase}
		var err error
		if q.descGPA, err = a.alloc(descTableSize(n), 16); err != nil {
			return err
		}
		if q.availGPA, err = a.alloc(availRingSize(n), 4); err != nil {
			return err
		}
		if q.usedGPA, err = a.alloc(usedRingSize(n), 4); err != nil {
			return err
		}
		scratch := uint64(o.ScratchSize)
		if i < d.reqBase() {
			scratch = 64 << 10
		}
		if q.scratchGPA, err = a.alloc(scratch, 4096); err != nil {
			return err
		}
		q.scratchLen = scratch
		if i >= d.reqBase() {
			q.slots = make([]Slot, o.Slots)
			for k := range q.slots {
				s := &q.slots[k]
				s.ID, s.q = k, q
				if s.reqGPA, err = a.alloc(64, 16); err != nil {
					return err
				}
				if s.respGPA, err = a.alloc(RespSize, 16); err != nil {
					return err
				}
				if s.indGPA, err = a.alloc(4*descSize, 16); err != nil {
					return err
				}
				if s.DataGPA, err = a.alloc(uint64(o.SlotDataSize), 4096); err != nil {
					return err
				}
			}
		}
		d.vrings[i] = q
	}
	if o.Blk {
		return nil
	}
	var err error
	d.eventGPA, err = a.alloc(uint64(o.EventBuffers*EventSize), 16)
	return err
}

// rebase moves every guest address place assigned to the virtual address of
// the same byte and makes each region's GPA its UVA (Options.GPAIsUVA). Every
// ring, slot and buffer lies inside one region, so each moves with its own.
func (d *Device) rebase() {
	m := d.mem
	at := func(gpa *uint64) {
		if uva, ok := m.uva(*gpa); ok {
			*gpa = uva
		}
	}
	for _, q := range d.vrings {
		at(&q.descGPA)
		at(&q.availGPA)
		at(&q.usedGPA)
		at(&q.scratchGPA)
		for i := range q.slots {
			s := &q.slots[i]
			at(&s.reqGPA)
			at(&s.respGPA)
			at(&s.indGPA)
			at(&s.DataGPA)
		}
	}
	at(&d.eventGPA)
	for i := range m.regions {
		m.regions[i].gpa = m.regions[i].uva()
	}
}

// Options returns the options in effect (defaults filled in).
func (d *Device) Options() Options { return d.o }

// Features returns the virtio features acked with SET_FEATURES.
func (d *Device) Features() uint64 { return d.features }

// OfferedFeatures returns GET_FEATURES' answer.
func (d *Device) OfferedFeatures() uint64 { return d.offered }

// ProtocolFeatures returns the protocol features acked (0 without
// PROTOCOL_FEATURES).
func (d *Device) ProtocolFeatures() uint64 { return d.pf }

// OfferedProtocolFeatures returns GET_PROTOCOL_FEATURES' answer.
func (d *Device) OfferedProtocolFeatures() uint64 { return d.offeredPF }

// QueueNum returns GET_QUEUE_NUM's answer (0 if not asked).
func (d *Device) QueueNum() uint64 { return d.queueNum }

// Conn returns the vhost-user connection for raw or malformed messages.
func (d *Device) Conn() *proto.Conn { return d.conn }

// Queue returns request queue i (vring 2+i; with Options.Blk vring i).
func (d *Device) Queue(i int) *Queue { return d.vrings[d.reqBase()+i] }

// Vring returns any vring by index (0 control, 1 event, 2.. requests; with
// Options.Blk all are request queues).
func (d *Device) Vring(i int) *Queue { return d.vrings[i] }

// Blk reports whether the device is vhost-user-blk (Options.Blk).
func (d *Device) Blk() bool { return d.o.Blk }

// reqBase is the vring of request queue 0: 2 (scsi) or 0 (blk).
func (d *Device) reqBase() int {
	if d.o.Blk {
		return 0
	}
	return firstRequest
}

// hasEventQueue reports whether vring 1 is a virtio-scsi event queue.
func (d *Device) hasEventQueue() bool { return !d.o.Blk }

// NumVrings returns 2 + NumQueues (Options.Blk: NumQueues).
func (d *Device) NumVrings() int { return len(d.vrings) }

// Mem returns n guest bytes at gpa, or nil if they are not inside one region.
func (d *Device) Mem(gpa uint64, n int) []byte { return d.mem.slice(gpa, n) }

// WriteGuest and ReadGuest copy guest memory, crossing region boundaries.
func (d *Device) WriteGuest(gpa uint64, b []byte) error { return d.mem.copyIn(gpa, b) }
func (d *Device) ReadGuest(gpa uint64, b []byte) error  { return d.mem.copyOut(gpa, b) }

// MemTable returns the regions sent with SET_MEM_TABLE.
func (d *Device) MemTable() []proto.MemRegion { return d.mem.table() }

// MemFDs returns the memfds backing the regions (owned by the Device).
func (d *Device) MemFDs() []int { return d.mem.fds() }

// UVA translates a guest physical address to this process's virtual address.
func (d *Device) UVA(gpa uint64) (uint64, bool) { return d.mem.uva(gpa) }

func (d *Device) hasPF(bit uint) bool { return d.pf&(1<<bit) != 0 }

// Send sends one message as is (no reply awaited).
func (d *Device) Send(req proto.Request, flags uint32, payload []byte, fds ...int) error {
	if err := d.conn.Send(req, flags, payload, fds...); err != nil {
		return fmt.Errorf("frontend: send %v: %w", req, err)
	}
	return nil
}

// Recv reads one message from the target, waiting at most Options.Timeout.
func (d *Device) Recv() (*proto.Msg, error) {
	uc := d.conn.UnixConn()
	uc.SetReadDeadline(time.Now().Add(d.o.Timeout))
	defer uc.SetReadDeadline(time.Time{})
	m, err := d.conn.Recv()
	if err != nil {
		return nil, fmt.Errorf("frontend: receive: %w", err)
	}
	return m, nil
}

// recvReply reads the reply to req and checks its header.
func (d *Device) recvReply(req proto.Request) (*proto.Msg, error) {
	m, err := d.Recv()
	if err != nil {
		return nil, fmt.Errorf("%w (awaiting %v reply)", err, req)
	}
	m.CloseFDs()
	if m.Request != req || m.Flags&proto.FlagReply == 0 {
		return nil, fmt.Errorf("frontend: got %v flags %#x while awaiting %v reply", m.Request, m.Flags, req)
	}
	return m, nil
}

// Call sends req and returns its reply (GET_* messages).
func (d *Device) Call(req proto.Request, payload []byte, fds ...int) (*proto.Msg, error) {
	if err := d.Send(req, proto.FlagVersion, payload, fds...); err != nil {
		return nil, err
	}
	return d.recvReply(req)
}

func (d *Device) callU64(req proto.Request) (uint64, error) {
	m, err := d.Call(req, nil)
	if err != nil {
		return 0, err
	}
	v, err := proto.U64(m)
	if err != nil {
		return 0, fmt.Errorf("frontend: %v reply: %w", req, err)
	}
	return v, nil
}

// Message sends a message without a reply body. With REPLY_ACK negotiated
// and wantAck (or Options.NeedReplyAll) it sets NEED_REPLY and requires the
// ack to be u64 0.
func (d *Device) Message(req proto.Request, wantAck bool, payload []byte, fds ...int) error {
	ack := (wantAck || d.o.NeedReplyAll) && d.hasPF(proto.PFReplyAck)
	flags := uint32(proto.FlagVersion)
	if ack {
		flags |= proto.FlagNeedReply
	}
	if err := d.Send(req, flags, payload, fds...); err != nil {
		return err
	}
	if !ack {
		return nil
	}
	m, err := d.recvReply(req)
	if err != nil {
		return err
	}
	v, err := proto.U64(m)
	if err != nil {
		return fmt.Errorf("frontend: %v ack: %w", req, err)
	}
	if v != 0 {
		return fmt.Errorf("frontend: %v refused: ack %d", req, v)
	}
	return nil
}

func newEventFD() (int, error) {
	fd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return -1, fmt.Errorf("frontend: eventfd: %w", err)
	}
	return fd, nil
}

// Negotiate runs the connection-time part of the QEMU sequence: GET_FEATURES,
// GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM (with MQ), SET_OWNER, and
// SET_VRING_CALL + SET_VRING_ERR for every vring. With PeerSPDK: SET_OWNER,
// then the feature negotiation (see PeerSPDK).
func (d *Device) Negotiate() error {
	if d.o.Peer == PeerSPDK {
		// virtio_user_dev_init sends SET_OWNER as soon as it is connected.
		if err := d.Message(proto.SetOwner, false, nil); err != nil {
			return err
		}
		return d.negotiateSPDK()
	}
	var err error
	if d.offered, err = d.callU64(proto.GetFeatures); err != nil {
		return err
	}
	if d.offered&(1<<proto.FProtocolFeatures) != 0 && !d.o.NoProtocolFeatures {
		if d.offeredPF, err = d.callU64(proto.GetProtocolFeatures); err != nil {
			return err
		}
		// Sent before d.pf is set: REPLY_ACK applies from the next message.
		pf := d.offeredPF & d.o.ProtocolMask
		if err := d.Message(proto.SetProtocolFeatures, false, proto.PutU64(pf)); err != nil {
			return err
		}
		d.pf = pf
	}
	if err := d.getQueueNum(); err != nil {
		return err
	}
	if d.o.BackendReq && d.hasPF(proto.PFBackendReq) {
		if err := d.SetBackendReqFD(); err != nil {
			return err
		}
	}
	if err := d.Message(proto.SetOwner, false, nil); err != nil {
		return err
	}
	for i := range d.vrings {
		if err := d.SetVringCall(i); err != nil {
			return err
		}
		efd, err := newEventFD()
		if err != nil {
			return err
		}
		err = d.Message(proto.SetVringErr, false, proto.PutU64(uint64(i)), efd)
		unix.Close(efd)
		if err != nil {
			return err
		}
	}
	if d.o.Blk && !d.o.NoGetConfig && !d.configRead {
		// vhost_user_blk_realize_connect: the config space is read once,
		// when the device is realized (a reconnect does not read it).
		if !d.hasPF(proto.PFConfig) {
			return fmt.Errorf("frontend: vhost-user-blk back-end did not offer PROTOCOL_F_CONFIG (offered %#x)", d.offeredPF)
		}
		cfg, err := d.GetConfig(0, uint32(d.o.ConfigLen))
		if err != nil {
			return err
		}
		d.config, d.configRead = cfg, true
	}
	return nil
}

// getQueueNum asks GET_QUEUE_NUM when MQ was negotiated, or always with
// Options.QueueNumAlways.
func (d *Device) getQueueNum() error {
	if !d.hasPF(proto.PFMQ) && !d.o.QueueNumAlways {
		return nil
	}
	var err error
	if d.queueNum, err = d.callU64(proto.GetQueueNum); err != nil {
		return err
	}
	if d.queueNum < uint64(d.o.NumQueues) {
		return fmt.Errorf("frontend: target supports %d queues, %d request queues wanted", d.queueNum, d.o.NumQueues)
	}
	return nil
}

// negotiateSPDK is SPDK's virtio_negotiate_features: GET_FEATURES,
// SET_FEATURES, and only then, if PROTOCOL_FEATURES was acked,
// GET/SET_PROTOCOL_FEATURES.
func (d *Device) negotiateSPDK() error {
	var err error
	if d.offered, err = d.callU64(proto.GetFeatures); err != nil {
		return err
	}
	if err := d.SetFeatures(d.chooseFeatures()); err != nil {
		return err
	}
	if d.features&(1<<proto.FProtocolFeatures) == 0 {
		d.pf = 0
		return nil
	}
	if d.offeredPF, err = d.callU64(proto.GetProtocolFeatures); err != nil {
		return err
	}
	pf := d.offeredPF & d.o.ProtocolMask
	if err := d.Message(proto.SetProtocolFeatures, false, proto.PutU64(pf)); err != nil {
		return err
	}
	d.pf = pf
	return nil
}

// startSPDK is SPDK's virtio_dev_start: SET_VRING_ENABLE for every vring as
// it is set up, then virtio_user_start_device (see PeerSPDK).
func (d *Device) startSPDK() error {
	if err := d.EnableRings(true); err != nil {
		return err
	}
	if err := d.getQueueNum(); err != nil {
		return err
	}
	for i := range d.vrings {
		if err := d.SetVringCall(i); err != nil {
			return err
		}
	}
	if err := d.SetMemTable(); err != nil {
		return err
	}
	// "we send a simple message that always has a response and we wait for
	// that response": the table is in use once GET_FEATURES is answered.
	if _, err := d.callU64(proto.GetFeatures); err != nil {
		return err
	}
	for i := range d.vrings {
		if d.o.SkipControlQueues && i < d.reqBase() {
			continue
		}
		if err := d.StartRing(i); err != nil {
			return err
		}
	}
	if d.hasEventQueue() && d.vrings[EventVring].started {
		return d.PostEvents()
	}
	return nil
}

// chooseFeatures is the default feature ack.
func (d *Device) chooseFeatures() uint64 {
	if d.o.AckFeatures != nil {
		return d.o.AckFeatures(d.offered)
	}
	want := uint64(1)<<proto.FVersion1 | 1<<proto.FVirtioSCSIHotplug | 1<<proto.FVirtioSCSIChange
	if d.o.Blk {
		want = 1<<proto.FVersion1 | blkDriverFeatures
		if d.o.NumQueues == 1 {
			// vhost_user_blk_get_features offers MQ only with num-queues > 1.
			want &^= 1 << BlkFMQ
		}
	}
	if d.o.Peer == PeerSPDK {
		// VIRTIO_SCSI_DEV_SUPPORTED_FEATURES, plus VERSION_1 (virtio_dev_reset):
		// no INDIRECT (SPDK chains descriptors), no CHANGE.
		want = 1<<proto.FVersion1 | 1<<proto.FVirtioSCSIHotplug | 1<<proto.FVirtioSCSIInOut
	}
	if !d.o.NoProtocolFeatures {
		want |= 1 << proto.FProtocolFeatures
	}
	if !d.o.NoIndirect && d.o.Peer != PeerSPDK {
		want |= 1 << proto.FRingIndirectDesc
	}
	if !d.o.NoEventIdx {
		want |= 1 << proto.FRingEventIdx
	}
	return d.offered & want
}

// Start runs the DRIVER_OK part of the sequence: SET_FEATURES, SET_MEM_TABLE,
// each ring's NUM/BASE/ADDR/KICK, SET_VRING_ENABLE 1 for every vring, a call
// fd swap (QEMU moves to irqfds while rings run), then posts event buffers.
func (d *Device) Start() error {
	if d.o.Peer == PeerSPDK {
		return d.startSPDK()
	}
	return d.start(true)
}

func (d *Device) start(postEvents bool) error {
	if d.o.Inflight && d.hasPF(proto.PFInflightShmFD) {
		// vhost_scsi_common_start: the area is asked for once, then handed
		// over before vhost_dev_start at every start.
		if d.inflightFD < 0 {
			if err := d.GetInflightFD(); err != nil {
				return err
			}
		}
		if err := d.SetInflightFD(); err != nil {
			return err
		}
	}
	if err := d.SetFeatures(d.chooseFeatures()); err != nil {
		return err
	}
	if err := d.SetMemTable(); err != nil {
		return err
	}
	for i := range d.vrings {
		if d.o.SkipControlQueues && i < d.reqBase() {
			continue
		}
		if err := d.StartRing(i); err != nil {
			return err
		}
	}
	if err := d.EnableRings(true); err != nil {
		return err
	}
	for i := range d.vrings {
		if err := d.SetVringCall(i); err != nil {
			return err
		}
	}
	if postEvents && d.hasEventQueue() && d.vrings[EventVring].started {
		return d.PostEvents()
	}
	return nil
}

// GetInflightFD asks the back-end for an inflight area for every vring at
// the queue size (QEMU: vhost_dev_get_inflight with virtqueue_size) and keeps
// its fd and description.
func (d *Device) GetInflightFD() error {
	req := proto.Inflight{NumQueues: uint16(len(d.vrings)), QueueSize: d.o.QueueSize}
	if err := d.Send(proto.GetInflightFD, proto.FlagVersion, req.Encode()); err != nil {
		return err
	}
	m, err := d.Recv()
	if err != nil {
		return err
	}
	defer m.CloseFDs()
	if m.Request != proto.GetInflightFD || m.Flags&proto.FlagReply == 0 || len(m.Payload) != proto.InflightWireSize {
		return fmt.Errorf("frontend: GET_INFLIGHT_FD answered by %v flags %#x, %d bytes", m.Request, m.Flags, len(m.Payload))
	}
	f, err := proto.DecodeInflight(m)
	if err != nil {
		return err
	}
	if len(m.FDs) != 1 || f.MmapSize == 0 || f.NumQueues != req.NumQueues || f.QueueSize != req.QueueSize {
		return fmt.Errorf("frontend: GET_INFLIGHT_FD reply %+v with %d fds", f, len(m.FDs))
	}
	if d.inflightFD >= 0 {
		unix.Close(d.inflightFD)
	}
	d.inflight, d.inflightFD = f, m.FDs[0]
	m.FDs[0] = -1
	return nil
}

// SetInflightFD hands the kept inflight area to the back-end.
func (d *Device) SetInflightFD() error {
	return d.Message(proto.SetInflightFD, false, d.inflight.Encode(), d.inflightFD)
}

// InflightFD returns the inflight area's fd and description (fd -1: none).
func (d *Device) InflightFD() (int, proto.Inflight) { return d.inflightFD, d.inflight }

// Reconnect is QEMU's reconnect to a back-end that died (vhost-user-scsi
// since 8.2, -chardev reconnect=N): the old connection is dropped; guest
// memory, the rings with every request in flight, and the inflight area are
// kept. On a new connection to socket it negotiates as at Dial, hands the
// area over (SET_INFLIGHT_FD) and restarts every started vring at
// SET_VRING_BASE = its used index, as QEMU does when GET_VRING_BASE failed
// (vhost_virtqueue_stop → virtio_queue_restore_last_avail_idx). Event
// buffers are not posted again: those the old back-end did not use are still
// in the ring. Only for PeerQEMU.
func (d *Device) Reconnect(socket string) error {
	if d.closed || d.o.Peer != PeerQEMU {
		return fmt.Errorf("frontend: Reconnect on a closed device or a non-QEMU peer")
	}
	d.conn.Close()
	if d.backend != nil {
		d.backend.close() // the dead back-end's; Negotiate opens a new one
		d.backend = nil
	}
	var restart []int
	for i, q := range d.vrings {
		q.mu.Lock()
		q.closeFDs()
		if q.started {
			q.base = q.UsedIdx()
			restart = append(restart, i)
		}
		q.started = false
		q.mu.Unlock()
	}
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		return fmt.Errorf("frontend: reconnect %s: %w", socket, err)
	}
	d.conn = proto.NewConn(c)
	if err := d.Negotiate(); err != nil {
		return err
	}
	if len(restart) == 0 {
		return nil
	}
	return d.start(false)
}

// SetFeatures sends SET_FEATURES and configures the rings for the acked
// ring features. The driver requires VERSION_1 (SeaBIOS and Linux do).
func (d *Device) SetFeatures(f uint64) error {
	if f&(1<<proto.FVersion1) == 0 {
		return fmt.Errorf("frontend: features %#x lack VERSION_1 (offered %#x)", f, d.offered)
	}
	d.features = f
	for _, q := range d.vrings {
		q.eventIdx = f&(1<<proto.FRingEventIdx) != 0
		q.indirect = f&(1<<proto.FRingIndirectDesc) != 0
	}
	return d.Message(proto.SetFeatures, false, proto.PutU64(f))
}

// SetMemTable sends the memory table with the memfds, NEED_REPLY when
// REPLY_ACK is negotiated (as QEMU does).
func (d *Device) SetMemTable() error {
	return d.Message(proto.SetMemTable, true, proto.EncodeMemTable(d.mem.table()), d.mem.fds()...)
}

// SetVringNum, SetVringBase, SetVringAddr, SetVringKick and SetVringCall send
// one ring message each with this front-end's values.
func (d *Device) SetVringNum(i int) error {
	return d.Message(proto.SetVringNum, false, proto.VringState{Index: uint32(i), Num: uint32(d.vrings[i].size)}.Encode())
}

func (d *Device) SetVringBase(i int) error {
	return d.Message(proto.SetVringBase, false, proto.VringState{Index: uint32(i), Num: uint32(d.vrings[i].base)}.Encode())
}

// VringAddr returns the SET_VRING_ADDR payload for vring i: UVAs of the
// three rings and, like QEMU, the used ring's GPA as the log address.
func (d *Device) VringAddr(i int) proto.VringAddr {
	q := d.vrings[i]
	desc, _ := d.mem.uva(q.descGPA)
	avail, _ := d.mem.uva(q.availGPA)
	used, _ := d.mem.uva(q.usedGPA)
	a := proto.VringAddr{Index: uint32(i), Desc: desc, Avail: avail, Used: used, Log: q.usedGPA}
	if d.o.Peer == PeerSPDK {
		a.Log = 0 // virtio_user_set_vring_addr: "disable log"
	}
	return a
}

func (d *Device) SetVringAddr(i int) error {
	return d.Message(proto.SetVringAddr, false, d.VringAddr(i).Encode())
}

func (d *Device) SetVringKick(i int) error {
	q := d.vrings[i]
	if q.kickFD < 0 {
		fd, err := newEventFD()
		if err != nil {
			return err
		}
		q.kickFD = fd
	}
	return d.Message(proto.SetVringKick, false, proto.PutU64(uint64(i)), q.kickFD)
}

// SetVringCall sends a fresh call eventfd for vring i and closes the old one.
func (d *Device) SetVringCall(i int) error {
	q := d.vrings[i]
	fd, err := newEventFD()
	if err != nil {
		return err
	}
	if err := d.Message(proto.SetVringCall, false, proto.PutU64(uint64(i)), fd); err != nil {
		unix.Close(fd)
		return err
	}
	if q.callFD >= 0 {
		unix.Close(q.callFD)
	}
	q.callFD = fd
	return nil
}

// SetVringEnable sends SET_VRING_ENABLE for vring i: num 0 to disable,
// Options.EnableNum to enable.
func (d *Device) SetVringEnable(i int, on bool) error {
	v := uint32(0)
	if on {
		v = d.o.EnableNum
	}
	return d.Message(proto.SetVringEnable, false, proto.VringState{Index: uint32(i), Num: v}.Encode())
}

// GetVringBase stops vring i and returns the target's next avail index.
func (d *Device) GetVringBase(i int) (uint32, error) {
	m, err := d.Call(proto.GetVringBase, proto.VringState{Index: uint32(i)}.Encode())
	if err != nil {
		return 0, err
	}
	s, err := proto.DecodeVringState(m)
	if err != nil {
		return 0, fmt.Errorf("frontend: GET_VRING_BASE reply: %w", err)
	}
	if s.Index != uint32(i) {
		return 0, fmt.Errorf("frontend: GET_VRING_BASE %d answered for vring %d", i, s.Index)
	}
	return s.Num, nil
}

// StartRing sends NUM, BASE, ADDR and KICK for vring i.
func (d *Device) StartRing(i int) error {
	if err := d.SetVringNum(i); err != nil {
		return err
	}
	if err := d.SetVringBase(i); err != nil {
		return err
	}
	if err := d.SetVringAddr(i); err != nil {
		return err
	}
	if err := d.SetVringKick(i); err != nil {
		return err
	}
	d.vrings[i].started = true
	return nil
}

// EnableRings sends SET_VRING_ENABLE for every vring, configured or not (as
// QEMU does); nothing without PROTOCOL_FEATURES (rings are then enabled by
// SET_FEATURES).
func (d *Device) EnableRings(on bool) error {
	if d.features&(1<<proto.FProtocolFeatures) == 0 {
		return nil
	}
	for i := range d.vrings {
		if err := d.SetVringEnable(i, on); err != nil {
			return err
		}
	}
	return nil
}

// stop disables every vring and stops the started ones with GET_VRING_BASE,
// checking each answer against what this front-end made available and that
// the target completed every non-raw request first (notes A.4).
func (d *Device) stop() error {
	var errs []error
	// SPDK's virtio_user_stop_device sends GET_VRING_BASE only.
	if d.o.Peer != PeerSPDK {
		if err := d.EnableRings(false); err != nil {
			return err
		}
	}
	for i, q := range d.vrings {
		if !q.started {
			continue
		}
		base, err := d.GetVringBase(i)
		if err != nil {
			return err
		}
		q.started = false
		q.mu.Lock()
		q.poll(nil)
		// Request and control rings are drained, so the next avail index
		// is everything made available. The device takes event buffers only
		// when it has events: anything from what it completed up to that.
		ok := base == uint32(q.published)
		if i == EventVring && d.hasEventQueue() {
			ok = base <= 0xffff && uint16(base)-q.lastUsed <= q.published-q.lastUsed
		}
		if !ok {
			errs = append(errs, fmt.Errorf("frontend: vring %d: GET_VRING_BASE says %d, front-end made %d available",
				i, base, q.published))
		}
		lost := 0
		for _, h := range q.heads {
			if h.kind != headFree && h.kind != headRaw && h.kind != headEvent && h.kind != headAbandoned {
				lost++
			}
		}
		q.mu.Unlock()
		if lost > 0 {
			errs = append(errs, fmt.Errorf("frontend: vring %d: %d requests not completed before GET_VRING_BASE", i, lost))
		}
		q.base = uint16(base)
	}
	return errors.Join(errs...)
}

// Close stops every started ring with GET_VRING_BASE (after SET_VRING_ENABLE
// 0, as QEMU stops a device), closes the socket and unmaps guest memory. It
// reports a GET_VRING_BASE answer that differs from the avail index made
// available, and requests the target dropped.
func (d *Device) Close() error {
	if d.closed {
		return nil
	}
	err := d.stop()
	d.release()
	return err
}

// Abort closes the socket abruptly, like a killed VMM, and unmaps memory.
func (d *Device) Abort() { d.release() }

func (d *Device) release() {
	if d.closed {
		return
	}
	d.closed = true
	if d.conn != nil {
		d.conn.Close()
	}
	for _, q := range d.vrings {
		q.closeFDs()
		q.started = false
	}
	if d.backend != nil {
		d.backend.close()
	}
	if d.mem != nil {
		d.mem.free()
	}
	if d.inflightFD >= 0 {
		unix.Close(d.inflightFD)
		d.inflightFD = -1
	}
}

// Reset is the guest-reset cycle: SET_VRING_ENABLE 0 for all, GET_VRING_BASE
// for started rings, RESET_DEVICE (if negotiated), then the DRIVER_OK part of
// the start sequence again on the same connection with rings back at base 0
// (Options.VringBase). Every slot returns to its pool; the inflight area is
// dropped, so the start asks for a new one (Options.Inflight). PeerSPDK: GET_VRING_BASE
// only, then the feature negotiation and the start again.
func (d *Device) Reset() error {
	if err := d.stop(); err != nil {
		return err
	}
	if d.hasPF(proto.PFResetDevice) && d.o.Peer != PeerSPDK {
		if err := d.Message(proto.ResetDevice, false, nil); err != nil {
			return err
		}
	}
	for _, q := range d.vrings {
		q.mu.Lock()
		q.base = d.o.VringBase
		q.resetState()
		q.mu.Unlock()
	}
	// vhost_user_scsi_reset frees the inflight area: the next start asks
	// for a new one (the old one describes the rings just forgotten).
	if d.inflightFD >= 0 {
		unix.Close(d.inflightFD)
		d.inflightFD = -1
	}
	if d.o.Peer == PeerSPDK {
		// virtio_dev_reset negotiates the features again before the start.
		if err := d.negotiateSPDK(); err != nil {
			return err
		}
	}
	return d.Start()
}

// nextTag returns a fresh request tag.
func (d *Device) nextTag() uint64 { return d.tag.Add(1) }

// le32 decodes a little-endian u32 from guest bytes.
func le32(b []byte) uint32 { return binary.LittleEndian.Uint32(b) }

package frontend

import (
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"vhost-target/vhost/proto"
)

// Virtio-blk feature bits (virtio 1.2 §5.2.3), read from the spec here
// rather than shared with the target's vhost/blk.
const (
	BlkFSizeMax     = 1
	BlkFSegMax      = 2
	BlkFGeometry    = 4
	BlkFRO          = 5
	BlkFBlkSize     = 6
	BlkFFlush       = 9
	BlkFTopology    = 10
	BlkFConfigWCE   = 11
	BlkFMQ          = 12
	BlkFDiscard     = 13
	BlkFWriteZeroes = 14
)

// blkDriverFeatures are the device bits QEMU's vhost-user-blk passes
// through from the back-end (user_feature_bits) and Linux's virtio_blk acks.
const blkDriverFeatures = 1<<BlkFSizeMax | 1<<BlkFSegMax | 1<<BlkFGeometry | 1<<BlkFRO | 1<<BlkFBlkSize |
	1<<BlkFFlush | 1<<BlkFTopology | 1<<BlkFConfigWCE | 1<<BlkFMQ | 1<<BlkFDiscard | 1<<BlkFWriteZeroes

// Virtio-blk request types (virtio 1.2 §5.2.6).
const (
	BlkTIn          = 0
	BlkTOut         = 1
	BlkTFlush       = 4
	BlkTGetID       = 8
	BlkTGetLifetime = 10
	BlkTDiscard     = 11
	BlkTWriteZeroes = 13
	BlkTSecureErase = 14
)

// Virtio-blk status values, the last byte of a request.
const (
	BlkSOK     = 0
	BlkSIOErr  = 1
	BlkSUnsupp = 2
)

const (
	// BlkHeaderSize is struct virtio_blk_outhdr: u32 type, u32 reserved,
	// u64 sector.
	BlkHeaderSize = 16
	// BlkSectorSize is the unit of the header's sector field.
	BlkSectorSize = 512
	// BlkIDBytes is VIRTIO_BLK_ID_BYTES, GET_ID's buffer.
	BlkIDBytes = 20
	// BlkSegmentSize is struct virtio_blk_discard_write_zeroes.
	BlkSegmentSize = 16
	// BlkWriteZeroesUnmap is VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.
	BlkWriteZeroesUnmap = 1
	// BlkConfigSize is struct virtio_blk_config up to
	// write_zeroes_may_unmap and its 3 bytes of padding.
	BlkConfigSize = 60
	// BlkConfigLenQEMU is the config length QEMU's vhost-user-blk asks
	// for (virtio_blk_cfg_size_params with DISCARD and WRITE_ZEROES in its
	// host features, as its properties default): up to and including
	// write_zeroes_may_unmap.
	BlkConfigLenQEMU = 57
)

// Offsets in struct virtio_blk_config (virtio 1.2 §5.2.4).
const (
	BlkCfgCapacity               = 0
	BlkCfgSizeMax                = 8
	BlkCfgSegMax                 = 12
	BlkCfgCylinders              = 16
	BlkCfgHeads                  = 18
	BlkCfgSectors                = 19
	BlkCfgBlkSize                = 20
	BlkCfgPhysicalBlockExp       = 24
	BlkCfgAlignmentOffset        = 25
	BlkCfgMinIOSize              = 26
	BlkCfgOptIOSize              = 28
	BlkCfgWriteback              = 32
	BlkCfgNumQueues              = 34
	BlkCfgMaxDiscardSectors      = 36
	BlkCfgMaxDiscardSeg          = 40
	BlkCfgDiscardSectorAlignment = 44
	BlkCfgMaxWriteZeroesSectors  = 48
	BlkCfgMaxWriteZeroesSeg      = 52
	BlkCfgWriteZeroesMayUnmap    = 56
)

// BlkConfig is struct virtio_blk_config decoded (little-endian: virtio 1.x).
type BlkConfig struct {
	Len                    int    // bytes decoded; fields beyond are zero
	Capacity               uint64 // in 512-byte sectors
	SizeMax                uint32
	SegMax                 uint32
	Cylinders              uint16
	Heads                  uint8
	Sectors                uint8
	BlkSize                uint32
	PhysicalBlockExp       uint8
	AlignmentOffset        uint8
	MinIOSize              uint16 // in blocks
	OptIOSize              uint32 // in blocks
	Writeback              uint8
	NumQueues              uint16
	MaxDiscardSectors      uint32
	MaxDiscardSeg          uint32
	DiscardSectorAlignment uint32
	MaxWriteZeroesSectors  uint32
	MaxWriteZeroesSeg      uint32
	WriteZeroesMayUnmap    uint8
}

// DecodeBlkConfig decodes as much of a config space as b holds.
func DecodeBlkConfig(b []byte) BlkConfig {
	var full [BlkConfigSize]byte
	n := copy(full[:], b)
	le := binary.LittleEndian
	return BlkConfig{
		Len:                    n,
		Capacity:               le.Uint64(full[BlkCfgCapacity:]),
		SizeMax:                le.Uint32(full[BlkCfgSizeMax:]),
		SegMax:                 le.Uint32(full[BlkCfgSegMax:]),
		Cylinders:              le.Uint16(full[BlkCfgCylinders:]),
		Heads:                  full[BlkCfgHeads],
		Sectors:                full[BlkCfgSectors],
		BlkSize:                le.Uint32(full[BlkCfgBlkSize:]),
		PhysicalBlockExp:       full[BlkCfgPhysicalBlockExp],
		AlignmentOffset:        full[BlkCfgAlignmentOffset],
		MinIOSize:              le.Uint16(full[BlkCfgMinIOSize:]),
		OptIOSize:              le.Uint32(full[BlkCfgOptIOSize:]),
		Writeback:              full[BlkCfgWriteback],
		NumQueues:              le.Uint16(full[BlkCfgNumQueues:]),
		MaxDiscardSectors:      le.Uint32(full[BlkCfgMaxDiscardSectors:]),
		MaxDiscardSeg:          le.Uint32(full[BlkCfgMaxDiscardSeg:]),
		DiscardSectorAlignment: le.Uint32(full[BlkCfgDiscardSectorAlignment:]),
		MaxWriteZeroesSectors:  le.Uint32(full[BlkCfgMaxWriteZeroesSectors:]),
		MaxWriteZeroesSeg:      le.Uint32(full[BlkCfgMaxWriteZeroesSeg:]),
		WriteZeroesMayUnmap:    full[BlkCfgWriteZeroesMayUnmap],
	}
}

// Encode lays c out as BlkConfigSize bytes (Len is ignored).
func (c BlkConfig) Encode() []byte {
	b := make([]byte, BlkConfigSize)
	le := binary.LittleEndian
	le.PutUint64(b[BlkCfgCapacity:], c.Capacity)
	le.PutUint32(b[BlkCfgSizeMax:], c.SizeMax)
	le.PutUint32(b[BlkCfgSegMax:], c.SegMax)
	le.PutUint16(b[BlkCfgCylinders:], c.Cylinders)
	b[BlkCfgHeads], b[BlkCfgSectors] = c.Heads, c.Sectors
	le.PutUint32(b[BlkCfgBlkSize:], c.BlkSize)
	b[BlkCfgPhysicalBlockExp], b[BlkCfgAlignmentOffset] = c.PhysicalBlockExp, c.AlignmentOffset
	le.PutUint16(b[BlkCfgMinIOSize:], c.MinIOSize)
	le.PutUint32(b[BlkCfgOptIOSize:], c.OptIOSize)
	b[BlkCfgWriteback] = c.Writeback
	le.PutUint16(b[BlkCfgNumQueues:], c.NumQueues)
	le.PutUint32(b[BlkCfgMaxDiscardSectors:], c.MaxDiscardSectors)
	le.PutUint32(b[BlkCfgMaxDiscardSeg:], c.MaxDiscardSeg)
	le.PutUint32(b[BlkCfgDiscardSectorAlignment:], c.DiscardSectorAlignment)
	le.PutUint32(b[BlkCfgMaxWriteZeroesSectors:], c.MaxWriteZeroesSectors)
	le.PutUint32(b[BlkCfgMaxWriteZeroesSeg:], c.MaxWriteZeroesSeg)
	b[BlkCfgWriteZeroesMayUnmap] = c.WriteZeroesMayUnmap
	return b
}

// GetConfig sends GET_CONFIG for size bytes at offset (flags 0) and returns
// the config bytes of the reply, which must be the same size (QEMU's
// vhost_user_get_config fails the device otherwise).
func (d *Device) GetConfig(offset, size uint32) ([]byte, error) {
	p := make([]byte, proto.ConfigHeaderSize+int(size))
	binary.LittleEndian.PutUint32(p[0:], offset)
	binary.LittleEndian.PutUint32(p[4:], size)
	m, err := d.Call(proto.GetConfig, p)
	if err != nil {
		return nil, err
	}
	if len(m.Payload) != len(p) {
		return nil, fmt.Errorf("frontend: GET_CONFIG of %d bytes at %d answered with a %d-byte payload (want %d)",
			size, offset, len(m.Payload), len(p))
	}
	return append([]byte(nil), m.Payload[proto.ConfigHeaderSize:]...), nil
}

// SetConfig sends SET_CONFIG with data at offset and flags 0
// (VHOST_SET_CONFIG_TYPE_FRONTEND), asking for an ack with REPLY_ACK as
// QEMU's vhost_user_set_config does; a non-zero ack is an error.
func (d *Device) SetConfig(offset uint32, data []byte) error {
	p := make([]byte, proto.ConfigHeaderSize+len(data))
	binary.LittleEndian.PutUint32(p[0:], offset)
	binary.LittleEndian.PutUint32(p[4:], uint32(len(data)))
	copy(p[proto.ConfigHeaderSize:], data)
	return d.Message(proto.SetConfig, true, p)
}

// SetWriteback is the guest writing the writeback field (VIRTIO_BLK_F_CONFIG_WCE):
// QEMU's vhost_user_blk_set_config sends the one byte with SET_CONFIG and,
// once accepted, keeps it in its copy of the config space.
func (d *Device) SetWriteback(on bool) error {
	var b byte
	if on {
		b = 1
	}
	if err := d.SetConfig(BlkCfgWriteback, []byte{b}); err != nil {
		return err
	}
	if len(d.config) > BlkCfgWriteback {
		d.config[BlkCfgWriteback] = b
	}
	return nil
}

// ConfigSpace returns the config space read at connect (Options.Blk; nil
// when none was read).
func (d *Device) ConfigSpace() []byte { return append([]byte(nil), d.config...) }

// BlkConfig decodes the config space read at connect.
func (d *Device) BlkConfig() BlkConfig { return DecodeBlkConfig(d.config) }

// ReadBlkConfig reads the config space again (GET_CONFIG, offset 0,
// Options.ConfigLen bytes), keeps it as QEMU does and decodes it.
func (d *Device) ReadBlkConfig() (BlkConfig, error) {
	b, err := d.GetConfig(0, uint32(d.o.ConfigLen))
	if err != nil {
		return BlkConfig{}, err
	}
	d.config = b
	return DecodeBlkConfig(b), nil
}

// BlkSegment is one struct virtio_blk_discard_write_zeroes.
type BlkSegment struct {
	Sector     uint64
	NumSectors uint32
	Flags      uint32 // BlkWriteZeroesUnmap
}

// EncodeBlkSegments lays out DISCARD / WRITE_ZEROES data.
func EncodeBlkSegments(segs ...BlkSegment) []byte {
	b := make([]byte, len(segs)*BlkSegmentSize)
	for i, s := range segs {
		p := b[i*BlkSegmentSize:]
		binary.LittleEndian.PutUint64(p, s.Sector)
		binary.LittleEndian.PutUint32(p[8:], s.NumSectors)
		binary.LittleEndian.PutUint32(p[12:], s.Flags)
	}
	return b
}

// BlkCommand is one synchronous virtio-blk request for DoBlk. The chain is
// by default what Linux's virtio_blk builds: the 16-byte header
// (device-readable), the data (DataOut device-readable, for OUT, DISCARD
// and WRITE_ZEROES; DataInLen device-writable bytes, for IN and GET_ID),
// then one device-writable status byte. The layout fields build other
// chains a driver may send (split header, header and data in one buffer,
// status at the end of the data-in buffer) and ones it must not (short
// header, no status); Rewrite can then do anything.
type BlkCommand struct {
	Type      uint32
	Reserved  uint32 // the header's second word (ioprio)
	Sector    uint64
	DataOut   []byte // device-readable data, copied into guest memory
	DataInLen int    // device-writable data bytes before the status
	Queue     int    // request queue 0..NumQueues-1
	Segments  int    // split each data buffer into this many descriptors (default 1)
	Direct    bool   // never use an indirect table (default: indirect whenever negotiated)
	DataGPA   uint64 // place the data buffer here instead of the scratch arena (may straddle regions)

	HeaderLen    int  // header descriptor bytes (default 16; more: zeroes follow; fewer: truncated)
	HeaderSplit  int  // split the header into this many descriptors (default 1)
	HeaderInData bool // header and DataOut share one buffer, split by Segments
	StatusLen    int  // status buffer bytes (default 1); the device writes the last one
	StatusInData bool // no separate status descriptor: the data-in buffer has StatusLen more bytes
	NoStatus     bool // no status buffer at all: the chain ends with the data
	// Rewrite, if set, is given the chain's descriptors and returns those
	// submitted instead (NEXT flags and links are set by DoBlk).
	Rewrite func([]Desc) []Desc
}

// BlkResponse is what the device wrote back.
type BlkResponse struct {
	Status  byte   // the status buffer's last byte; 0xff: not written
	DataIn  []byte // the whole DataInLen buffer (poisoned with 0xa5 before)
	UsedLen uint32 // length in the used element: data-in written + 1 for a good device
}

// DoBlk submits one virtio-blk request and waits for its completion, as Do
// does for SCSI commands.
func (d *Device) DoBlk(c BlkCommand) (*BlkResponse, error) {
	if c.Queue < 0 || c.Queue >= d.o.NumQueues {
		return nil, fmt.Errorf("frontend: request queue %d of %d", c.Queue, d.o.NumQueues)
	}
	if c.DataInLen < 0 || c.HeaderLen < 0 || c.StatusLen < 0 {
		return nil, fmt.Errorf("frontend: negative lengths in %+v", c)
	}
	q := d.Queue(c.Queue)
	q.mu.Lock()
	defer q.mu.Unlock()
	q.beginScratch()

	hdrLen, statusLen := c.HeaderLen, c.StatusLen
	if hdrLen == 0 {
		hdrLen = BlkHeaderSize
	}
	if statusLen == 0 {
		statusLen = 1
	}
	nout, nin := len(c.DataOut), c.DataInLen
	var hdrGPA, outGPA, inGPA, statusGPA uint64
	var err error
	alloc := func(n int, align uint64) uint64 {
		if err != nil {
			return 0
		}
		var gpa uint64
		gpa, err = q.salloc(uint64(max(n, 1)), align)
		return gpa
	}
	if c.HeaderInData {
		hdrGPA = alloc(hdrLen+nout, 16)
		outGPA = hdrGPA + uint64(hdrLen)
	} else {
		hdrGPA = alloc(max(hdrLen, BlkHeaderSize), 16)
		if nout > 0 {
			if outGPA = c.DataGPA; outGPA == 0 {
				outGPA = alloc(nout, 4096)
			}
		}
	}
	if c.StatusInData {
		inGPA = alloc(nin+statusLen, 4096)
		statusGPA = inGPA + uint64(nin)
	} else {
		if nin > 0 {
			if c.DataGPA != 0 && (nout == 0 || c.HeaderInData) {
				inGPA = c.DataGPA
			} else {
				inGPA = alloc(nin, 4096)
			}
		}
		statusGPA = alloc(statusLen, 16)
	}
	if err != nil {
		return nil, err
	}
	hdr := make([]byte, max(hdrLen, BlkHeaderSize))
	binary.LittleEndian.PutUint32(hdr[0:], c.Type)
	binary.LittleEndian.PutUint32(hdr[4:], c.Reserved)
	binary.LittleEndian.PutUint64(hdr[8:], c.Sector)
	if err := d.mem.copyIn(hdrGPA, hdr); err != nil {
		return nil, err
	}
	if nout > 0 {
		if err := d.mem.copyIn(outGPA, c.DataOut); err != nil {
			return nil, err
		}
	}
	poison := make([]byte, nin+statusLen)
	for i := range poison {
		poison[i] = 0xa5
	}
	if nin > 0 {
		if err := d.mem.copyIn(inGPA, poison[:nin]); err != nil {
			return nil, err
		}
	}
	for i := range poison[:statusLen] {
		poison[i] = 0xff
	}
	if err := d.mem.copyIn(statusGPA, poison[:statusLen]); err != nil {
		return nil, err
	}

	descs := make([]Desc, 0, 2+max(c.HeaderSplit, 1)+2*max(c.Segments, 1))
	if c.HeaderInData {
		descs = segments(descs, hdrGPA, hdrLen+nout, c.Segments, 0)
	} else {
		descs = segments(descs, hdrGPA, hdrLen, c.HeaderSplit, 0)
		if nout > 0 {
			descs = segments(descs, outGPA, nout, c.Segments, 0)
		}
	}
	switch {
	case c.StatusInData && c.NoStatus:
		descs = segments(descs, inGPA, nin, c.Segments, DescFWrite)
	case c.StatusInData:
		descs = segments(descs, inGPA, nin+statusLen, c.Segments, DescFWrite)
	default:
		if nin > 0 {
			descs = segments(descs, inGPA, nin, c.Segments, DescFWrite)
		}
		if !c.NoStatus {
			descs = append(descs, Desc{Addr: statusGPA, Len: uint32(statusLen), Flags: DescFWrite})
		}
	}
	if c.Rewrite != nil {
		descs = c.Rewrite(descs)
	}
	used, err := q.submitOne(descs, c.Direct, fmt.Sprintf("blk type %d sector %d", c.Type, c.Sector))
	if err != nil {
		return nil, err
	}
	var st [1]byte
	if err := d.mem.copyOut(statusGPA+uint64(statusLen-1), st[:]); err != nil {
		return nil, err
	}
	r := &BlkResponse{Status: st[0], UsedLen: used}
	if nin > 0 {
		r.DataIn = make([]byte, nin)
		if err := d.mem.copyOut(inGPA, r.DataIn); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// PrepareBlk writes a virtio-blk request header into the slot for n data
// bytes in direction dir (DirIn: Data is device-writable, for IN and GET_ID;
// DirOut: device-readable; DirNone: no data, as for FLUSH) and marks the
// status unwritten (0xff). Submit then chains header, data and a one-byte
// status.
func (q *Queue) PrepareBlk(s *Slot, typ uint32, sector uint64, dir Dir, n int) {
	if n < 0 || n > len(s.Data) {
		panic(fmt.Sprintf("frontend: PrepareBlk: %d data bytes (buffer %d)", n, len(s.Data)))
	}
	binary.LittleEndian.PutUint32(s.req[0:], typ)
	binary.LittleEndian.PutUint32(s.req[4:], 0)
	binary.LittleEndian.PutUint64(s.req[8:], sector)
	s.resp[0] = 0xff
	s.blk, s.dir, s.n = true, dir, n
	s.Tag = 0
}

// BlkStatus returns a blk slot's status byte (0xff: not written).
func (s *Slot) BlkStatus() byte { return s.resp[0] }

// BackendConfigChange is VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, a request
// on the back-end channel (its numbers are not the front-end's).
const BackendConfigChange proto.Request = 2

// BackendMsg is one message the back-end sent on its request channel.
type BackendMsg struct {
	Request proto.Request // back-end request number (BackendConfigChange...)
	Flags   uint32
	Payload []byte
	NFDs    int // fds it carried (closed on receipt)
}

// NeedReply reports whether the back-end asked for an answer.
func (m BackendMsg) NeedReply() bool { return m.Flags&proto.FlagNeedReply != 0 }

// backendChannel is the front-end's end of SET_BACKEND_REQ_FD's socketpair:
// a goroutine reads what the back-end sends into msgs.
type backendChannel struct {
	conn   *proto.Conn
	msgs   chan BackendMsg
	done   chan struct{} // closed when the reader stops
	err    error         // why it stopped (read after done)
	sendMu sync.Mutex
	once   sync.Once
}

func newBackendChannel(c *net.UnixConn) *backendChannel {
	b := &backendChannel{conn: proto.NewConn(c), msgs: make(chan BackendMsg, 64), done: make(chan struct{})}
	go b.read()
	return b
}

func (b *backendChannel) read() {
	defer close(b.done)
	for {
		m, err := b.conn.Recv()
		if err != nil {
			b.err = err
			return
		}
		bm := BackendMsg{Request: m.Request, Flags: m.Flags, Payload: append([]byte(nil), m.Payload...), NFDs: len(m.FDs)}
		m.CloseFDs()
		b.msgs <- bm // a back-end that floods an unread channel blocks on its own socket
	}
}

func (b *backendChannel) close() {
	b.once.Do(func() {
		b.conn.Close()
		// Unblock a reader stuck handing over a message nobody waits for.
		for {
			select {
			case <-b.msgs:
				continue
			case <-b.done:
			}
			return
		}
	})
}

// SetBackendReqFD opens the back-end request channel: a socketpair, one end
// sent with SET_BACKEND_REQ_FD (NEED_REPLY with REPLY_ACK), the other read
// by the front-end (WaitBackend). A channel opened before is closed.
func (d *Device) SetBackendReqFD() error {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("frontend: socketpair: %w", err)
	}
	err = d.Message(proto.SetBackendReqFD, true, nil, fds[1])
	unix.Close(fds[1])
	if err != nil {
		unix.Close(fds[0])
		return err
	}
	f := os.NewFile(uintptr(fds[0]), "vhost-backend-channel")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return fmt.Errorf("frontend: back-end channel: %w", err)
	}
	if d.backend != nil {
		d.backend.close()
	}
	d.backend = newBackendChannel(c.(*net.UnixConn))
	return nil
}

// HasBackendChannel reports whether SET_BACKEND_REQ_FD was sent.
func (d *Device) HasBackendChannel() bool { return d.backend != nil }

// WaitBackend returns the next message the back-end sent on its request
// channel, waiting at most timeout (an error wrapping ErrTimeout then).
func (d *Device) WaitBackend(timeout time.Duration) (BackendMsg, error) {
	b := d.backend
	if b == nil {
		return BackendMsg{}, fmt.Errorf("frontend: no back-end channel (Options.BackendReq, PROTOCOL_F_BACKEND_REQ)")
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case m := <-b.msgs:
		return m, nil
	default:
	}
	select {
	case m := <-b.msgs:
		return m, nil
	case <-b.done:
		select {
		case m := <-b.msgs:
			return m, nil
		default:
		}
		return BackendMsg{}, fmt.Errorf("frontend: back-end channel closed: %v", b.err)
	case <-t.C:
		return BackendMsg{}, fmt.Errorf("frontend: no back-end message in %v: %w", timeout, ErrTimeout)
	}
}

// ReplyBackend answers m on the back-end channel with u64 v (0: success),
// as QEMU answers a message that asked for a reply.
func (d *Device) ReplyBackend(m BackendMsg, v uint64) error {
	b := d.backend
	if b == nil {
		return fmt.Errorf("frontend: no back-end channel")
	}
	b.sendMu.Lock()
	defer b.sendMu.Unlock()
	return b.conn.ReplyU64(m.Request, v)
}

// HandleConfigChange waits for CONFIG_CHANGE_MSG on the back-end channel and
// handles it as QEMU's vhost_user_blk_handle_config_change does: GET_CONFIG
// on the front-end channel first, then, if the back-end asked for one, the
// reply (0) on its channel. It returns the new config space. A back-end that
// waits for that reply before it serves the GET_CONFIG deadlocks QEMU; here
// the GET_CONFIG times out.
func (d *Device) HandleConfigChange(timeout time.Duration) (BlkConfig, error) {
	m, err := d.WaitBackend(timeout)
	if err != nil {
		return BlkConfig{}, err
	}
	if m.Request != BackendConfigChange { // any payload is read and ignored, as QEMU's backend_read does
		return BlkConfig{}, fmt.Errorf("frontend: back-end sent request %d (flags %#x, %d bytes), not CONFIG_CHANGE_MSG",
			uint32(m.Request), m.Flags, len(m.Payload))
	}
	cfg, err := d.ReadBlkConfig()
	if err != nil {
		return cfg, err
	}
	if m.NeedReply() {
		if err := d.ReplyBackend(m, 0); err != nil {
			return cfg, err
		}
	}
	return cfg, nil
}

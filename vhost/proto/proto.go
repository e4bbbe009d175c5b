// Package proto is the vhost-user wire format: message codes, the 12-byte
// header, payload layouts, and framed send/receive with SCM_RIGHTS file
// descriptors over a unix socket. Both the target (back-end) and the in-repo
// front-end use it, so it holds no policy: validation of what a message means
// belongs to the side that acts on it.
//
// Reference: QEMU docs/interop/vhost-user.rst, "Message Specification".
package proto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"

	"golang.org/x/sys/unix"
)

// Request is a front-end message code.
type Request uint32

// Front-end message codes (vhost-user.rst "Front-end message types").
const (
	GetFeatures         Request = 1
	SetFeatures         Request = 2
	SetOwner            Request = 3
	ResetOwner          Request = 4
	SetMemTable         Request = 5
	SetLogBase          Request = 6
	SetLogFD            Request = 7
	SetVringNum         Request = 8
	SetVringAddr        Request = 9
	SetVringBase        Request = 10
	GetVringBase        Request = 11
	SetVringKick        Request = 12
	SetVringCall        Request = 13
	SetVringErr         Request = 14
	GetProtocolFeatures Request = 15
	SetProtocolFeatures Request = 16
	GetQueueNum         Request = 17
	SetVringEnable      Request = 18
	SendRARP            Request = 19
	NetSetMTU           Request = 20
	SetBackendReqFD     Request = 21
	IOTLBMsg            Request = 22
	SetVringEndian      Request = 23
	GetConfig           Request = 24
	SetConfig           Request = 25
	CreateCryptoSession Request = 26
	CloseCryptoSession  Request = 27
	PostcopyAdvise      Request = 28
	PostcopyListen      Request = 29
	PostcopyEnd         Request = 30
	GetInflightFD       Request = 31
	SetInflightFD       Request = 32
	GPUSetSocket        Request = 33
	ResetDevice         Request = 34
	VringKick           Request = 35
	GetMaxMemSlots      Request = 36
	AddMemReg           Request = 37
	RemMemReg           Request = 38
	SetStatus           Request = 39
	GetStatus           Request = 40
)

var requestNames = map[Request]string{
	GetFeatures: "GET_FEATURES", SetFeatures: "SET_FEATURES", SetOwner: "SET_OWNER",
	ResetOwner: "RESET_OWNER", SetMemTable: "SET_MEM_TABLE", SetLogBase: "SET_LOG_BASE",
	SetLogFD: "SET_LOG_FD", SetVringNum: "SET_VRING_NUM", SetVringAddr: "SET_VRING_ADDR",
	SetVringBase: "SET_VRING_BASE", GetVringBase: "GET_VRING_BASE", SetVringKick: "SET_VRING_KICK",
	SetVringCall: "SET_VRING_CALL", SetVringErr: "SET_VRING_ERR",
	GetProtocolFeatures: "GET_PROTOCOL_FEATURES", SetProtocolFeatures: "SET_PROTOCOL_FEATURES",
	GetQueueNum: "GET_QUEUE_NUM", SetVringEnable: "SET_VRING_ENABLE", SendRARP: "SEND_RARP",
	NetSetMTU: "NET_SET_MTU", SetBackendReqFD: "SET_BACKEND_REQ_FD", IOTLBMsg: "IOTLB_MSG",
	SetVringEndian: "SET_VRING_ENDIAN", GetConfig: "GET_CONFIG", SetConfig: "SET_CONFIG",
	CreateCryptoSession: "CREATE_CRYPTO_SESSION", CloseCryptoSession: "CLOSE_CRYPTO_SESSION",
	PostcopyAdvise: "POSTCOPY_ADVISE", PostcopyListen: "POSTCOPY_LISTEN", PostcopyEnd: "POSTCOPY_END",
	GetInflightFD: "GET_INFLIGHT_FD", SetInflightFD: "SET_INFLIGHT_FD", GPUSetSocket: "GPU_SET_SOCKET",
	ResetDevice: "RESET_DEVICE", VringKick: "VRING_KICK", GetMaxMemSlots: "GET_MAX_MEM_SLOTS",
	AddMemReg: "ADD_MEM_REG", RemMemReg: "REM_MEM_REG", SetStatus: "SET_STATUS", GetStatus: "GET_STATUS",
}

func (r Request) String() string {
	if n, ok := requestNames[r]; ok {
		return n
	}
	return fmt.Sprintf("REQUEST_%d", uint32(r))
}

// Header flags.
const (
	FlagVersion   = 0x1    // bits 0-1: protocol version 1
	FlagVersionMs = 0x3    // mask of the version bits
	FlagReply     = 1 << 2 // this is a reply
	FlagNeedReply = 1 << 3 // REPLY_ACK requested
)

// Virtio feature bits used by vhost-user-scsi.
const (
	FVirtioSCSIInOut      = 0
	FVirtioSCSIHotplug    = 1
	FVirtioSCSIChange     = 2
	FVirtioSCSIT10PI      = 3
	FNotifyOnEmpty        = 24
	FAnyLayout            = 27
	FRingIndirectDesc     = 28
	FRingEventIdx         = 29
	FProtocolFeatures     = 30 // VHOST_USER_F_PROTOCOL_FEATURES
	FVersion1             = 32
	FAccessPlatform       = 33
	FRingPacked           = 34
	FInOrder              = 35
	FOrderPlatform        = 36
	FNotificationData     = 38
	FRingReset            = 40
	FLogAll               = 26 // VHOST_F_LOG_ALL
	VringNoFDBit          = 1 << 8
	VringIndexMask        = 0xff
	VringAddrFlagLogUsed  = 1
	MaxFDs                = 8 // fds per message (vhost-user.rst: VHOST_MEMORY_BASELINE_NREGIONS)
	MaxMemRegions         = 8 // regions in SET_MEM_TABLE
	HeaderSize            = 12
	MaxPayload            = 4096 // larger than any defined payload; bigger sizes are refused
	VringStateSize        = 8
	VringAddrSize         = 40
	MemRegionSize         = 32
	ConfigHeaderSize      = 12
	ConfigMaxSize         = 256
	InflightSize          = 20 // GET/SET_INFLIGHT_FD fields without the C struct's tail padding
	InflightWireSize      = 24 // sizeof(VhostUserInflight) as QEMU sends and expects it
	LogSize               = 16 // SET_LOG_BASE: mmap_size, mmap_offset
	SingleMemRegionSize   = 8 + MemRegionSize
	MemoryHeaderSize      = 8
	U64Size               = 8
	MaxQueueSizeSplitRing = 32768
)

// Protocol feature bits (vhost-user.rst "Protocol features").
const (
	PFMQ                 = 0
	PFLogShmFD           = 1
	PFRARP               = 2
	PFReplyAck           = 3
	PFMTU                = 4
	PFBackendReq         = 5
	PFCrossEndian        = 6
	PFCryptoSession      = 7
	PFPagefault          = 8
	PFConfig             = 9
	PFBackendSendFD      = 10
	PFHostNotifier       = 11
	PFInflightShmFD      = 12
	PFResetDevice        = 13
	PFInbandNotify       = 14
	PFConfigureMemSlots  = 15
	PFStatus             = 16
	PFXenMmap            = 17
	PFSharedObject       = 18
	PFDeviceState        = 19
	PFGetVringBaseInflgt = 20
)

// Header is the fixed part of every message.
type Header struct {
	Request Request
	Flags   uint32
	Size    uint32
}

// Msg is one message: header, payload bytes and received fds.
// Payload aliases the Conn's receive buffer until the next Recv.
type Msg struct {
	Header
	Payload []byte
	FDs     []int
}

// NeedReply reports whether the sender asked for a REPLY_ACK.
func (m *Msg) NeedReply() bool { return m.Flags&FlagNeedReply != 0 }

// CloseFDs closes every fd the message carried; callers take the ones they
// keep out of FDs first (set them to -1).
func (m *Msg) CloseFDs() {
	for i, fd := range m.FDs {
		if fd >= 0 {
			unix.Close(fd)
			m.FDs[i] = -1
		}
	}
}

// Errors returned by Recv.
var (
	ErrBadVersion   = errors.New("vhost-user: bad header version")
	ErrTooLarge     = errors.New("vhost-user: payload too large")
	ErrTooManyFDs   = errors.New("vhost-user: too many file descriptors")
	ErrCtrlTrunc    = errors.New("vhost-user: control message truncated")
	ErrShortHeader  = errors.New("vhost-user: short header")
	ErrShortPayload = errors.New("vhost-user: short payload")
)

// Conn frames vhost-user messages over a unix stream socket.
type Conn struct {
	c    *net.UnixConn
	fd   int
	hdr  [HeaderSize]byte
	oob  []byte
	buf  [MaxPayload]byte
	fds  [MaxFDs]int
	sbuf [HeaderSize + MaxPayload]byte
}

// NewConn wraps a connected unix socket.
func NewConn(c *net.UnixConn) *Conn {
	return &Conn{c: c, oob: make([]byte, unix.CmsgSpace(4*MaxFDs))}
}

// Close closes the socket.
func (c *Conn) Close() error { return c.c.Close() }

// UnixConn returns the underlying socket.
func (c *Conn) UnixConn() *net.UnixConn { return c.c }

// Recv reads one message. The header arrives with its fds in one recvmsg;
// the payload is then read in full (a single read may be short). Any fds
// received with a message that fails to parse are closed here.
func (c *Conn) Recv() (*Msg, error) {
	n, oobn, flags, _, err := c.c.ReadMsgUnix(c.hdr[:], c.oob)
	if err != nil {
		return nil, err
	}
	msg := &Msg{}
	fds, ferr := parseFDs(c.oob[:oobn], c.fds[:0])
	msg.FDs = fds
	if ferr == nil && flags&unix.MSG_CTRUNC != 0 {
		ferr = ErrCtrlTrunc
	}
	if ferr != nil {
		msg.CloseFDs()
		return nil, ferr
	}
	if n == 0 {
		msg.CloseFDs()
		return nil, io.EOF
	}
	if n < HeaderSize {
		if _, err := io.ReadFull(c.c, c.hdr[n:]); err != nil {
			msg.CloseFDs()
			return nil, fmt.Errorf("%w: %v", ErrShortHeader, err)
		}
	}
	msg.Request = Request(binary.LittleEndian.Uint32(c.hdr[0:]))
	msg.Flags = binary.LittleEndian.Uint32(c.hdr[4:])
	msg.Size = binary.LittleEndian.Uint32(c.hdr[8:])
	if msg.Flags&FlagVersionMs != FlagVersion {
		msg.CloseFDs()
		return nil, fmt.Errorf("%w: flags %#x in %v", ErrBadVersion, msg.Flags, msg.Request)
	}
	if msg.Size > MaxPayload {
		msg.CloseFDs()
		return nil, fmt.Errorf("%w: %d bytes in %v", ErrTooLarge, msg.Size, msg.Request)
	}
	if _, err := io.ReadFull(c.c, c.buf[:msg.Size]); err != nil {
		msg.CloseFDs()
		return nil, fmt.Errorf("%w: %v: %v", ErrShortPayload, msg.Request, err)
	}
	msg.Payload = c.buf[:msg.Size]
	return msg, nil
}

func parseFDs(oob []byte, dst []int) ([]int, error) {
	if len(oob) == 0 {
		return dst, nil
	}
	cmsgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return dst, fmt.Errorf("vhost-user: control message: %w", err)
	}
	var overflow bool
	for _, cm := range cmsgs {
		if cm.Header.Level != unix.SOL_SOCKET || cm.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		fds, err := unix.ParseUnixRights(&cm)
		if err != nil {
			return dst, fmt.Errorf("vhost-user: SCM_RIGHTS: %w", err)
		}
		for _, fd := range fds {
			if len(dst) == cap(dst) {
				unix.Close(fd)
				overflow = true
				continue
			}
			dst = append(dst, fd)
		}
	}
	if overflow {
		return dst, ErrTooManyFDs
	}
	return dst, nil
}

// Send writes one message with optional fds in a single sendmsg.
func (c *Conn) Send(req Request, flags uint32, payload []byte, fds ...int) error {
	if len(payload) > MaxPayload {
		return fmt.Errorf("%w: sending %d bytes", ErrTooLarge, len(payload))
	}
	b := c.sbuf[:HeaderSize+len(payload)]
	binary.LittleEndian.PutUint32(b[0:], uint32(req))
	binary.LittleEndian.PutUint32(b[4:], flags)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(payload)))
	copy(b[HeaderSize:], payload)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	n, _, err := c.c.WriteMsgUnix(b, oob, nil)
	if err != nil {
		return err
	}
	if n != len(b) {
		// A stream socket may accept part of a message; the fds went with the first byte.
		_, err = c.c.Write(b[n:])
	}
	return err
}

// Reply sends a reply to req with the REPLY flag set.
func (c *Conn) Reply(req Request, payload []byte) error {
	return c.Send(req, FlagVersion|FlagReply, payload)
}

// ReplyU64 sends a u64 reply (also the REPLY_ACK form: 0 = success).
func (c *Conn) ReplyU64(req Request, v uint64) error {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	return c.Reply(req, b[:])
}

// BodySize returns the size of the payload m's request defines, and whether
// it defines one: 0 for requests without a body, SET_MEM_TABLE's from its
// region count (not defined while the header is short or the count is above
// MaxMemRegions). GET/SET_CONFIG, whose size is in the payload, and requests
// this package does not lay out return false. A receiver that ignores bytes
// past the body (as DPDK's and libvhost-user's do) trims to this size; one
// shorter than the body is left for the decoder to refuse.
func BodySize(m *Msg) (int, bool) {
	switch m.Request {
	case GetFeatures, SetOwner, ResetOwner, GetProtocolFeatures, GetQueueNum, ResetDevice, GetMaxMemSlots,
		SetLogFD, SetBackendReqFD, GetStatus:
		return 0, true
	case SetFeatures, SetProtocolFeatures, SetVringKick, SetVringCall, SetVringErr, SetStatus:
		return U64Size, true
	case SetVringNum, SetVringBase, GetVringBase, SetVringEnable:
		return VringStateSize, true
	case SetVringAddr:
		return VringAddrSize, true
	case AddMemReg, RemMemReg:
		return SingleMemRegionSize, true
	case GetInflightFD, SetInflightFD:
		return InflightWireSize, true
	case SetLogBase:
		return LogSize, true
	case SetMemTable:
		if len(m.Payload) < MemoryHeaderSize {
			return 0, false
		}
		n := binary.LittleEndian.Uint32(m.Payload)
		if n > MaxMemRegions {
			return 0, false
		}
		return MemoryHeaderSize + int(n)*MemRegionSize, true
	}
	return 0, false
}

// Payload layouts. Decoders check the exact size and return ErrPayloadSize.

// ErrPayloadSize reports a payload whose size does not match its message.
var ErrPayloadSize = errors.New("vhost-user: wrong payload size")

func sizeErr(r Request, got, want int) error {
	return fmt.Errorf("%w: %v has %d bytes, want %d", ErrPayloadSize, r, got, want)
}

// U64 decodes a u64 payload.
func U64(m *Msg) (uint64, error) {
	if len(m.Payload) != U64Size {
		return 0, sizeErr(m.Request, len(m.Payload), U64Size)
	}
	return binary.LittleEndian.Uint64(m.Payload), nil
}

// PutU64 encodes a u64 payload.
func PutU64(v uint64) []byte {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint64(b, v)
	return b
}

// VringState is {index, num}: SET_VRING_NUM/BASE, GET_VRING_BASE, SET_VRING_ENABLE.
type VringState struct{ Index, Num uint32 }

// DecodeVringState decodes a vring state payload.
func DecodeVringState(m *Msg) (VringState, error) {
	if len(m.Payload) != VringStateSize {
		return VringState{}, sizeErr(m.Request, len(m.Payload), VringStateSize)
	}
	return VringState{binary.LittleEndian.Uint32(m.Payload), binary.LittleEndian.Uint32(m.Payload[4:])}, nil
}

// Encode encodes a vring state payload.
func (s VringState) Encode() []byte {
	b := make([]byte, VringStateSize)
	binary.LittleEndian.PutUint32(b, s.Index)
	binary.LittleEndian.PutUint32(b[4:], s.Num)
	return b
}

// VringAddr is the SET_VRING_ADDR payload; addresses are front-end virtual addresses.
type VringAddr struct {
	Index, Flags           uint32
	Desc, Used, Avail, Log uint64
}

// DecodeVringAddr decodes SET_VRING_ADDR.
func DecodeVringAddr(m *Msg) (VringAddr, error) {
	if len(m.Payload) != VringAddrSize {
		return VringAddr{}, sizeErr(m.Request, len(m.Payload), VringAddrSize)
	}
	p := m.Payload
	return VringAddr{
		Index: binary.LittleEndian.Uint32(p), Flags: binary.LittleEndian.Uint32(p[4:]),
		Desc: binary.LittleEndian.Uint64(p[8:]), Used: binary.LittleEndian.Uint64(p[16:]),
		Avail: binary.LittleEndian.Uint64(p[24:]), Log: binary.LittleEndian.Uint64(p[32:]),
	}, nil
}

// Encode encodes SET_VRING_ADDR.
func (a VringAddr) Encode() []byte {
	b := make([]byte, VringAddrSize)
	binary.LittleEndian.PutUint32(b, a.Index)
	binary.LittleEndian.PutUint32(b[4:], a.Flags)
	binary.LittleEndian.PutUint64(b[8:], a.Desc)
	binary.LittleEndian.PutUint64(b[16:], a.Used)
	binary.LittleEndian.PutUint64(b[24:], a.Avail)
	binary.LittleEndian.PutUint64(b[32:], a.Log)
	return b
}

// MemRegion is one memory table entry.
type MemRegion struct{ GPA, Size, UVA, MmapOffset uint64 }

func decodeRegion(p []byte) MemRegion {
	return MemRegion{
		GPA: binary.LittleEndian.Uint64(p), Size: binary.LittleEndian.Uint64(p[8:]),
		UVA: binary.LittleEndian.Uint64(p[16:]), MmapOffset: binary.LittleEndian.Uint64(p[24:]),
	}
}

func (r MemRegion) put(b []byte) {
	binary.LittleEndian.PutUint64(b, r.GPA)
	binary.LittleEndian.PutUint64(b[8:], r.Size)
	binary.LittleEndian.PutUint64(b[16:], r.UVA)
	binary.LittleEndian.PutUint64(b[24:], r.MmapOffset)
}

// ErrRegionCount reports a memory table with too many regions, or a region
// count that does not match the fds.
var ErrRegionCount = errors.New("vhost-user: bad memory region count")

// DecodeMemTable decodes SET_MEM_TABLE. QEMU sends the header plus exactly
// nregions entries; some front-ends send all 8 slots, so both are accepted.
// A table of 0 regions (and 0 fds) is well-formed: SPDK's initiator sends one
// when none of its memory is in hugepage files, and DPDK and libvhost-user
// accept it; it maps nothing.
func DecodeMemTable(m *Msg) ([]MemRegion, error) {
	if len(m.Payload) < MemoryHeaderSize {
		return nil, sizeErr(m.Request, len(m.Payload), MemoryHeaderSize)
	}
	n := binary.LittleEndian.Uint32(m.Payload)
	if n > MaxMemRegions {
		return nil, fmt.Errorf("%w: %d regions", ErrRegionCount, n)
	}
	exact := MemoryHeaderSize + int(n)*MemRegionSize
	full := MemoryHeaderSize + MaxMemRegions*MemRegionSize
	if len(m.Payload) != exact && len(m.Payload) != full {
		return nil, sizeErr(m.Request, len(m.Payload), exact)
	}
	if len(m.FDs) != int(n) {
		return nil, fmt.Errorf("%w: %d regions with %d fds", ErrRegionCount, n, len(m.FDs))
	}
	regs := make([]MemRegion, n)
	for i := range regs {
		regs[i] = decodeRegion(m.Payload[MemoryHeaderSize+i*MemRegionSize:])
	}
	return regs, nil
}

// EncodeMemTable encodes SET_MEM_TABLE with exactly len(regs) entries.
func EncodeMemTable(regs []MemRegion) []byte {
	b := make([]byte, MemoryHeaderSize+len(regs)*MemRegionSize)
	binary.LittleEndian.PutUint32(b, uint32(len(regs)))
	for i, r := range regs {
		r.put(b[MemoryHeaderSize+i*MemRegionSize:])
	}
	return b
}

// DecodeSingleRegion decodes ADD_MEM_REG / REM_MEM_REG ({u64 padding, region}).
func DecodeSingleRegion(m *Msg) (MemRegion, error) {
	if len(m.Payload) != SingleMemRegionSize {
		return MemRegion{}, sizeErr(m.Request, len(m.Payload), SingleMemRegionSize)
	}
	return decodeRegion(m.Payload[8:]), nil
}

// EncodeSingleRegion encodes ADD_MEM_REG / REM_MEM_REG.
func EncodeSingleRegion(r MemRegion) []byte {
	b := make([]byte, SingleMemRegionSize)
	r.put(b[8:])
	return b
}

// Config is the GET_CONFIG/SET_CONFIG payload header.
type Config struct{ Offset, Size, Flags uint32 }

// DecodeConfig decodes a config payload header and checks the data length.
func DecodeConfig(m *Msg) (Config, []byte, error) {
	if len(m.Payload) < ConfigHeaderSize {
		return Config{}, nil, sizeErr(m.Request, len(m.Payload), ConfigHeaderSize)
	}
	c := Config{binary.LittleEndian.Uint32(m.Payload), binary.LittleEndian.Uint32(m.Payload[4:]),
		binary.LittleEndian.Uint32(m.Payload[8:])}
	data := m.Payload[ConfigHeaderSize:]
	if c.Size > ConfigMaxSize || int(c.Size) != len(data) {
		return c, nil, sizeErr(m.Request, len(m.Payload), ConfigHeaderSize+int(c.Size))
	}
	return c, data, nil
}

// Log is the SET_LOG_BASE payload (vhost-user.rst "Log description"): the
// dirty page log's size and offset in the fd that comes with it.
type Log struct {
	MmapSize, MmapOffset uint64
}

// DecodeLog decodes a log description.
func DecodeLog(m *Msg) (Log, error) {
	if len(m.Payload) < LogSize {
		return Log{}, sizeErr(m.Request, len(m.Payload), LogSize)
	}
	return Log{binary.LittleEndian.Uint64(m.Payload), binary.LittleEndian.Uint64(m.Payload[8:])}, nil
}

// Encode encodes a log description.
func (l Log) Encode() []byte {
	b := make([]byte, LogSize)
	binary.LittleEndian.PutUint64(b, l.MmapSize)
	binary.LittleEndian.PutUint64(b[8:], l.MmapOffset)
	return b
}

// Inflight is the GET_INFLIGHT_FD / SET_INFLIGHT_FD payload (vhost-user.rst
// "Inflight description"): the shared region's size and offset in its fd, and
// the queue count and size it was laid out for.
type Inflight struct {
	MmapSize, MmapOffset uint64
	NumQueues, QueueSize uint16
}

// DecodeInflight decodes an inflight description. QEMU sends and expects
// sizeof(VhostUserInflight), 24 bytes with the struct's tail padding; the 20
// bytes of fields alone are accepted too, as for a packed struct.
func DecodeInflight(m *Msg) (Inflight, error) {
	if len(m.Payload) != InflightSize && len(m.Payload) != InflightWireSize {
		return Inflight{}, sizeErr(m.Request, len(m.Payload), InflightWireSize)
	}
	p := m.Payload
	return Inflight{
		MmapSize: binary.LittleEndian.Uint64(p), MmapOffset: binary.LittleEndian.Uint64(p[8:]),
		NumQueues: binary.LittleEndian.Uint16(p[16:]), QueueSize: binary.LittleEndian.Uint16(p[18:]),
	}, nil
}

// Encode encodes an inflight description in QEMU's 24 bytes (padding zero).
func (f Inflight) Encode() []byte {
	b := make([]byte, InflightWireSize)
	binary.LittleEndian.PutUint64(b, f.MmapSize)
	binary.LittleEndian.PutUint64(b[8:], f.MmapOffset)
	binary.LittleEndian.PutUint16(b[16:], f.NumQueues)
	binary.LittleEndian.PutUint16(b[18:], f.QueueSize)
	return b
}

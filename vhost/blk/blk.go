// Package blk is the virtio-blk request core (virtio 1.2 §5.2) for the
// vhost-user-blk controllers of issue 13: it decodes one request from the
// guest buffers of a descriptor chain into a bdev IO, or answers it at once,
// and turns the IO's result into the status byte. Like scsi/ it does no I/O
// and owns no rings: the vhost device gives it segments and submits the IO
// it prepares, so tests drive it directly.
//
// A request is a 16-byte header (type, reserved, sector) in driver-readable
// memory, then data (driver-readable for OUT, DISCARD and WRITE_ZEROES;
// device-writable for IN and GET_ID), then one device-writable status byte,
// the last byte of the chain. Sectors are 512 bytes whatever the bdev's
// block size; offsets and lengths must be multiples of the block size.
package blk

import (
	"encoding/binary"
	"encoding/hex"
	"errors"

	"vhost-target/bdev"
)

// Request types (virtio 1.2 §5.2.6).
const (
	TypeIn          = 0
	TypeOut         = 1
	TypeFlush       = 4
	TypeGetID       = 8
	TypeDiscard     = 11
	TypeWriteZeroes = 13
)

// Status values, the request's last byte.
const (
	StatusOK     = 0
	StatusIOErr  = 1
	StatusUnsupp = 2
)

const (
	// SectorSize is virtio-blk's unit of the header's sector field and of
	// discard/write-zeroes segments, whatever the block size.
	SectorSize = 512
	// HeaderSize is struct virtio_blk_outhdr.
	HeaderSize = 16
	// IDBytes is VIRTIO_BLK_ID_BYTES, the longest GET_ID answer.
	IDBytes = 20
	// segmentSize is struct virtio_blk_discard_write_zeroes.
	segmentSize = 16
	// flagUnmap is VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, the one defined flag.
	flagUnmap = 1
)

// Limits are the discard and write-zeroes limits the device advertises in
// its config space; requests beyond them fail. Counts are in 512-byte
// sectors.
type Limits struct {
	MaxDiscardSectors      uint32
	MaxDiscardSeg          uint32 // at most bdev.MaxRanges: one IO carries them all
	DiscardSectorAlignment uint32
	MaxWriteZeroesSectors  uint32
	MaxWriteZeroesSeg      uint32 // 1: one IO per request
}

// Disk is one virtio-blk device's view of its bdev, for one geometry: a
// resize builds a new Disk (as scsi.LUN is built over one bdev.Info).
type Disk struct {
	info     *bdev.Info
	readOnly bool
	limits   Limits
	id       [IDBytes]byte
}

// NewDisk describes bdev info as a virtio-blk disk. readOnly adds to the
// bdev's own. The device ID (GET_ID) is the first 20 hex digits of the
// bdev's UUID: stable across restarts, and the same digits that begin the
// SCSI unit serial number of the same bdev.
func NewDisk(info *bdev.Info, readOnly bool) *Disk {
	d := &Disk{info: info, readOnly: readOnly || info.ReadOnly}
	var full [32]byte
	hex.Encode(full[:], info.UUID[:])
	copy(d.id[:], full[:IDBytes])
	bs := info.BlockSize / SectorSize
	if info.Unmap {
		d.limits.MaxDiscardSectors = 1 << 22 // 2 GiB a segment
		d.limits.MaxDiscardSeg = bdev.MaxRanges
		d.limits.DiscardSectorAlignment = bs
	}
	if info.WriteZeroes {
		d.limits.MaxWriteZeroesSectors = 1 << 22
		d.limits.MaxWriteZeroesSeg = 1
	}
	return d
}

// Info returns the geometry the disk was built over.
func (d *Disk) Info() *bdev.Info { return d.info }

// ReadOnly reports whether writes are refused (VIRTIO_BLK_F_RO).
func (d *Disk) ReadOnly() bool { return d.readOnly }

// Limits returns the discard and write-zeroes limits (zero: not offered).
func (d *Disk) Limits() Limits { return d.limits }

// ID returns the GET_ID string, NUL-padded.
func (d *Disk) ID() [IDBytes]byte { return d.id }

// Action says what the caller does with a prepared request.
type Action int

const (
	// Answer: the request is complete (its status set, any data written);
	// write the status and push it.
	Answer Action = iota
	// Submit: submit r.IO to the bdev; Complete when it is done.
	Submit
)

// Request is one request's state; the caller allocates one per ring slot
// and reuses it (nothing here allocates).
type Request struct {
	Type   uint32
	Sector uint64
	Status byte
	// IO is what Prepare asks the caller to submit (Action Submit); the
	// caller sets IO.Done once.
	IO bdev.IO
	// Iov is scratch for the data segments, set once by the caller with the
	// capacity of the longest chain (the ring's size): Prepare appends to
	// Iov[:0] and fails a request with more.
	Iov [][]byte

	in     uint32 // bytes for device-writable data (IN, GET_ID)
	status []byte // the status byte: the last byte of the chain
}

// Errors Prepare reports beside the status it sets (for counters and tests:
// a malformed request fails alone).
var (
	ErrNoStatus = errors.New("blk: no device-writable byte for the status")
	ErrShortHdr = errors.New("blk: request header shorter than 16 bytes")
	ErrTooMany  = errors.New("blk: more data segments than the ring has descriptors")
	ErrAlign    = errors.New("blk: offset or length not a multiple of the block size")
	ErrRange    = errors.New("blk: beyond the disk's capacity")
	ErrReadOnly = errors.New("blk: write to a read-only disk")
	ErrSegments = errors.New("blk: discard/write-zeroes segments malformed or beyond the limits")
	ErrFlags    = errors.New("blk: discard/write-zeroes flags not supported")
	ErrUnsupp   = errors.New("blk: request type not supported")
)

// Prepare decodes the request in rd (driver-readable segments) and wr
// (device-writable segments; the status is the last byte of the last
// non-empty one) and either answers it (Answer, r.Status set) or prepares
// r.IO (Submit). The error says why a request failed (nil when it did
// not); a failed request is answered like any other, except without a
// status byte (ErrNoStatus): nothing can be written, and the caller pushes
// the chain with length 0. Each guest byte is read once.
func (d *Disk) Prepare(r *Request, rd, wr [][]byte) (Action, error) {
	r.Status, r.in, r.status = StatusIOErr, 0, nil
	r.IO.Op, r.IO.Err, r.IO.Iov, r.IO.Offset, r.IO.Len, r.IO.NRanges = 0, nil, nil, 0, 0, 0
	last := len(wr) - 1
	for last >= 0 && len(wr[last]) == 0 {
		last--
	}
	if last < 0 {
		return Answer, ErrNoStatus
	}
	n := len(wr[last])
	r.status = wr[last][n-1 : n]
	var hdr [HeaderSize]byte
	if gather(hdr[:], rd) < HeaderSize {
		return Answer, ErrShortHdr
	}
	r.Type = le.Uint32(hdr[0:])
	r.Sector = le.Uint64(hdr[8:])
	switch r.Type {
	case TypeIn, TypeGetID:
		// The data: every writable byte before the status.
		iov := r.Iov[:0]
		for i := 0; i <= last; i++ {
			seg := wr[i]
			if i == last {
				seg = seg[:n-1]
			}
			if len(seg) == 0 {
				continue
			}
			if len(iov) == cap(iov) {
				return Answer, ErrTooMany
			}
			iov = append(iov, seg)
		}
		if r.Type == TypeGetID {
			id := d.id[:]
			for _, seg := range iov {
				c := copy(seg, id)
				id = id[c:]
				r.in += uint32(c)
			}
			r.Status = StatusOK
			return Answer, nil
		}
		return d.rw(r, bdev.OpRead, iov)
	case TypeOut:
		iov, err := skip(r.Iov[:0], rd, HeaderSize)
		if err != nil {
			return Answer, err
		}
		if d.readOnly {
			return Answer, ErrReadOnly
		}
		return d.rw(r, bdev.OpWrite, iov)
	case TypeFlush:
		r.IO.Op = bdev.OpFlush
		return Submit, nil
	case TypeDiscard, TypeWriteZeroes:
		return d.ranges(r, rd)
	}
	r.Status = StatusUnsupp
	return Answer, ErrUnsupp
}

// rw prepares a read or write of iov at the header's sector.
func (d *Disk) rw(r *Request, op bdev.Op, iov [][]byte) (Action, error) {
	var n uint64
	for _, seg := range iov {
		n += uint64(len(seg))
	}
	off, err := d.check(r.Sector, n)
	if err != nil {
		return Answer, err
	}
	if op == bdev.OpRead {
		r.in = uint32(n) // the used length; a chain holds less than 4 GiB
	}
	if n == 0 {
		r.Status = StatusOK
		return Answer, nil
	}
	r.IO.Op, r.IO.Offset, r.IO.Len, r.IO.Iov = op, off, n, iov
	return Submit, nil
}

// check returns the byte offset of n bytes at sector, or why they are not
// a valid range of the disk.
func (d *Disk) check(sector, n uint64) (uint64, error) {
	bs := uint64(d.info.BlockSize)
	size := d.info.NumBlocks * bs
	if sector > size/SectorSize {
		return 0, ErrRange
	}
	off := sector * SectorSize
	if off%bs != 0 || n%bs != 0 {
		return 0, ErrAlign
	}
	if n > size-off {
		return 0, ErrRange
	}
	return off, nil
}

// ranges prepares a discard or write zeroes from its segments (struct
// virtio_blk_discard_write_zeroes: sector, num_sectors, flags).
func (d *Disk) ranges(r *Request, rd [][]byte) (Action, error) {
	iov, err := skip(r.Iov[:0], rd, HeaderSize)
	if err != nil {
		return Answer, err
	}
	maxSeg, maxSectors := d.limits.MaxDiscardSeg, d.limits.MaxDiscardSectors
	if r.Type == TypeWriteZeroes {
		maxSeg, maxSectors = d.limits.MaxWriteZeroesSeg, d.limits.MaxWriteZeroesSectors
	}
	if maxSeg == 0 {
		r.Status = StatusUnsupp
		return Answer, ErrUnsupp
	}
	if d.readOnly {
		return Answer, ErrReadOnly
	}
	var total uint64
	for _, seg := range iov {
		total += uint64(len(seg))
	}
	if total == 0 || total%segmentSize != 0 || total/segmentSize > uint64(maxSeg) {
		return Answer, ErrSegments
	}
	nseg := int(total / segmentSize)
	for i := 0; i < nseg; i++ {
		var b [segmentSize]byte
		gatherAt(b[:], iov, uint64(i)*segmentSize)
		sector, num, flags := le.Uint64(b[0:]), le.Uint32(b[8:]), le.Uint32(b[12:])
		// Unknown flags, and the unmap flag on a discard: UNSUPP (virtio
		// 1.2 §5.2.6.2).
		if flags&^flagUnmap != 0 || r.Type == TypeDiscard && flags != 0 {
			r.Status = StatusUnsupp
			return Answer, ErrFlags
		}
		if num == 0 || num > maxSectors {
			return Answer, ErrSegments
		}
		off, err := d.check(sector, uint64(num)*SectorSize)
		if err != nil {
			return Answer, err
		}
		r.IO.Ranges[i] = bdev.Range{Offset: off, Len: uint64(num) * SectorSize}
	}
	if r.Type == TypeDiscard {
		r.IO.Op, r.IO.NRanges = bdev.OpUnmap, nseg
	} else {
		r.IO.Op, r.IO.Offset, r.IO.Len = bdev.OpWriteZeroes, r.IO.Ranges[0].Offset, r.IO.Ranges[0].Len
	}
	return Submit, nil
}

// Complete sets the status from a submitted IO's result.
func (r *Request) Complete() {
	switch {
	case r.IO.Err == nil:
		r.Status = StatusOK
	case errors.Is(r.IO.Err, bdev.ErrNotSup):
		r.Status = StatusUnsupp
	default:
		r.Status = StatusIOErr
	}
}

// Finish writes the status byte and returns the used element's length:
// the device-writable data bytes and the status. With no status byte
// (ErrNoStatus) it writes nothing and returns 0.
func (r *Request) Finish() uint32 {
	if r.status == nil {
		return 0
	}
	r.status[0] = r.Status
	return r.in + 1
}

// gather copies the first len(dst) bytes of segs into dst and returns how
// many there were.
func gather(dst []byte, segs [][]byte) int {
	n := 0
	for _, s := range segs {
		c := copy(dst[n:], s)
		n += c
		if n == len(dst) {
			break
		}
	}
	return n
}

// gatherAt copies len(dst) bytes of segs from byte off into dst (the caller
// checked they are there).
func gatherAt(dst []byte, segs [][]byte, off uint64) {
	for _, s := range segs {
		if off >= uint64(len(s)) {
			off -= uint64(len(s))
			continue
		}
		c := copy(dst, s[off:])
		dst, off = dst[c:], 0
		if len(dst) == 0 {
			return
		}
	}
}

// skip appends to out the bytes of segs after the first n, as segments.
func skip(out [][]byte, segs [][]byte, n int) ([][]byte, error) {
	for _, s := range segs {
		if n >= len(s) {
			n -= len(s)
			continue
		}
		if len(out) == cap(out) {
			return out, ErrTooMany
		}
		out = append(out, s[n:])
		n = 0
	}
	return out, nil
}

// le reads the little-endian fields of requests.
var le = binary.LittleEndian

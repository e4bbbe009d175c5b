// Package bdev defines the block-device seam between SCSI emulation and storage.
//
// A Bdev is shared by all reactors; each reactor opens its own Channel and
// submits IOs through it. Completions are delivered on the submitting
// reactor: either inline, before Submit returns (memory bdevs), or from a
// later Poll of the same channel (kernel-backed bdevs). Nothing on this path
// allocates: IOs are owned by the caller and reused.
package bdev

import "errors"

// Op is the kind of an IO.
type Op uint8

const (
	OpRead        Op = iota + 1 // read Len bytes at Offset into Iov
	OpWrite                     // write Iov (Len bytes) at Offset
	OpFlush                     // make every completed write durable
	OpUnmap                     // deallocate each of Ranges
	OpWriteZeroes               // zero Len bytes at Offset
	OpWriteSame                 // write the one block in Iov repeatedly over [Offset, Offset+Len)
)

var opNames = [...]string{"invalid", "read", "write", "flush", "unmap", "write_zeroes", "write_same"}

func (o Op) String() string {
	if int(o) < len(opNames) {
		return opNames[o]
	}
	return "invalid"
}

// Range is a byte range of the device.
type Range struct {
	Offset uint64
	Len    uint64
}

// MaxRanges bounds the ranges of one unmap IO (and so the UNMAP block
// descriptors a LUN advertises). IOs carry them inline so nothing allocates.
const MaxRanges = 32

// Completer is told when an IO finishes. The transport's request type
// implements it; it is set once when the request slot is created.
type Completer interface {
	IODone(io *IO)
}

// IO is one request to a bdev. Callers allocate IOs at start-up and reuse them.
type IO struct {
	Op     Op
	Offset uint64   // byte offset; a multiple of the block size
	Len    uint64   // bytes; for reads and writes, the sum of len(Iov[i])
	Iov    [][]byte // guest buffers (reads, writes) or the pattern block (write same)
	// Ranges[:NRanges] are the ranges of an unmap.
	Ranges  [MaxRanges]Range
	NRanges int

	// Err is the result: nil, or one of the errors below (possibly a
	// unix.Errno from the kernel, which does not allocate as an error).
	Err error

	// Done is called exactly once per Submit.
	Done Completer

	// Priv is for the bdev that owns the IO while it is in flight.
	Priv uint64
}

// Errors a bdev reports in IO.Err. SCSI maps them to sense data.
var (
	ErrIO       = errors.New("bdev: I/O error")                      // EIO: medium error
	ErrRange    = errors.New("bdev: offset or length out of range")  // caller bug or resized device
	ErrReadOnly = errors.New("bdev: device is read-only")            // write to a read-only device
	ErrNoSpace  = errors.New("bdev: no space left on backing store") // ENOSPC
	ErrBusy     = errors.New("bdev: too many requests in flight")    // retry later
	ErrNotSup   = errors.New("bdev: operation not supported")
)

// Info describes a bdev. An Info a bdev has handed out never changes: a
// capacity change (Resizer, Rescanner) publishes a new Info, and Bdev.Info
// returns the newest. Whoever needs one consistent geometry keeps the
// pointer it got (a SCSI LUN is built over one), so a resize can never tear
// a reader's view of the device, and readers need no lock.
type Info struct {
	Name      string
	Type      string // "malloc", "file", "aio"
	BlockSize uint32 // logical block size: 512 or 4096
	NumBlocks uint64
	// UUID is stable across restarts for a given configuration; SCSI derives
	// its serial number and VPD 0x83 designators from it.
	UUID [16]byte

	ReadOnly    bool
	Unmap       bool // OpUnmap is supported
	UnmapZeroes bool // unmapped blocks read back as zeroes (LBPRZ)
	WriteZeroes bool // OpWriteZeroes is efficient (no data transfer)
	WriteCache  bool // writes may be volatile until OpFlush
	// OptimalIOBlocks is a hint for the Block Limits VPD page; 0 = none.
	OptimalIOBlocks uint32
}

// Bdev is a block device shared by all reactors.
type Bdev interface {
	// Info returns the current description. The Info pointed to is never
	// modified; it is replaced when the capacity changes.
	Info() *Info
	// Open returns a channel for the calling reactor. A channel is used by
	// one goroutine only.
	Open() (Channel, error)
	// Close releases the device after every channel is closed.
	Close() error
}

// Channel is one reactor's path to a bdev.
type Channel interface {
	// Submit starts io. io.Done.IODone(io) is called exactly once: either
	// before Submit returns, or from a later Poll on this channel.
	Submit(io *IO)
	// Poll reaps finished IOs, calling their Done, and returns how many
	// completed. It never blocks.
	Poll() int
	// InFlight returns the IOs submitted and not yet completed.
	InFlight() int
	// Close waits for nothing: the caller drains InFlight to 0 first.
	Close() error
}

// Resizer is implemented by bdevs whose capacity can be changed by the target
// (bdev_resize). newSize is in bytes, a positive multiple of the block size.
//
// Growing is always allowed. Shrinking is refused (an error wrapping
// ErrInUse) while any channel of the bdev is open, as SPDK's
// spdk_bdev_notify_blockcnt_change refuses to shrink an open bdev with
// -EBUSY: the blocks cut off could hold data a guest is using. On success
// Info returns a new Info with the new NumBlocks, and IOs checked after
// Resize returns see the new size; an IO already in flight finishes with the
// size it was checked against. Tell the LUNs over the bdev (vhost
// Controller.CapacityChanged) so the guests learn of it.
type Resizer interface {
	Resize(newSize uint64) error
}

// Rescanner is implemented by bdevs over a backing store whose size can be
// changed from outside (a file grown by another process, a block device
// resized): Rescan re-reads the backing store's size (SPDK's bdev_aio_rescan)
// and serves all of it, rounded down to the block size. changed says whether
// NumBlocks changed. The shrink rule of Resizer applies: a smaller backing
// store is refused while a channel is open, and the served size stays.
type Rescanner interface {
	Rescan() (changed bool, err error)
}

// CapacityWatcher is implemented by Rescanners whose backing store tells
// its users when its size changes (an rbd image resized by another client:
// librbd's update watch, as SPDK's bdev_rbd uses). WatchCapacity calls fn
// on a goroutine of its own after each change it is told of (also after
// changes that leave the size as it is, and after a Resize of this bdev);
// fn typically rescans and tells the guests. fn may be running when Close
// returns and must then find the bdev gone or closed: Close does not wait
// for it (fn usually needs the lock Close is called under). Call it once.
type CapacityWatcher interface {
	WatchCapacity(fn func()) error
}

// ErrInUse is wrapped by the error of a Resize or Rescan that would shrink a
// bdev that is open.
var ErrInUse = errors.New("bdev: shrinking a device that is open")

// Waker is implemented by channels whose completions arrive asynchronously
// (kernel-backed bdevs). A reactor that wants to sleep while IOs are in
// flight watches EventFD: it becomes readable when a completion is ready for
// Poll. The reactor drains it; the first call may create it.
type Waker interface {
	// EventFD returns the eventfd, or -1 if the channel cannot provide one.
	EventFD() int
}

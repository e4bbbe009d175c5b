package scsi

import "vhost-target/bdev"

// Dir is the data direction of a command, seen from the initiator.
type Dir uint8

const (
	DirNone Dir = iota // no data buffers
	DirIn              // device → initiator (reads, INQUIRY, ...)
	DirOut             // initiator → device (writes, parameter lists)
)

const (
	// SenseSize is the length of the fixed-format sense data we produce.
	// The virtio-scsi sense buffer is 96 bytes; the rest stays unused.
	SenseSize = 18
	// ScratchSize is the minimum length of Cmd.Buf. Every response we build
	// (the largest is REPORT LUNS for MaxLUNs LUNs) and every parameter list
	// we accept fits in it.
	ScratchSize = 8192
	// MaxTransferBytes bounds one READ or WRITE; it is advertised in the Block
	// Limits VPD page (in blocks) and larger transfers are refused.
	MaxTransferBytes = 4 << 20
)

// SAM status codes (SAM-5 table 33).
const (
	StatusGood           byte = 0x00
	StatusCheckCondition byte = 0x02
	StatusBusy           byte = 0x08
)

// Action tells the transport what to do after Execute.
type Action uint8

const (
	// ActionDone: Status, Sense, SenseLen and Resid are set.
	ActionDone Action = iota
	// ActionIO: submit &c.IO to the bdev, then call c.CompleteIO().
	ActionIO
)

// maxPatternBytes is the largest block a WRITE SAME pattern can have; it is
// also the largest block size NewLUN accepts.
const maxPatternBytes = 4096

// Cmd is one SCSI command. The transport allocates one per request slot at
// start-up and reuses it for every request of that slot.
type Cmd struct {
	// CDB is copied out of guest memory once by the transport, so a guest
	// rewriting its request cannot change a field after it was checked.
	CDB [32]byte
	Dir Dir
	// Data are the data buffers (guest memory): data-in when Dir is DirIn,
	// data-out when DirOut. When DataLen exceeds what a READ or WRITE moves,
	// Execute shortens the last buffer it passes in IO.Iov in place, so that
	// IO.Len is the sum of len(IO.Iov[i]) as bdev requires.
	Data [][]byte
	// DataLen is the sum of len(Data[i]), computed by the transport.
	DataLen uint32
	// Buf is scratch space (len >= ScratchSize) for building responses and
	// gathering parameter lists. It may be shared by all commands run on one
	// goroutine: it is only used during Execute and CompleteIO, never by an
	// IO in flight (a WRITE SAME pattern is copied into the Cmd itself).
	Buf []byte

	// Results.
	Status   byte // SAM status: StatusGood, StatusCheckCondition or StatusBusy
	Sense    [SenseSize]byte
	SenseLen uint8
	Resid    uint32 // DataLen minus the bytes actually transferred
	// IO is prepared by Execute when it returns ActionIO. The transport sets
	// IO.Done once, when it creates the Cmd; Execute never touches Done or
	// Priv.
	IO bdev.IO

	// target is set by Target.Execute so REPORT LUNS sent to one of its LUNs
	// lists all of them; nil when a LUN is executed on its own.
	target *Target
	// xfer is the number of data bytes IO moves when it succeeds; Resid is
	// DataLen minus xfer.
	xfer uint32
	// pending is true between an ActionIO and CompleteIO.
	pending bool
	// patternIov and pattern carry a WRITE SAME block while the IO is in
	// flight, so that nothing in flight points into the shared Buf.
	patternIov [1][]byte
	pattern    [maxPatternBytes]byte
}

// begin clears the results of the previous command on this slot. IO.Done and
// IO.Priv belong to the transport and the bdev and are left alone.
func (c *Cmd) begin() {
	if len(c.Buf) < ScratchSize {
		panic("scsi: Cmd.Buf is shorter than ScratchSize")
	}
	c.Status = StatusGood
	c.SenseLen = 0
	c.Resid = 0
	c.xfer = 0
	c.pending = false
	c.IO.Op = 0
	c.IO.Offset = 0
	c.IO.Len = 0
	c.IO.Iov = nil
	c.IO.NRanges = 0
	c.IO.Err = nil
}

// good completes the command with GOOD status and no data transferred.
func (c *Cmd) good() Action {
	c.Status = StatusGood
	c.SenseLen = 0
	c.Resid = c.DataLen
	return ActionDone
}

// sendData completes a data-in command whose full response is c.Buf[:n]: it
// copies min(n, alloc, DataLen) bytes into Data and sets Resid. Building the
// whole response and truncating here is what makes short allocation lengths
// work (SPC-4 4.2.5.6: the device server shall not return an error for them).
func (c *Cmd) sendData(n int, alloc uint32) Action {
	want := uint32(n) // n <= len(Buf), which is far below 4 GiB
	if alloc < want {
		want = alloc
	}
	if c.DataLen < want {
		want = c.DataLen
	}
	copied := scatter(c.Data, c.Buf[:want])
	c.Status = StatusGood
	c.SenseLen = 0
	c.Resid = c.DataLen - copied
	return ActionDone
}

// scatter copies src into the buffers of data in order and returns the bytes
// copied: len(src), or less if the buffers are shorter.
func scatter(data [][]byte, src []byte) uint32 {
	var copied uint32
	for _, d := range data {
		if len(src) == 0 {
			break
		}
		k := copy(d, src)
		src = src[k:]
		copied += uint32(k)
	}
	return copied
}

// gather copies the first n bytes of the data-out buffers into Buf and
// returns Buf[:n], or false when the buffers hold fewer than n bytes.
// n must be at most len(Buf).
func (c *Cmd) gather(n uint32) ([]byte, bool) {
	dst := c.Buf[:n]
	rest := dst
	for _, d := range c.Data {
		if len(rest) == 0 {
			break
		}
		rest = rest[copy(rest, d):]
	}
	return dst, len(rest) == 0
}

// dataPrefix returns the leading buffers of Data that hold exactly n bytes,
// shortening the last one in place. It returns false when Data holds fewer
// than n bytes (DataLen disagreeing with the buffers is a transport bug we
// refuse rather than trust).
func (c *Cmd) dataPrefix(n uint32) ([][]byte, bool) {
	if n == 0 {
		return nil, true
	}
	var sum uint64
	for i, d := range c.Data {
		sum += uint64(len(d))
		if sum >= uint64(n) {
			excess := sum - uint64(n)
			c.Data[i] = d[:uint64(len(d))-excess]
			return c.Data[:i+1], true
		}
	}
	return nil, false
}

// Package scsi emulates SCSI block devices (SBC-3 direct-access logical
// units) on top of the bdev interface.
//
// The package is a pure core in the style of etcd's raft: it owns no
// goroutines, file descriptors, clocks or buffers of its own, and performs no
// I/O. Its input is a Cmd (a CDB plus the guest's data buffers, already
// translated by the transport) and its output is an Action:
//
//   - ActionDone: the command finished inside Execute. Status, Sense, SenseLen
//     and Resid are set; any data-in has been copied into Cmd.Data.
//   - ActionIO: Execute prepared Cmd.IO (op, byte offset and length, the
//     guest buffers as Iov). The transport submits &c.IO to its bdev channel
//     and, when the bdev completes it, calls c.CompleteIO, which maps IO.Err
//     to a SAM status and sense data.
//
// Because the same CDB and geometry always give the same result, every rule
// is tested exactly, without a bdev or a guest.
//
// The shape follows SPDK lib/scsi/scsi_bdev.c. One table (dispatch.go) lists
// every supported command with its data direction, flags and CDB usage
// bitmap; Execute dispatches from it and REPORT SUPPORTED OPERATION CODES is
// built from it, so the two cannot disagree. Sense data is built in one place
// (sense.go, fixed format 0x70, 18 bytes). Every READ and WRITE size funnels
// into one range checker (rw.go) written so it cannot overflow. Responses are
// built whole into the scratch buffer Cmd.Buf and then truncated to the
// allocation length: a short allocation length is never an error (Linux reads
// VPD pages with a 4-byte header first).
//
// Nothing on the Execute or CompleteIO path allocates: the transport
// allocates one Cmd per request slot at start-up and reuses it.
package scsi

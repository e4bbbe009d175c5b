package scsi

import (
	"errors"

	"vhost-target/bdev"
)

// CompleteIO finishes a command after its IO (prepared by Execute, which
// returned ActionIO) completed: it maps c.IO.Err to status and sense data
// and sets Resid. It does not allocate.
//
// Error mapping (SPC-4 table D.1, as SPDK and LIO report them):
//
//	nil             GOOD
//	bdev.ErrIO      MEDIUM ERROR: UNRECOVERED READ ERROR on reads, WRITE ERROR on
//	                writes; HARDWARE ERROR / INTERNAL TARGET FAILURE on a flush
//	                (SYNCHRONIZE CACHE), because Linux retries a MEDIUM ERROR
//	                that is not a read error, and a retried flush can succeed
//	                after the writes the first one failed to make durable were
//	                lost (a write cache that dropped them, fsync's error
//	                reported once): the guest's fsync would then succeed
//	bdev.ErrReadOnly DATA PROTECT / WRITE PROTECTED
//	bdev.ErrRange   ILLEGAL REQUEST / LOGICAL BLOCK ADDRESS OUT OF RANGE
//	bdev.ErrNoSpace DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT
//	bdev.ErrBusy    BUSY, no sense (the initiator retries)
//	bdev.ErrNotSup  ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE, so that
//	                Linux turns off WRITE SAME or discard for the disk
//	anything else   HARDWARE ERROR / INTERNAL TARGET FAILURE
//
// Errors are matched with errors.Is, so wrapped bdev errors work. A bdev
// that gets EIO from the kernel should report bdev.ErrIO: this package
// imports no syscall package to recognise raw errno values. A failed command
// reports no data transferred (Resid = DataLen).
func (c *Cmd) CompleteIO() {
	if !c.pending {
		panic("scsi: CompleteIO without an IO prepared by Execute")
	}
	c.pending = false
	err := c.IO.Err
	if err == nil {
		c.Status = StatusGood
		c.SenseLen = 0
		c.Resid = c.DataLen - c.xfer // xfer <= DataLen, checked by Execute
		return
	}
	switch {
	case errors.Is(err, bdev.ErrBusy):
		c.Status = StatusBusy
		c.SenseLen = 0
		c.Resid = c.DataLen
	case errors.Is(err, bdev.ErrIO):
		switch c.IO.Op {
		case bdev.OpRead:
			c.checkCondition(keyMediumError, ascUnrecoveredReadError)
		case bdev.OpFlush:
			c.checkCondition(keyHardwareError, ascInternalTargetFailure)
		default:
			c.checkCondition(keyMediumError, ascWriteError)
		}
	case errors.Is(err, bdev.ErrReadOnly):
		c.checkCondition(keyDataProtect, ascWriteProtected)
	case errors.Is(err, bdev.ErrRange):
		c.checkCondition(keyIllegalRequest, ascLBAOutOfRange)
	case errors.Is(err, bdev.ErrNoSpace):
		c.checkCondition(keyDataProtect, ascSpaceAllocFailed)
	case errors.Is(err, bdev.ErrNotSup):
		c.checkCondition(keyIllegalRequest, ascInvalidOpcode)
	default:
		c.checkCondition(keyHardwareError, ascInternalTargetFailure)
	}
}

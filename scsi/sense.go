package scsi

// Sense keys (SPC-4 table 50).
const (
	keyNoSense        byte = 0x0
	keyMediumError    byte = 0x3
	keyHardwareError  byte = 0x4
	keyIllegalRequest byte = 0x5
	keyUnitAttention  byte = 0x6
	keyDataProtect    byte = 0x7
)

// asc is an additional sense code (high byte) and qualifier (low byte).
type asc uint16

// Additional sense codes we report (SPC-4 table D.1).
const (
	ascNone                    asc = 0x0000
	ascWriteError              asc = 0x0C00 // WRITE ERROR
	ascUnrecoveredReadError    asc = 0x1100 // UNRECOVERED READ ERROR
	ascParamListLength         asc = 0x1A00 // PARAMETER LIST LENGTH ERROR
	ascInvalidOpcode           asc = 0x2000 // INVALID COMMAND OPERATION CODE
	ascLBAOutOfRange           asc = 0x2100 // LOGICAL BLOCK ADDRESS OUT OF RANGE
	ascInvalidFieldInCDB       asc = 0x2400 // INVALID FIELD IN CDB
	ascLUNNotSupported         asc = 0x2500 // LOGICAL UNIT NOT SUPPORTED
	ascInvalidFieldInParamList asc = 0x2600 // INVALID FIELD IN PARAMETER LIST
	ascWriteProtected          asc = 0x2700 // WRITE PROTECTED
	ascCapacityChanged         asc = 0x2A09 // CAPACITY DATA HAS CHANGED
	ascReportedLUNsChanged     asc = 0x3F0E // REPORTED LUNS DATA HAS CHANGED
	ascSpaceAllocFailed        asc = 0x2707 // SPACE ALLOCATION FAILED WRITE PROTECT
	ascSavingNotSupported      asc = 0x3900 // SAVING PARAMETERS NOT SUPPORTED
	ascInternalTargetFailure   asc = 0x4400 // INTERNAL TARGET FAILURE
)

// buildSense writes fixed-format sense data (SPC-4 4.5.3) into dst, which
// must hold SenseSize bytes, and returns SenseSize.
func buildSense(dst []byte, key byte, code asc) int {
	dst = dst[:SenseSize]
	clear(dst)
	dst[0] = 0x70             // RESPONSE CODE: current error, fixed format; VALID=0
	dst[2] = key & 0x0F       // SENSE KEY (FILEMARK, EOM, ILI zero)
	dst[7] = SenseSize - 8    // ADDITIONAL SENSE LENGTH: bytes after byte 7
	dst[12] = byte(code >> 8) // ADDITIONAL SENSE CODE
	dst[13] = byte(code)      // ADDITIONAL SENSE CODE QUALIFIER
	return SenseSize          // bytes 15-17 (SKSV, sense-key specific) zero
}

// checkCondition completes c with CHECK CONDITION and the given sense. No
// data is reported as transferred: Resid is DataLen.
func (c *Cmd) checkCondition(key byte, code asc) Action {
	c.Status = StatusCheckCondition
	c.SenseLen = uint8(buildSense(c.Sense[:], key, code))
	c.Resid = c.DataLen
	return ActionDone
}

// illegalRequest is checkCondition with sense key ILLEGAL REQUEST, the most
// common failure: bad opcode, bad field, LBA out of range.
func (c *Cmd) illegalRequest(code asc) Action {
	return c.checkCondition(keyIllegalRequest, code)
}

// invalidField is ILLEGAL REQUEST / INVALID FIELD IN CDB.
func (c *Cmd) invalidField() Action {
	return c.illegalRequest(ascInvalidFieldInCDB)
}

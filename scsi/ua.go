package scsi

// UnitAttention is a set of unit attention conditions pending for one I_T
// nexus on one logical unit (SAM-5 5.14). The transport keeps them, one set
// per initiator (a vhost session) and LUN, because a LUN is shared by every
// initiator and each must be told once; this package only says which
// commands report a condition and builds the report.
type UnitAttention uint32

const (
	// UACapacityChanged is CAPACITY DATA HAS CHANGED (2A/09): the LUN's
	// bdev was resized (SBC-4 4.6; SPDK lib/scsi/lun.c raises it on a
	// resize, Linux logs it and sd rescans on the matching virtio event).
	UACapacityChanged UnitAttention = 1 << iota
	// UAReportedLUNsChanged is REPORTED LUNS DATA HAS CHANGED (3F/0E): a
	// LUN was added to or removed from the LUN's target (SPC-4 6.33 asks
	// for it on every I_T nexus; LIO's target_luns_data_has_changed raises
	// it on every other LUN of the initiator).
	UAReportedLUNsChanged
)

// ascOf gives the additional sense code of one condition.
func (ua UnitAttention) ascOf() asc {
	if ua == UACapacityChanged {
		return ascCapacityChanged
	}
	return ascReportedLUNsChanged
}

// Next returns the condition of ua to report first (capacity before LUN
// inventory), or 0 if none is pending.
func (ua UnitAttention) Next() UnitAttention { return ua & -ua }

// ReportsUnitAttention says whether a command with this operation code
// reports a pending unit attention (SAM-5 5.14, SPC-4 5.14 with
// UA_INTLCK_CTRL 0): INQUIRY and REPORT LUNS run as if none were pending and
// leave it pending; every other command, REQUEST SENSE included, reports it
// and clears it.
func ReportsUnitAttention(opcode byte) bool {
	return opcode != opInquiry && opcode != opReportLUNs
}

// ReportUnitAttention completes c with the unit attention ua (one condition,
// from Next) instead of running it: REQUEST SENSE returns it as its
// parameter data with GOOD status, any other command ends in CHECK
// CONDITION with sense key UNIT ATTENTION. The caller has checked
// ReportsUnitAttention and clears the condition. It does not allocate.
func (c *Cmd) ReportUnitAttention(ua UnitAttention) Action {
	c.begin()
	if c.CDB[0] == opRequestSense {
		if c.DataLen > 0 && c.Dir != DirIn {
			return c.invalidField()
		}
		return requestSense(c, keyUnitAttention, ua.ascOf())
	}
	return c.checkCondition(keyUnitAttention, ua.ascOf())
}

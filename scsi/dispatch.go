package scsi

// Execute runs c against the LUN. When it returns ActionIO the transport
// submits &c.IO and calls c.CompleteIO when the bdev finishes it; otherwise
// the results are already set. Execute does not allocate.
func (l *LUN) Execute(c *Cmd) Action {
	c.target = nil
	return l.execute(c)
}

// execute is the single dispatch: look the CDB up in the command table,
// apply the checks common to all commands, and run the command.
func (l *LUN) execute(c *Cmd) Action {
	c.begin()
	e, found := l.lookup(c.CDB[0], c.CDB[1]&saMask)
	if e == nil {
		if found {
			// The opcode exists but not this service action (SPC-4 4.2.5.3).
			return c.invalidField()
		}
		return c.illegalRequest(ascInvalidOpcode)
	}
	if e.flags&flagWrite != 0 && l.info.ReadOnly {
		return c.checkCondition(keyDataProtect, ascWriteProtected)
	}
	// A command that moves data must be given buffers the right way round;
	// a command that moves none ignores any buffers it was given.
	if e.dir != DirNone && c.DataLen > 0 && c.Dir != e.dir {
		return c.invalidField()
	}
	return e.run(l, c)
}

// saMask selects the SERVICE ACTION field of byte 1 of a CDB.
const saMask = 0x1F

// Operation codes (SPC-4 and SBC-3).
const (
	opTestUnitReady     = 0x00
	opRequestSense      = 0x03
	opRead6             = 0x08
	opWrite6            = 0x0A
	opInquiry           = 0x12
	opModeSelect6       = 0x15
	opModeSense6        = 0x1A
	opStartStopUnit     = 0x1B
	opReadCapacity10    = 0x25
	opRead10            = 0x28
	opWrite10           = 0x2A
	opVerify10          = 0x2F
	opSyncCache10       = 0x35
	opWriteSame10       = 0x41
	opUnmap             = 0x42
	opModeSelect10      = 0x55
	opModeSense10       = 0x5A
	opRead16            = 0x88
	opWrite16           = 0x8A
	opVerify16          = 0x8F
	opSyncCache16       = 0x91
	opWriteSame16       = 0x93
	opServiceActionIn16 = 0x9E
	opReportLUNs        = 0xA0
	opMaintenanceIn     = 0xA3
	opRead12            = 0xA8
	opWrite12           = 0xAA

	saReadCapacity16       = 0x10 // of SERVICE ACTION IN(16)
	saReportSupportedOpsIn = 0x0C // of MAINTENANCE IN
)

// cmdFlags qualify a command table entry.
type cmdFlags uint8

const (
	// flagWrite: the command modifies the medium and is refused with DATA
	// PROTECT on a read-only LUN.
	flagWrite cmdFlags = 1 << iota
	// flagUnmap: the command exists only when the bdev supports unmap.
	flagUnmap
	// flagSA: the opcode has service actions; sa is the one this entry runs.
	flagSA
)

// command is one row of the dispatch table.
type command struct {
	name   string
	opcode byte
	sa     byte
	flags  cmdFlags
	dir    Dir // DirNone for commands without data or where it is optional
	// usage is the CDB USAGE DATA of REPORT SUPPORTED OPERATION CODES: bit
	// set = the field is evaluated. len(usage) is the CDB length; usage[0]
	// is the opcode and, for commands with service actions, the SERVICE
	// ACTION field holds the service action (SPC-4 6.35.4).
	usage []byte
	run   func(l *LUN, c *Cmd) Action
}

// commands is the dispatch table, sorted by opcode then service action. It
// is filled by init because REPORT SUPPORTED OPERATION CODES reads it.
var commands []command

// commandIndex maps an opcode to 1 + the index of its first entry in
// commands; 0 means the opcode is not supported.
var commandIndex [256]uint8

// Usage bitmaps shared by several commands.
var (
	usageNone6  = []byte{0xFF, 0x00, 0x00, 0x00, 0x00, 0x00}
	usageRW6    = []byte{0xFF, 0x1F, 0xFF, 0xFF, 0xFF, 0x00}
	usageRW10   = []byte{0xFF, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0xFF, 0xFF, 0x00}
	usageRW12   = []byte{0xFF, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00}
	usageRW16   = []byte{0xFF, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00}
	usageVfy10  = []byte{0xFF, 0xE6, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0xFF, 0xFF, 0x00}
	usageVfy16  = []byte{0xFF, 0xE6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00}
	usageSync10 = []byte{0xFF, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0xFF, 0xFF, 0x00}
	usageSync16 = []byte{0xFF, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00}
)

func init() {
	commands = []command{
		{name: "TEST UNIT READY", opcode: opTestUnitReady, usage: usageNone6, run: runGood},
		{name: "REQUEST SENSE", opcode: opRequestSense, dir: DirIn,
			usage: []byte{0xFF, 0x01, 0x00, 0x00, 0xFF, 0x00}, run: runRequestSense},
		{name: "READ(6)", opcode: opRead6, dir: DirIn, usage: usageRW6, run: runRead6},
		{name: "WRITE(6)", opcode: opWrite6, dir: DirOut, flags: flagWrite, usage: usageRW6, run: runWrite6},
		{name: "INQUIRY", opcode: opInquiry, dir: DirIn,
			usage: []byte{0xFF, 0x03, 0xFF, 0xFF, 0xFF, 0x00}, run: runInquiry},
		{name: "MODE SELECT(6)", opcode: opModeSelect6, dir: DirOut,
			usage: []byte{0xFF, 0x11, 0x00, 0x00, 0xFF, 0x00}, run: runModeSelect6},
		{name: "MODE SENSE(6)", opcode: opModeSense6, dir: DirIn,
			usage: []byte{0xFF, 0x08, 0xFF, 0xFF, 0xFF, 0x00}, run: runModeSense6},
		{name: "START STOP UNIT", opcode: opStartStopUnit, usage: usageNone6, run: runGood},
		{name: "READ CAPACITY(10)", opcode: opReadCapacity10, dir: DirIn,
			usage: []byte{0xFF, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x01, 0x00}, run: runReadCapacity10},
		{name: "READ(10)", opcode: opRead10, dir: DirIn, usage: usageRW10, run: runRead10},
		{name: "WRITE(10)", opcode: opWrite10, dir: DirOut, flags: flagWrite, usage: usageRW10, run: runWrite10},
		{name: "VERIFY(10)", opcode: opVerify10, usage: usageVfy10, run: runVerify10},
		{name: "SYNCHRONIZE CACHE(10)", opcode: opSyncCache10, usage: usageSync10, run: runSyncCache10},
		{name: "WRITE SAME(10)", opcode: opWriteSame10, dir: DirOut, flags: flagWrite,
			usage: []byte{0xFF, 0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0xFF, 0xFF, 0x00}, run: runWriteSame10},
		{name: "UNMAP", opcode: opUnmap, dir: DirOut, flags: flagWrite | flagUnmap,
			usage: []byte{0xFF, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x00}, run: runUnmap},
		{name: "MODE SELECT(10)", opcode: opModeSelect10, dir: DirOut,
			usage: []byte{0xFF, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x00}, run: runModeSelect10},
		{name: "MODE SENSE(10)", opcode: opModeSense10, dir: DirIn,
			usage: []byte{0xFF, 0x18, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x00}, run: runModeSense10},
		{name: "READ(16)", opcode: opRead16, dir: DirIn, usage: usageRW16, run: runRead16},
		{name: "WRITE(16)", opcode: opWrite16, dir: DirOut, flags: flagWrite, usage: usageRW16, run: runWrite16},
		{name: "VERIFY(16)", opcode: opVerify16, usage: usageVfy16, run: runVerify16},
		{name: "SYNCHRONIZE CACHE(16)", opcode: opSyncCache16, usage: usageSync16, run: runSyncCache16},
		{name: "WRITE SAME(16)", opcode: opWriteSame16, dir: DirOut, flags: flagWrite,
			usage: []byte{0xFF, 0xF9, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00},
			run:   runWriteSame16},
		{name: "READ CAPACITY(16)", opcode: opServiceActionIn16, sa: saReadCapacity16, flags: flagSA, dir: DirIn,
			usage: []byte{0xFF, saReadCapacity16, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00},
			run:   runReadCapacity16},
		{name: "REPORT LUNS", opcode: opReportLUNs, dir: DirIn,
			usage: []byte{0xFF, 0x00, 0xFF, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00}, run: runReportLUNs},
		{name: "REPORT SUPPORTED OPERATION CODES", opcode: opMaintenanceIn, sa: saReportSupportedOpsIn,
			flags: flagSA, dir: DirIn,
			usage: []byte{0xFF, saReportSupportedOpsIn, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00},
			run:   runReportSupportedOpcodes},
		{name: "READ(12)", opcode: opRead12, dir: DirIn, usage: usageRW12, run: runRead12},
		{name: "WRITE(12)", opcode: opWrite12, dir: DirOut, flags: flagWrite, usage: usageRW12, run: runWrite12},
	}
	for i := range commands {
		e := &commands[i]
		if i > 0 {
			p := &commands[i-1]
			if p.opcode > e.opcode || (p.opcode == e.opcode && (e.flags&flagSA == 0 || p.sa >= e.sa)) {
				panic("scsi: command table not sorted: " + e.name)
			}
		}
		if len(e.usage) != cdbLength(e.opcode) || e.usage[0] != 0xFF ||
			(e.flags&flagSA != 0 && e.usage[1] != e.sa) {
			panic("scsi: bad CDB usage bitmap: " + e.name)
		}
		if commandIndex[e.opcode] == 0 {
			commandIndex[e.opcode] = uint8(i + 1)
		}
	}
}

// cdbLength returns the CDB length implied by the opcode's group code
// (SPC-4 4.2.5.1), for the groups we use.
func cdbLength(opcode byte) int {
	switch opcode >> 5 {
	case 0:
		return 6
	case 1, 2:
		return 10
	case 4:
		return 16
	case 5:
		return 12
	}
	return 0
}

// lookup finds the table entry for an opcode (and, for opcodes with service
// actions, sa) that exists on this LUN. It returns nil and found=true when
// the opcode exists but the service action does not.
func (l *LUN) lookup(opcode, sa byte) (e *command, found bool) {
	i := int(commandIndex[opcode])
	if i == 0 {
		return nil, false
	}
	for i--; i < len(commands) && commands[i].opcode == opcode; i++ {
		e := &commands[i]
		if !l.supports(e) {
			return nil, false
		}
		if e.flags&flagSA == 0 || e.sa == sa {
			return e, true
		}
	}
	return nil, true
}

// runGood completes a command that has nothing to do: TEST UNIT READY (the
// unit is always ready) and START STOP UNIT (a virtual disk cannot stop).
func runGood(l *LUN, c *Cmd) Action {
	return c.good()
}

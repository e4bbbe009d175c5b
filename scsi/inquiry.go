package scsi

import "encoding/binary"

// Identification strings of the standard INQUIRY data, space padded.
const (
	vendorID   = "VHOSTTGT"         // T10 VENDOR IDENTIFICATION, 8 bytes
	productID  = "vhost-target    " // PRODUCT IDENTIFICATION, 16 bytes
	productRev = "0001"             // PRODUCT REVISION LEVEL, 4 bytes
)

// Peripheral byte (byte 0 of INQUIRY data): qualifier and device type.
const (
	peripheralDisk   = 0x00 // qualifier 0 (connected), type 0 (direct access block)
	peripheralAbsent = 0x7F // qualifier 3 (no logical unit), type 0x1F (unknown)
)

// standardInquiryLen is the length of our standard INQUIRY data: the 36
// bytes every initiator reads first, so Linux needs no second INQUIRY.
const standardInquiryLen = 36

// Vital product data pages.
const (
	vpdSupportedPages  = 0x00
	vpdUnitSerial      = 0x80
	vpdDeviceID        = 0x83
	vpdBlockLimits     = 0xB0
	vpdBlockDeviceChar = 0xB1
	vpdProvisioning    = 0xB2
)

// vpdPages lists every VPD page other than 0x00, in ascending order. Page
// 0x00 is built from it, so it lists exactly the pages INQUIRY serves.
var vpdPages = [...]struct {
	code  byte
	build func(l *LUN, b []byte) int // writes the page into b, returns its length
}{
	{vpdUnitSerial, (*LUN).vpdUnitSerialPage},
	{vpdDeviceID, (*LUN).vpdDeviceIDPage},
	{vpdBlockLimits, (*LUN).vpdBlockLimitsPage},
	{vpdBlockDeviceChar, (*LUN).vpdBlockDeviceCharPage},
	{vpdProvisioning, (*LUN).vpdProvisioningPage},
}

// runInquiry implements INQUIRY (SPC-4 6.6): standard data or a VPD page.
func runInquiry(l *LUN, c *Cmd) Action {
	cdb := &c.CDB
	if cdb[1]&0x02 != 0 { // CMDDT (obsolete): not supported
		return c.invalidField()
	}
	evpd := cdb[1]&0x01 != 0
	page := cdb[2]
	alloc := uint32(binary.BigEndian.Uint16(cdb[3:5]))
	if !evpd {
		if page != 0 { // SPC-4 6.6.1: PAGE CODE must be zero when EVPD is zero
			return c.invalidField()
		}
		return c.sendData(standardInquiry(c.Buf, peripheralDisk), alloc)
	}
	if page == vpdSupportedPages {
		return c.sendData(vpdSupportedPagesPage(c.Buf), alloc)
	}
	for i := range vpdPages {
		if vpdPages[i].code == page {
			return c.sendData(vpdPages[i].build(l, c.Buf), alloc)
		}
	}
	return c.invalidField()
}

// standardInquiry writes the standard INQUIRY data (SPC-4 6.6.2) with the
// given peripheral byte into b and returns its length.
func standardInquiry(b []byte, peripheral byte) int {
	b = b[:standardInquiryLen]
	clear(b)
	b[0] = peripheral
	b[1] = 0x00                   // RMB=0: not removable
	b[2] = 0x05                   // VERSION: SPC-3, so Linux sends REPORT LUNS, VPD and READ CAPACITY(16)
	b[3] = 0x10 | 0x02            // HISUP (hierarchical LUNs), RESPONSE DATA FORMAT 2
	b[4] = standardInquiryLen - 5 // ADDITIONAL LENGTH: bytes after byte 4
	b[7] = 0x02                   // CMDQUE: full task management model
	copy(b[8:16], vendorID)       // T10 VENDOR IDENTIFICATION
	copy(b[16:32], productID)     // PRODUCT IDENTIFICATION
	copy(b[32:36], productRev)    // PRODUCT REVISION LEVEL
	return standardInquiryLen
}

// vpdHeader writes the 4-byte header of a VPD page whose body is n bytes
// and returns the page length.
func vpdHeader(b []byte, page byte, n int) int {
	b[0] = peripheralDisk
	b[1] = page
	binary.BigEndian.PutUint16(b[2:4], uint16(n)) // PAGE LENGTH: bytes after byte 3
	return 4 + n
}

// vpdSupportedPagesPage builds page 0x00 (SPC-4 7.8.13).
func vpdSupportedPagesPage(b []byte) int {
	n := 1 + len(vpdPages)
	clear(b[:4+n])
	b[4] = vpdSupportedPages
	for i := range vpdPages {
		b[5+i] = vpdPages[i].code
	}
	return vpdHeader(b, vpdSupportedPages, n)
}

// vpdUnitSerialPage builds page 0x80 (SPC-4 7.8.15): the UUID in hex, so the
// serial is stable across restarts and unique per disk (udev's by-id links).
func (l *LUN) vpdUnitSerialPage(b []byte) int {
	copy(b[4:], l.serial[:])
	return vpdHeader(b, vpdUnitSerial, len(l.serial))
}

// Designator descriptor header fields (SPC-4 7.8.6.1).
const (
	codeSetBinary   = 0x1
	codeSetASCII    = 0x2
	desigT10Vendor  = 0x1
	desigNAA        = 0x3
	naaDesignLength = 16
)

// vpdDeviceIDPage builds page 0x83 (SPC-4 7.8.6) with two designators of
// the logical unit, both derived from the bdev UUID alone:
//
//   - NAA IEEE Registered Extended (NAA 6, 16 bytes): the NAA nibble is
//     followed by the first 124 bits of the UUID. We own no IEEE OUI, so the
//     COMPANY_ID field carries UUID bits too; what initiators need is that
//     the value is unique and stable, which the UUID gives (Linux prefers
//     this type for /dev/disk/by-id/wwn-* and multipath).
//   - T10 vendor ID: "VHOSTTGT" followed by the serial number.
func (l *LUN) vpdDeviceIDPage(b []byte) int {
	uuid := &l.info.UUID
	p := b[4:]
	// NAA designator.
	p[0] = codeSetBinary   // PROTOCOL IDENTIFIER 0, CODE SET binary
	p[1] = desigNAA        // PIV=0, ASSOCIATION logical unit, DESIGNATOR TYPE NAA
	p[2] = 0               // reserved
	p[3] = naaDesignLength // DESIGNATOR LENGTH
	d := p[4 : 4+naaDesignLength]
	d[0] = 0x60 | uuid[0]>>4
	for i := 1; i < naaDesignLength; i++ {
		d[i] = uuid[i-1]<<4 | uuid[i]>>4
	}
	n := 4 + naaDesignLength
	// T10 vendor ID designator.
	p = p[n:]
	p[0] = codeSetASCII
	p[1] = desigT10Vendor
	p[2] = 0
	p[3] = byte(len(vendorID) + len(l.serial))
	copy(p[4:], vendorID)
	copy(p[4+len(vendorID):], l.serial[:])
	n += 4 + len(vendorID) + len(l.serial)
	return vpdHeader(b, vpdDeviceID, n)
}

// blockLimitsLen is the PAGE LENGTH of the Block Limits page (SBC-3 6.5.3).
const blockLimitsLen = 0x3C

// vpdBlockLimitsPage builds page 0xB0 (SBC-3 6.5.3). Linux takes its
// max_sectors, io_opt, discard and write-zeroes limits from it.
func (l *LUN) vpdBlockLimitsPage(b []byte) int {
	p := b[:4+blockLimitsLen]
	clear(p)
	be := binary.BigEndian
	p[4] = 0x01                                    // WSNZ: WRITE SAME with NUMBER OF LOGICAL BLOCKS zero is refused
	be.PutUint32(p[8:12], l.maxTransferBlocks)     // MAXIMUM TRANSFER LENGTH
	be.PutUint32(p[12:16], l.info.OptimalIOBlocks) // OPTIMAL TRANSFER LENGTH (0 = not reported)
	if l.info.Unmap {
		be.PutUint32(p[20:24], maxUnmapBlocks) // MAXIMUM UNMAP LBA COUNT
		be.PutUint32(p[24:28], maxUnmapDescs)  // MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
	}
	be.PutUint64(p[36:44], uint64(l.maxWriteSameBlocks)) // MAXIMUM WRITE SAME LENGTH
	return vpdHeader(b, vpdBlockLimits, blockLimitsLen)
}

// vpdBlockDeviceCharPage builds page 0xB1 (SBC-3 6.5.2).
func (l *LUN) vpdBlockDeviceCharPage(b []byte) int {
	p := b[:4+blockLimitsLen]
	clear(p)
	binary.BigEndian.PutUint16(p[4:6], 1) // MEDIUM ROTATION RATE 1: non-rotating (solid state)
	return vpdHeader(b, vpdBlockDeviceChar, blockLimitsLen)
}

// vpdProvisioningPage builds page 0xB2 (SBC-3 6.5.4). Linux reads LBPU and
// LBPWS to choose UNMAP or WRITE SAME(16) for discard.
func (l *LUN) vpdProvisioningPage(b []byte) int {
	p := b[:8]
	clear(p)
	if l.info.Unmap {
		p[5] = 0x80 | 0x40 | 0x20 // LBPU, LBPWS, LBPWS10
		if l.info.UnmapZeroes {
			p[5] |= 0x04 // LBPRZ: unmapped blocks read as zeroes
		}
		p[6] = 0x02 // PROVISIONING TYPE: thin provisioned
	}
	return vpdHeader(b, vpdProvisioning, 4)
}

// runRequestSense implements REQUEST SENSE (SPC-4 6.39). A LUN keeps no
// pending sense (no deferred errors or informational exceptions; unit
// attentions are kept per initiator by the transport, which answers REQUEST
// SENSE itself while one is pending, see ReportUnitAttention), so the answer
// is NO SENSE, in fixed format or, with DESC=1, in descriptor format.
func runRequestSense(l *LUN, c *Cmd) Action {
	return requestSense(c, keyNoSense, ascNone)
}

// requestSense returns the given sense as REQUEST SENSE parameter data. It
// is shared with the absent-LUN path, which reports LOGICAL UNIT NOT
// SUPPORTED this way (SPC-4 6.39.1).
func requestSense(c *Cmd, key byte, code asc) Action {
	desc := c.CDB[1]&0x01 != 0
	alloc := uint32(c.CDB[4])
	if !desc {
		return c.sendData(buildSense(c.Buf, key, code), alloc)
	}
	// Descriptor format (SPC-4 4.5.2) with no sense data descriptors.
	b := c.Buf[:8]
	clear(b)
	b[0] = 0x72 // RESPONSE CODE: current error, descriptor format
	b[1] = key
	b[2] = byte(code >> 8)
	b[3] = byte(code)
	return c.sendData(8, alloc)
}

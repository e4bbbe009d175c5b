package scsi

import (
	"bytes"
	"encoding/binary"
)

// Mode pages (SPC-4 7.5, SBC-3 6.4).
const (
	modePageCaching = 0x08
	modePageControl = 0x0A
	modePageAll     = 0x3F
	modeSubpageAll  = 0xFF

	cachingPageLen = 20 // including the 2-byte header
	controlPageLen = 12

	// Page control values of MODE SENSE byte 2 bits 7-6.
	pcCurrent    = 0
	pcChangeable = 1
	pcDefault    = 2
	pcSaved      = 3
)

// modeSenseParams are the decoded fields of MODE SENSE(6) or (10).
type modeSenseParams struct {
	ten     bool // MODE SENSE(10): 8-byte header, LLBAA allowed
	dbd     bool // DISABLE BLOCK DESCRIPTORS
	llbaa   bool // LONG LBA ACCEPTED
	pc      byte // PAGE CONTROL
	page    byte // PAGE CODE
	subpage byte // SUBPAGE CODE
	alloc   uint32
}

// runModeSense6 implements MODE SENSE(6) (SPC-4 6.11).
func runModeSense6(l *LUN, c *Cmd) Action {
	cdb := &c.CDB
	return l.modeSense(c, modeSenseParams{
		dbd:     cdb[1]&0x08 != 0,
		pc:      cdb[2] >> 6,
		page:    cdb[2] & 0x3F,
		subpage: cdb[3],
		alloc:   uint32(cdb[4]),
	})
}

// runModeSense10 implements MODE SENSE(10) (SPC-4 6.12).
func runModeSense10(l *LUN, c *Cmd) Action {
	cdb := &c.CDB
	return l.modeSense(c, modeSenseParams{
		ten:     true,
		llbaa:   cdb[1]&0x10 != 0,
		dbd:     cdb[1]&0x08 != 0,
		pc:      cdb[2] >> 6,
		page:    cdb[2] & 0x3F,
		subpage: cdb[3],
		alloc:   uint32(binary.BigEndian.Uint16(cdb[7:9])),
	})
}

// modeSense builds the mode parameter header, an optional block descriptor
// and the requested pages. Linux reads page 0x3F for the WP bit and page
// 0x08 for WCE; without a caching page it assumes write-through and never
// sends SYNCHRONIZE CACHE.
func (l *LUN) modeSense(c *Cmd, p modeSenseParams) Action {
	if p.pc == pcSaved {
		return c.illegalRequest(ascSavingNotSupported)
	}
	// We have no subpages: subpage 0 names a page, 0xFF "all subpages" of
	// a page (which is just the page here).
	if p.subpage != 0 && p.subpage != modeSubpageAll {
		return c.invalidField()
	}
	b := c.Buf[:256]
	clear(b)
	n := 4
	if p.ten {
		n = 8
	}
	bdLen := 0
	if !p.dbd {
		if p.ten && p.llbaa {
			bdLen = l.longBlockDescriptor(b[n:])
		} else {
			bdLen = l.shortBlockDescriptor(b[n:])
		}
		n += bdLen
	}
	switch p.page {
	case modePageCaching:
		n += l.cachingPage(b[n:], p.pc)
	case modePageControl:
		n += controlPage(b[n:], p.pc)
	case modePageAll:
		n += l.cachingPage(b[n:], p.pc)
		n += controlPage(b[n:], p.pc)
	default:
		return c.invalidField()
	}
	var deviceSpecific byte // DPOFUA=0: Linux emulates FUA with SYNCHRONIZE CACHE
	if l.info.ReadOnly {
		deviceSpecific |= 0x80 // WP: write protected
	}
	if p.ten {
		binary.BigEndian.PutUint16(b[0:2], uint16(n-2)) // MODE DATA LENGTH: bytes after byte 1
		b[3] = deviceSpecific
		if bdLen == 16 {
			b[4] = 0x01 // LONGLBA
		}
		binary.BigEndian.PutUint16(b[6:8], uint16(bdLen)) // BLOCK DESCRIPTOR LENGTH
	} else {
		b[0] = byte(n - 1) // MODE DATA LENGTH: bytes after byte 0
		b[2] = deviceSpecific
		b[3] = byte(bdLen) // BLOCK DESCRIPTOR LENGTH
	}
	return c.sendData(n, p.alloc)
}

// shortBlockDescriptor writes the 8-byte direct-access block descriptor
// (SBC-3 6.4.2): NUMBER OF LOGICAL BLOCKS saturates at 0xFFFFFF.
func (l *LUN) shortBlockDescriptor(b []byte) int {
	blocks := min(l.numBlocks, 0xFFFFFF)
	binary.BigEndian.PutUint32(b[0:4], uint32(blocks)) // DENSITY CODE 0 in byte 0
	binary.BigEndian.PutUint32(b[4:8], l.blockSize)    // byte 4 reserved, LOGICAL BLOCK LENGTH
	return 8
}

// longBlockDescriptor writes the 16-byte long LBA block descriptor.
func (l *LUN) longBlockDescriptor(b []byte) int {
	binary.BigEndian.PutUint64(b[0:8], l.numBlocks)
	binary.BigEndian.PutUint32(b[12:16], l.blockSize)
	return 16
}

// cachingPage writes the Caching mode page (SBC-3 6.4.5). No field is
// changeable, so the changeable mask is all zeroes; current, default and
// saved values are the bdev's.
func (l *LUN) cachingPage(b []byte, pc byte) int {
	b = b[:cachingPageLen]
	clear(b)
	b[0] = modePageCaching
	b[1] = cachingPageLen - 2
	if pc != pcChangeable && l.info.WriteCache {
		b[2] = 0x04 // WCE: writes are cached until SYNCHRONIZE CACHE
	}
	return cachingPageLen
}

// controlPage writes the Control mode page (SPC-4 7.5.7).
func controlPage(b []byte, pc byte) int {
	b = b[:controlPageLen]
	clear(b)
	b[0] = modePageControl
	b[1] = controlPageLen - 2
	if pc != pcChangeable {
		b[3] = 0x10 // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
	}
	return controlPageLen
}

// runModeSelect6 implements MODE SELECT(6) (SPC-4 6.9).
func runModeSelect6(l *LUN, c *Cmd) Action {
	return l.modeSelect(c, false, uint32(c.CDB[4]))
}

// runModeSelect10 implements MODE SELECT(10) (SPC-4 6.10).
func runModeSelect10(l *LUN, c *Cmd) Action {
	return l.modeSelect(c, true, uint32(binary.BigEndian.Uint16(c.CDB[7:9])))
}

// maxModeSelectLen bounds a MODE SELECT parameter list: ours are well below
// 100 bytes, and the upper half of Buf holds the current page to compare.
const maxModeSelectLen = ScratchSize / 2

// modeSelect validates a MODE SELECT parameter list. No mode parameter is
// changeable (the caching page's WCE follows the bdev, which the initiator
// cannot reconfigure), so the list is accepted only when every page it
// carries equals the current page; anything else, including an attempt to
// toggle WCE, is refused with INVALID FIELD IN PARAMETER LIST. This is what
// sdparm and Linux's cache_type attribute expect from a device with fixed
// parameters.
func (l *LUN) modeSelect(c *Cmd, ten bool, listLen uint32) Action {
	if c.CDB[1]&0x01 != 0 { // SP: saving pages is not supported
		return c.invalidField()
	}
	if listLen == 0 { // SPC-4: zero means no data is transferred; not an error
		return c.good()
	}
	if listLen > maxModeSelectLen {
		return c.illegalRequest(ascParamListLength)
	}
	if c.DataLen < listLen || c.Dir != DirOut {
		return c.invalidField() // the buffer cannot hold what the CDB announces
	}
	b, ok := c.gather(listLen)
	if !ok {
		return c.invalidField()
	}
	hdrLen, bdLen, longLBA := uint32(4), uint32(0), false
	if ten {
		hdrLen = 8
	}
	if listLen < hdrLen {
		return c.illegalRequest(ascParamListLength)
	}
	if ten {
		longLBA = b[4]&0x01 != 0
		bdLen = uint32(binary.BigEndian.Uint16(b[6:8]))
	} else {
		bdLen = uint32(b[3])
	}
	if bdLen > listLen-hdrLen {
		return c.illegalRequest(ascParamListLength)
	}
	if bdLen != 0 && !l.blockDescriptorOK(b[hdrLen:hdrLen+bdLen], longLBA) {
		return c.illegalRequest(ascInvalidFieldInParamList)
	}
	cur := c.Buf[maxModeSelectLen : maxModeSelectLen+256]
	for off := hdrLen + bdLen; off < listLen; {
		if listLen-off < 2 {
			return c.illegalRequest(ascParamListLength)
		}
		code, pageLen := b[off]&0x3F, uint32(b[off+1])
		if b[off]&0x40 != 0 { // SPF: we have no subpages
			return c.illegalRequest(ascInvalidFieldInParamList)
		}
		if pageLen > listLen-off-2 {
			return c.illegalRequest(ascParamListLength)
		}
		page := b[off : off+2+pageLen]
		var n int
		switch code {
		case modePageCaching:
			n = l.cachingPage(cur, pcCurrent)
		case modePageControl:
			n = controlPage(cur, pcCurrent)
		default:
			return c.illegalRequest(ascInvalidFieldInParamList)
		}
		// Byte 0 holds the PS bit, reserved in MODE SELECT: compare the rest.
		if len(page) != n || !bytes.Equal(page[1:], cur[1:n]) {
			return c.illegalRequest(ascInvalidFieldInParamList)
		}
		off += 2 + pageLen
	}
	return c.good()
}

// blockDescriptorOK accepts a block descriptor that keeps the geometry: our
// block length, and a block count of zero ("unchanged") or our own.
func (l *LUN) blockDescriptorOK(d []byte, longLBA bool) bool {
	if longLBA {
		if len(d) != 16 {
			return false
		}
		blocks := binary.BigEndian.Uint64(d[0:8])
		return (blocks == 0 || blocks == l.numBlocks) &&
			binary.BigEndian.Uint32(d[12:16]) == l.blockSize
	}
	if len(d) != 8 {
		return false
	}
	blocks := uint64(binary.BigEndian.Uint32(d[0:4]) & 0xFFFFFF)
	return (blocks == 0 || blocks == min(l.numBlocks, 0xFFFFFF)) &&
		binary.BigEndian.Uint32(d[4:8])&0xFFFFFF == l.blockSize
}

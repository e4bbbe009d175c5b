// Package virtqtest is a driver-side mock of a split virtqueue for tests: it lays out rings and buffers in
// byte-slice guest memory (guestmem.FromBytes), builds descriptor chains (direct, indirect, mixed, or broken on
// purpose), makes them available, and reads back what the device put in the used ring.
//
// Memory layout: two GPA-adjacent regions with unrelated UVAs, so tests can place a buffer across the boundary.
//
//	region 0: GPA RingGPA .. Boundary      rings (desc, avail, used), then scratch space for buffers/tables
//	region 1: GPA Boundary .. +dataBytes   data buffers handed out by Alloc
//
// Rings are addressed by UVA in Config (as SET_VRING_ADDR does) and everything else by GPA.
package virtqtest

import (
	"encoding/binary"
	"fmt"

	"vhost-target/vhost/guestmem"
	"vhost-target/vhost/virtq"
)

// Descriptor flags, as the driver writes them.
const (
	FNext     = 1
	FWrite    = 2
	FIndirect = 4
)

// Fixed addresses of the mock's memory.
const (
	RingGPA  = 0x10_0000        // start of region 0
	ring0UVA = 0x7f00_0010_0000 // region 0's UVA
	data1UVA = 0x7e00_0000_0000 // region 1's UVA
)

// Desc is one descriptor as the driver writes it.
type Desc struct {
	Addr  uint64
	Len   uint32
	Flags uint16
	Next  uint16
}

// Driver is the mock driver. Its fields are exposed so tests can break things on purpose.
type Driver struct {
	Table                      *guestmem.Table
	Mem0, Mem1                 []byte // backing of region 0 and 1
	Size                       uint16
	DescGPA, AvailGPA, UsedGPA uint64
	Boundary                   uint64 // first GPA of region 1 (= end of region 0)
	Features                   struct{ EventIdx, Indirect bool }

	availIdx  uint16 // driver's avail->idx shadow
	nextDesc  uint16 // next free descriptor slot (a bump allocator: tests are short)
	scratch   uint64 // next free GPA in region 0's scratch area
	dataNext  uint64 // next free GPA in region 1
	usedSeen  uint16 // used entries consumed by PopUsed
	scratchHi uint64
}

// New builds a mock with a queue of size entries and dataBytes of buffer space in region 1. Region 0 holds
// the rings at their natural Linux layout (avail right after desc, used 4-aligned after avail) plus 64 KiB
// of scratch space.
func New(size uint16, dataBytes int) *Driver { return NewWith(size, make([]byte, dataBytes)) }

// NewWith is New with caller-provided backing for region 1 (for example a large sparse mapping).
func NewWith(size uint16, data []byte) *Driver {
	n := uint64(size)
	d := &Driver{Size: size}
	d.DescGPA = RingGPA
	d.AvailGPA = d.DescGPA + 16*n
	d.UsedGPA = (d.AvailGPA + 6 + 2*n + 3) &^ 3
	usedEnd := d.UsedGPA + 6 + 8*n
	d.scratch = (usedEnd + 4096 + 4095) &^ 4095 // leave room for the event words and a gap
	region0 := d.scratch - RingGPA + 64<<10
	d.Boundary = RingGPA + region0
	d.scratchHi = d.Boundary
	d.dataNext = d.Boundary
	d.Mem0 = make([]byte, region0)
	d.Mem1 = data
	t, err := guestmem.FromBytes([]guestmem.Region{
		{GPA: RingGPA, Size: region0, UVA: ring0UVA},
		{GPA: d.Boundary, Size: uint64(len(data)), UVA: data1UVA},
	}, [][]byte{d.Mem0, d.Mem1})
	if err != nil {
		panic(err)
	}
	d.Table = t
	return d
}

// UVA converts a region-0 GPA (rings) to its UVA.
func (d *Driver) UVA(gpa uint64) uint64 { return gpa - RingGPA + ring0UVA }

// Config is the virtq.Config a vhost-user front-end would send for this ring.
func (d *Driver) Config() virtq.Config {
	return virtq.Config{Size: uint32(d.Size), DescUVA: d.UVA(d.DescGPA), AvailUVA: d.UVA(d.AvailGPA),
		UsedUVA: d.UVA(d.UsedGPA), EventIdx: d.Features.EventIdx, Indirect: d.Features.Indirect}
}

// Bytes returns the host bytes of [gpa, gpa+n) in either region (panics if unmapped: test bug).
func (d *Driver) Bytes(gpa uint64, n int) []byte {
	b, err := d.Table.GPA(gpa, uint64(n))
	if err != nil {
		panic(err)
	}
	return b
}

// Alloc returns n bytes of data space in region 1 (16-aligned), filled with fill.
func (d *Driver) Alloc(n int, fill byte) uint64 {
	gpa := d.dataNext
	d.dataNext = (d.dataNext + uint64(n) + 15) &^ 15
	b := d.Bytes(gpa, n)
	for i := range b {
		b[i] = fill
	}
	return gpa
}

// Scratch returns n bytes of 16-aligned space in region 0 after the rings (for indirect tables or buffers
// that must end at the region boundary).
func (d *Driver) Scratch(n int) uint64 {
	gpa := d.scratch
	d.scratch = (d.scratch + uint64(n) + 15) &^ 15
	if d.scratch > d.scratchHi {
		panic("virtqtest: scratch space exhausted")
	}
	return gpa
}

// SetDesc writes descriptor i of the ring's table.
func (d *Driver) SetDesc(i uint16, x Desc) { putDesc(d.Bytes(d.DescGPA+16*uint64(i), 16), x) }

func putDesc(b []byte, x Desc) {
	binary.LittleEndian.PutUint64(b[0:], x.Addr)
	binary.LittleEndian.PutUint32(b[8:], x.Len)
	binary.LittleEndian.PutUint16(b[12:], x.Flags)
	binary.LittleEndian.PutUint16(b[14:], x.Next)
}

// WriteTable writes descs verbatim as a descriptor table at gpa (use Chain to link them).
func (d *Driver) WriteTable(gpa uint64, descs []Desc) {
	for i, x := range descs {
		putDesc(d.Bytes(gpa+16*uint64(i), 16), x)
	}
}

// Chain links descs in order (NEXT + next index), for use with AddChain or WriteTable: it sets FNext on all
// but the last and next to the following position, relative to base.
func Chain(base uint16, descs ...Desc) []Desc {
	out := append([]Desc(nil), descs...)
	for i := range out {
		if i+1 < len(out) {
			out[i].Flags |= FNext
			out[i].Next = base + uint16(i) + 1
		}
	}
	return out
}

// Add writes descs into consecutive ring descriptor slots as one chain, makes it available and returns its head.
func (d *Driver) Add(descs ...Desc) uint16 {
	head := d.Write(descs...)
	d.Expose(head)
	return head
}

// Write writes descs into consecutive free ring descriptor slots (wrapping around the table), linked as one
// chain, without making it available; it returns the head.
func (d *Driver) Write(descs ...Desc) uint16 {
	head := d.nextDesc % d.Size
	for i, x := range descs {
		slot := (head + uint16(i)) % d.Size
		if i+1 < len(descs) {
			x.Flags |= FNext
			x.Next = (slot + 1) % d.Size
		}
		d.SetDesc(slot, x)
	}
	d.nextDesc = (head + uint16(len(descs))) % d.Size
	return head
}

// AddIndirect makes a chain of the given direct descriptors followed by one indirect descriptor whose table
// (placed in scratch space) holds the indirect descriptors, linked in order.
func (d *Driver) AddIndirect(direct []Desc, indirect []Desc) uint16 {
	tgpa := d.Scratch(16 * len(indirect))
	d.WriteTable(tgpa, Chain(0, indirect...))
	all := append(append([]Desc(nil), direct...), Desc{Addr: tgpa, Len: uint32(16 * len(indirect)), Flags: FIndirect})
	return d.Add(all...)
}

// Expose writes head into the next avail ring slot and publishes avail->idx.
func (d *Driver) Expose(heads ...uint16) {
	for _, h := range heads {
		slot := uint64(d.availIdx % d.Size)
		binary.LittleEndian.PutUint16(d.Bytes(d.AvailGPA+4+2*slot, 2), h)
		d.availIdx++
	}
	d.SetAvailIdx(d.availIdx)
}

// SetAvailIdx stores avail->idx (to move it anywhere, including where a correct driver never would).
func (d *Driver) SetAvailIdx(v uint16) {
	d.availIdx = v
	binary.LittleEndian.PutUint16(d.Bytes(d.AvailGPA+2, 2), v)
}

// AvailIdx is the driver's avail->idx.
func (d *Driver) AvailIdx() uint16 { return d.availIdx }

// SetAvailFlags stores avail->flags (1 = VRING_AVAIL_F_NO_INTERRUPT).
func (d *Driver) SetAvailFlags(v uint16) { binary.LittleEndian.PutUint16(d.Bytes(d.AvailGPA, 2), v) }

// SetUsedEvent stores used_event (EVENT_IDX: "interrupt me when used->idx passes v").
func (d *Driver) SetUsedEvent(v uint16) {
	binary.LittleEndian.PutUint16(d.Bytes(d.AvailGPA+4+2*uint64(d.Size), 2), v)
}

// AvailEvent reads avail_event, written by the device with EVENT_IDX.
func (d *Driver) AvailEvent() uint16 {
	return binary.LittleEndian.Uint16(d.Bytes(d.UsedGPA+4+8*uint64(d.Size), 2))
}

// UsedFlags reads used->flags (1 = VRING_USED_F_NO_NOTIFY).
func (d *Driver) UsedFlags() uint16 { return binary.LittleEndian.Uint16(d.Bytes(d.UsedGPA, 2)) }

// UsedIdx reads used->idx.
func (d *Driver) UsedIdx() uint16 { return binary.LittleEndian.Uint16(d.Bytes(d.UsedGPA+2, 2)) }

// SetUsedIdx stores used->idx, as a ring left by a previous back-end would have it.
func (d *Driver) SetUsedIdx(v uint16) {
	binary.LittleEndian.PutUint16(d.Bytes(d.UsedGPA+2, 2), v)
	d.usedSeen = v
}

// Used is one used ring element.
type Used struct {
	ID, Len uint32
}

// PopUsed returns the used elements published since the last call.
func (d *Driver) PopUsed() []Used {
	var out []Used
	for idx := d.UsedIdx(); d.usedSeen != idx; d.usedSeen++ {
		off := d.UsedGPA + 4 + 8*uint64(d.usedSeen%d.Size)
		b := d.Bytes(off, 8)
		out = append(out, Used{binary.LittleEndian.Uint32(b), binary.LittleEndian.Uint32(b[4:])})
	}
	return out
}

func (u Used) String() string { return fmt.Sprintf("{id %d len %d}", u.ID, u.Len) }

package blk

// Feature bits of virtio-blk (virtio 1.2 §5.2.3).
const (
	FSizeMax     = 1
	FSegMax      = 2
	FGeometry    = 4
	FRO          = 5
	FBlkSize     = 6
	FFlush       = 9
	FTopology    = 10
	FConfigWCE   = 11
	FMQ          = 12
	FDiscard     = 13
	FWriteZeroes = 14
)

// ConfigSize is the length of the config space this device describes:
// struct virtio_blk_config up to write_zeroes_may_unmap and its padding
// (secure erase and zoned fields are not offered).
const ConfigSize = 60

// Features returns the virtio-blk features the disk offers: segment count,
// block size and topology, flush and the writeback switch, several queues,
// read-only when it is, else discard and write zeroes when the bdev has
// them.
func (d *Disk) Features() uint64 {
	f := uint64(1)<<FSegMax | 1<<FBlkSize | 1<<FTopology | 1<<FFlush | 1<<FConfigWCE | 1<<FMQ
	switch {
	case d.readOnly:
		f |= 1 << FRO // and neither discard nor write zeroes
	default:
		if d.limits.MaxDiscardSeg != 0 {
			f |= 1 << FDiscard
		}
		if d.limits.MaxWriteZeroesSeg != 0 {
			f |= 1 << FWriteZeroes
		}
	}
	return f
}

// Config writes the config space (little-endian, virtio 1.x) into b, which
// holds at least ConfigSize bytes: capacity in 512-byte sectors, seg_max,
// blk_size, topology (one logical block per physical block, optimal I/O
// size from the bdev), writeback (1 when the bdev has a volatile cache and
// the driver has not switched it off), num_queues and the discard and
// write-zeroes limits. It returns ConfigSize.
func (d *Disk) Config(b []byte, numQueues uint16, segMax uint32, writeback bool) int {
	b = b[:ConfigSize]
	clear(b)
	info := d.info
	le.PutUint64(b[0:], info.NumBlocks*uint64(info.BlockSize)/SectorSize)
	le.PutUint32(b[12:], segMax)
	le.PutUint32(b[20:], info.BlockSize)
	b[24] = 0                                  // physical_block_exp: one logical block per physical one
	le.PutUint16(b[26:], 1)                    // min_io_size, in blocks
	le.PutUint32(b[28:], info.OptimalIOBlocks) // opt_io_size, in blocks (0: none)
	if writeback && info.WriteCache {
		b[32] = 1
	}
	le.PutUint16(b[34:], numQueues)
	l := d.limits
	le.PutUint32(b[36:], l.MaxDiscardSectors)
	le.PutUint32(b[40:], l.MaxDiscardSeg)
	le.PutUint32(b[44:], l.DiscardSectorAlignment)
	le.PutUint32(b[48:], l.MaxWriteZeroesSectors)
	le.PutUint32(b[52:], l.MaxWriteZeroesSeg)
	if l.MaxWriteZeroesSeg != 0 && info.Unmap && info.UnmapZeroes {
		b[56] = 1 // write_zeroes_may_unmap
	}
	return ConfigSize
}

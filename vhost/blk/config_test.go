package blk

import (
	"encoding/binary"
	"testing"

	"vhost-target/bdev"
)

// TestConfig checks each field of the config space at its offset in struct
// virtio_blk_config (Linux include/uapi/linux/virtio_blk.h).
func TestConfig(t *testing.T) {
	d := disk(4096, 256, func(i *bdev.Info) { i.WriteCache, i.UnmapZeroes, i.OptimalIOBlocks = true, true, 32 })
	b := make([]byte, 64)
	for i := range b {
		b[i] = 0xee // Config clears what it owns
	}
	if n := d.Config(b, 4, 126, true); n != ConfigSize {
		t.Fatalf("Config = %d", n)
	}
	le := binary.LittleEndian
	for _, f := range []struct {
		name      string
		off, size int
		want      uint64
	}{
		{"capacity", 0, 8, 256 * 8}, {"size_max", 8, 4, 0}, {"seg_max", 12, 4, 126}, {"geometry", 16, 4, 0},
		{"blk_size", 20, 4, 4096}, {"physical_block_exp", 24, 1, 0}, {"alignment_offset", 25, 1, 0},
		{"min_io_size", 26, 2, 1}, {"opt_io_size", 28, 4, 32}, {"writeback", 32, 1, 1}, {"unused0", 33, 1, 0},
		{"num_queues", 34, 2, 4}, {"max_discard_sectors", 36, 4, 1 << 22}, {"max_discard_seg", 40, 4, bdev.MaxRanges},
		{"discard_sector_alignment", 44, 4, 8}, {"max_write_zeroes_sectors", 48, 4, 1 << 22},
		{"max_write_zeroes_seg", 52, 4, 1}, {"write_zeroes_may_unmap", 56, 1, 1}, {"unused1", 57, 3, 0},
	} {
		var got uint64
		switch f.size {
		case 1:
			got = uint64(b[f.off])
		case 2:
			got = uint64(le.Uint16(b[f.off:]))
		case 3:
			got = uint64(b[f.off]) | uint64(b[f.off+1])<<8 | uint64(b[f.off+2])<<16
		case 4:
			got = uint64(le.Uint32(b[f.off:]))
		case 8:
			got = le.Uint64(b[f.off:])
		}
		if got != f.want {
			t.Errorf("%s at %d: %d, want %d", f.name, f.off, got, f.want)
		}
	}
	if b[60] != 0xee {
		t.Error("Config wrote past ConfigSize")
	}
	// The driver switched the cache off, or the bdev has none: writeback 0.
	if d.Config(b, 4, 126, false); b[32] != 0 {
		t.Error("writeback with the cache switched off")
	}
}

// TestFeatures: read-only, discard and write zeroes follow the disk.
func TestFeatures(t *testing.T) {
	base := uint64(1)<<FSegMax | 1<<FBlkSize | 1<<FTopology | 1<<FFlush | 1<<FConfigWCE | 1<<FMQ
	for _, tc := range []struct {
		name string
		d    *Disk
		want uint64
	}{
		{"all", disk(512, 8, nil), base | 1<<FDiscard | 1<<FWriteZeroes},
		{"plain", disk(512, 8, func(i *bdev.Info) { i.Unmap, i.WriteZeroes = false, false }), base},
		{"read-only", NewDisk(disk(512, 8, nil).Info(), true), base | 1<<FRO},
	} {
		if got := tc.d.Features(); got != tc.want {
			t.Errorf("%s: features %#x, want %#x", tc.name, got, tc.want)
		}
	}
}

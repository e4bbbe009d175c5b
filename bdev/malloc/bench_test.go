package malloc

import (
	"io"
	"log/slog"
	"testing"

	"vhost-target/bdev"
)

type nopDone struct{}

func (nopDone) IODone(*bdev.IO) {}

// benchCopy submits 4 KiB IOs at pseudo-random offsets of a 1 GiB disk
// (written in full when it was populated) into 32 rotating buffers, as a
// QD32 random workload does: the cost of the data copy alone, which a
// target's whole I/O path cannot go below. The disk is far larger than the
// caches, so every read comes from DRAM.
func benchCopy(b *testing.B, op bdev.Op) {
	d, err := Create(Config{Name: "b", Size: 1 << 30, BlockSize: 512, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	ch, _ := d.Open()
	bufs := make([]byte, 32*4096)
	var iov [1][]byte
	req := bdev.IO{Op: op, Len: 4096, Done: nopDone{}}
	blocks := uint64(1<<30) / 4096
	var lba uint64
	b.SetBytes(4096)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		lba = (lba + 7919) % blocks
		iov[0] = bufs[(i%32)*4096 : (i%32+1)*4096]
		req.Iov, req.Offset = iov[:], lba*4096
		ch.Submit(&req)
		if req.Err != nil {
			b.Fatal(req.Err)
		}
	}
}

func BenchmarkCopyRead4K(b *testing.B)  { benchCopy(b, bdev.OpRead) }
func BenchmarkCopyWrite4K(b *testing.B) { benchCopy(b, bdev.OpWrite) }

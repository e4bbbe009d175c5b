// Tests for the file bdev: the shared kernel-bdev suite (random I/O against
// a model, bad files, read-only, ranges, truncation, holes, no allocations),
// worker counts, flush durability across a SIGKILL, and benchmarks.
package file

import (
	"testing"

	"vhost-target/bdev"
	"vhost-target/bdev/kio"
	"vhost-target/bdev/kio/kiotest"
)

func factory(workers int) kiotest.Factory {
	return func(o kio.Options, qd int) (bdev.Bdev, error) {
		return New(Config{Name: o.Name, Path: o.Path, Size: o.Size, BlockSize: o.BlockSize, Create: o.Create,
			ReadOnly: o.ReadOnly, Workers: workers, QueueDepth: qd, UUID: [16]byte{1}})
	}
}

func TestSuite(t *testing.T) {
	kiotest.Suite(t, factory(2))
}

// TestCapacity runs the Resize/Rescan suite (bdev_resize, bdev_aio_rescan).
func TestCapacity(t *testing.T) {
	kiotest.CapacitySuite(t, factory(2))
}

func TestOneWorker(t *testing.T) {
	d, _ := kiotest.New(t, factory(1), 16<<20, 512, 32)
	kiotest.RandomIO(t, d, kiotest.RandomOptions{Goroutines: 3, Ops: 300, Depth: 8, MaxLen: 64 << 10, Seed: 7, Unaligned: 0.5})
}

func TestFlushDurability(t *testing.T) {
	kiotest.Durability(t, "TestFlushDurability", func(path string) (bdev.Bdev, error) {
		return New(Config{Name: "durable", Path: path, BlockSize: 512, UUID: [16]byte{1}})
	})
}

func TestInfo(t *testing.T) {
	d, _ := kiotest.New(t, factory(2), 1<<20, 4096, 8)
	i := d.Info()
	if i.Type != "file" || i.Name != "d0" || i.BlockSize != 4096 || i.NumBlocks != 256 || i.UUID != [16]byte{1} {
		t.Errorf("info = %+v", i)
	}
}

func BenchmarkFileRead4K(b *testing.B)  { kiotest.Bench(b, factory(4), false, 4096, 32, 256<<20) }
func BenchmarkFileWrite4K(b *testing.B) { kiotest.Bench(b, factory(4), true, 4096, 32, 256<<20) }

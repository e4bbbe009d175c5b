// Tests for bench -blk. Goal: the load generator drives a vhost-user-blk
// controller with the same workloads as a SCSI one: the capacity and block
// size come from the config space, reads are preconditioned, verify finds
// no errors, and the I/O path allocates nothing per request. Method: an
// in-process target with blk controllers over malloc disks of 4096- and
// 512-byte blocks; short runs, then the disks' memory is inspected.
package main

import (
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"vhost-target/bdev/malloc"
	"vhost-target/config"
)

func startBlkBenchTarget(t *testing.T) (string, *target) {
	t.Helper()
	dir := shortTempDir(t, "vt-bblk-")
	text := fmt.Sprintf(`socket_dir = %q
[metrics]
listen = ""
[reactors]
poll = "adaptive"
[[bdev]]
name = "b4k"
type = "malloc"
size = "8MiB"
block_size = 4096
[[bdev]]
name = "b512"
type = "malloc"
size = "4MiB"
[[controller]]
name = "blk4k"
type = "blk"
bdev = "b4k"
num_queues = 2
[[controller]]
name = "blk512"
type = "blk"
bdev = "b512"
`, dir)
	cfg, err := config.Parse([]byte(text), t.Name())
	if err != nil {
		t.Fatal(err)
	}
	tg, err := start(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tg.stop)
	return dir, tg
}

func TestBenchBlk(t *testing.T) {
	dir, tg := startBlkBenchTarget(t)
	progress, err := os.Create(filepath.Join(dir, "progress"))
	if err != nil {
		t.Fatal(err)
	}
	defer progress.Close()

	o := benchOpts{socket: filepath.Join(dir, "blk4k"), blk: true, rw: "randread", bs: 8192, qd: 4, queues: 2,
		dur: 200 * time.Millisecond, queueSize: 64, precondition: true}
	res, err := runBench(o, progress)
	if err != nil || res.Errors != 0 || res.IOs == 0 {
		t.Fatalf("bench -blk randread: %v, %+v", err, res)
	}
	if res.BlockSize != 4096 || res.NumBlocks != 2048 {
		t.Errorf("capacity %d blocks of %d bytes, want 2048 of 4096", res.NumBlocks, res.BlockSize)
	}
	out, _ := os.ReadFile(progress.Name())
	if !strings.Contains(string(out), "preconditioned LBA 0..2047 (8 MiB) with 1024 KiB writes on 2 queue(s) in ") {
		t.Errorf("no precondition line in the bench's output:\n%s", out)
	}
	disk := tg.bdev("b4k").(*malloc.Disk).Bytes()
	for lba := range uint64(len(disk) / 4096) {
		blk := disk[lba*4096:]
		if binary.LittleEndian.Uint64(blk) != lba || binary.LittleEndian.Uint32(blk[12:]) != verifyMagic {
			t.Fatalf("block %d was not preconditioned: % x", lba, blk[:16])
		}
	}

	for _, c := range []struct {
		sock, rw string
		bs       int
	}{
		{"blk4k", "verify", 4096},
		{"blk4k", "randwrite", 16384},
		{"blk512", "verify", 4096}, // 8 logical blocks an I/O, sector = LBA
		{"blk512", "randrw", 512},
	} {
		o := benchOpts{socket: filepath.Join(dir, c.sock), blk: true, rw: c.rw, bs: c.bs, qd: 8, queues: 1,
			dur: 300 * time.Millisecond, queueSize: 64, precondition: true, mix: 50}
		res, err := runBench(o, nil)
		if err != nil || res.Errors != 0 || res.VerifyErrors != 0 || res.IOs == 0 {
			t.Errorf("bench -blk %s -rw %s -bs %d: %v, %+v", c.sock, c.rw, c.bs, err, res)
		}
	}
	if res, err := runBench(benchOpts{socket: filepath.Join(dir, "blk512"), blk: true, rw: "randread", bs: 256, qd: 1,
		queues: 1, dur: time.Millisecond, queueSize: 64}, nil); err == nil || !strings.Contains(err.Error(), "multiple") {
		t.Errorf("bs 256 on a 512-byte disk: %v %+v", err, res)
	}
}

// TestBenchBlkNoAllocs: a bench worker's submit-and-reap loop on a blk
// controller allocates nothing per I/O (the front-end's slots, the
// worker's bookkeeping and the target's blk path together).
func TestBenchBlkNoAllocs(t *testing.T) {
	dir, _ := startBlkBenchTarget(t)
	for _, rw := range []string{"randread", "verify"} {
		o := benchOpts{socket: filepath.Join(dir, "blk512"), blk: true, rw: rw, bs: 4096, qd: 4, queues: 1,
			dur: 50 * time.Millisecond, queueSize: 64, precondition: false}
		// Warm up (slot pool, histogram, the target's channels), then count
		// the process's allocations over a fixed number of I/Os.
		if _, err := runBench(o, nil); err != nil {
			t.Fatal(err)
		}
		// The count needs a few hundred I/Os; a loaded machine running a
		// -race build gets fewer, so a short run is repeated longer.
		var (
			res *benchResult
			n   uint64
			err error
		)
		for o.dur = 500 * time.Millisecond; ; o.dur *= 2 {
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			res, err = runBench(o, nil)
			runtime.ReadMemStats(&after)
			if err != nil || res.Errors != 0 || res.VerifyErrors != 0 {
				t.Fatalf("%s: %v %+v", rw, err, res)
			}
			n = after.Mallocs - before.Mallocs
			t.Logf("%s: %d I/Os in %v, %d allocations in the run", rw, res.IOs, o.dur, n)
			if res.IOs >= 500 {
				break
			}
			if o.dur >= 8*time.Second {
				t.Fatalf("%s: only %d I/Os in %v: too few to tell", rw, res.IOs, o.dur)
			}
		}
		// A run has fixed costs (dial, workers, histograms, timers): about
		// 200 allocations whatever its length or the machine's load. One per
		// I/O would be res.IOs more; one per reactor sleep (a scratch buffer
		// escaping in -race builds, CI's failure on a loaded machine) about
		// one per I/O too. The bound allows the fixed cost twice over and a
		// tenth of an allocation per I/O.
		if limit := 400 + res.IOs/10; n > limit {
			t.Errorf("%s: %d allocations for %d I/Os", rw, n, res.IOs)
		}
	}
}

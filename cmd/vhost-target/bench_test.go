// Tests for the bench's preconditioning. Goal: a read workload reads data
// that was written (every block it can pick carries the bench's pattern
// before the timed run, and the bench says so), and -precondition=false
// writes nothing. Method: an in-process target with two malloc disks on two
// controllers; run short randread benches, then inspect the disks' memory.
package main

import (
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"vhost-target/bdev/malloc"
	"vhost-target/config"
)

func TestBenchPrecondition(t *testing.T) {
	dir := shortTempDir(t, "vt-bench-")
	text := fmt.Sprintf(`socket_dir = %q
[metrics]
listen = ""
[reactors]
poll = "adaptive"
[[bdev]]
name = "pre"
type = "malloc"
size = "8MiB"
block_size = 4096
[[bdev]]
name = "raw"
type = "malloc"
size = "8MiB"
[[controller]]
name = "c0"
num_queues = 2
[[controller.lun]]
target = 0
bdev = "pre"
[[controller]]
name = "c1"
[[controller.lun]]
target = 0
bdev = "raw"
`, dir)
	cfg, err := config.Parse([]byte(text), t.Name())
	if err != nil {
		t.Fatal(err)
	}
	tg, err := start(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer tg.stop()
	progress, err := os.Create(filepath.Join(dir, "progress"))
	if err != nil {
		t.Fatal(err)
	}
	defer progress.Close()

	o := benchOpts{socket: filepath.Join(dir, "c0"), rw: "randread", bs: 8192, qd: 4, queues: 2,
		dur: 200 * time.Millisecond, queueSize: 64, precondition: true}
	res, err := runBench(o, progress)
	if err != nil || res.Errors != 0 {
		t.Fatalf("bench: %v, %+v", err, res)
	}
	out, _ := os.ReadFile(progress.Name())
	if !strings.Contains(string(out), "preconditioned LBA 0..2047 (8 MiB) with 1024 KiB writes on 2 queue(s) in ") {
		t.Errorf("no precondition line in the bench's output:\n%s", out)
	}
	pre := tg.bdev("pre").(*malloc.Disk).Bytes()
	for lba := range uint64(len(pre) / 4096) {
		blk := pre[lba*4096:]
		if binary.LittleEndian.Uint64(blk) != lba || binary.LittleEndian.Uint32(blk[12:]) != verifyMagic {
			t.Fatalf("block %d was not preconditioned: % x", lba, blk[:16])
		}
	}

	o.socket, o.queues, o.precondition = filepath.Join(dir, "c1"), 1, false
	progress.Truncate(0)
	if res, err = runBench(o, progress); err != nil || res.Errors != 0 {
		t.Fatalf("bench -precondition=false: %v, %+v", err, res)
	}
	if out, _ = os.ReadFile(progress.Name()); strings.Contains(string(out), "precondition") {
		t.Errorf("-precondition=false preconditioned:\n%s", out)
	}
	raw := tg.bdev("raw").(*malloc.Disk).Bytes()
	if i := slices.IndexFunc(raw, func(b byte) bool { return b != 0 }); i >= 0 {
		t.Errorf("-precondition=false wrote byte %d", i)
	}
}

// TestBenchInterrupts: with -interrupts the bench sleeps on the call
// eventfd between completions; a verify run completes with no errors, and
// the waits were ended by the target's signal, not by their 10 ms timeout
// (which would let the bench finish with no signal at all).
func TestBenchInterrupts(t *testing.T) {
	dir := shortTempDir(t, "vt-bench-")
	cfg, err := config.Parse([]byte(fmt.Sprintf(`socket_dir = %q
[metrics]
listen = ""
[reactors]
poll = "adaptive"
[[bdev]]
name = "m"
type = "malloc"
size = "8MiB"
[[controller]]
name = "c0"
num_queues = 2
[[controller.lun]]
target = 0
bdev = "m"
`, dir)), t.Name())
	if err != nil {
		t.Fatal(err)
	}
	tg, err := start(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer tg.stop()
	for _, rw := range []string{"verify", "randread"} {
		res, err := runBench(benchOpts{socket: filepath.Join(dir, "c0"), rw: rw, bs: 4096, qd: 8, queues: 2,
			dur: 300 * time.Millisecond, queueSize: 64, interrupts: true}, nil)
		if err != nil || res.Errors != 0 || res.VerifyErrors != 0 || res.IOs == 0 {
			t.Fatalf("bench -interrupts -rw %s: %v, %+v", rw, err, res)
		}
		if res.Wakeups == 0 || res.WaitTimeouts*2 > res.Wakeups+res.WaitTimeouts {
			t.Errorf("bench -interrupts -rw %s: %d waits ended by the target's signal, %d timed out", rw, res.Wakeups, res.WaitTimeouts)
		}
	}
}

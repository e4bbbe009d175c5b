package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"vhost-target/cmd/vhost-target/guest"
	"vhost-target/vhost"
)

// backingDir is a directory on a real filesystem (O_DIRECT fails on tmpfs).
func backingDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("/var/tmp", "vt-e2e-bdev-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// TestGuestFileAndAIO (issue 5): a real guest runs fio write-then-verify on a
// file LUN (O_DIRECT, worker threads) and on aio LUNs with each engine, then
// SYNCHRONIZE CACHE and a discard; the target stays in adaptive mode so it
// sleeps with kernel I/O in flight.
func TestGuestFileAndAIO(t *testing.T) {
	img := guestImage(t)
	dir := backingDir(t)
	tg := startTarget(t, fmt.Sprintf(targetPrelude+`
[[bdev]]
name = "f"
type = "file"
path = "%[1]s/file.img"
create = true
size = "64MiB"
block_size = 512
[[bdev]]
name = "u"
type = "aio"
engine = "auto"
path = "%[1]s/aio.img"
create = true
size = "64MiB"
block_size = 4096
[[bdev]]
name = "l"
type = "aio"
engine = "libaio"
path = "%[1]s/libaio.img"
create = true
size = "64MiB"
block_size = 512
[[controller]]
name = "c0"
num_queues = 1
[[controller.lun]]
target = 0
lun = 0
bdev = "f"
[[controller.lun]]
target = 1
lun = 0
bdev = "u"
[[controller.lun]]
target = 2
lun = 0
bdev = "l"
`, dir))
	runGuest(t, img, guest.Options{
		Controllers: []guest.Controller{{Socket: tg.sock("c0"), NumQueues: 1}},
		Script: `set -e
for d in /dev/sda /dev/sdb /dev/sdc; do
  fio --name=a --filename=$d --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=32 --size=8m --verify=crc32c --do_verify=1 --output-format=terse >/dev/null
  fio --name=b --filename=$d --ioengine=io_uring --direct=1 --rw=write --bsrange=4k-1m --iodepth=8 --offset=16m --size=16m --verify=crc32c --do_verify=1 --output-format=terse >/dev/null
  sg_sync $d
  blkdiscard -o 33554432 -l 1048576 $d
done
cat /sys/block/sda/queue/write_cache
echo bdev-ok
`,
	})
	for _, l := range tg.ctrl("c0").Stats.Snapshot().LUNs {
		if l.Writes == 0 || l.Reads == 0 || l.Flushes == 0 || l.Unmaps == 0 {
			t.Errorf("LUN %s: writes %d reads %d flushes %d unmaps %d", l.Bdev, l.Writes, l.Reads, l.Flushes, l.Unmaps)
		}
		if n := l.ErrorTotal(); n != 0 {
			t.Errorf("LUN %s: %d errors (by kind %v)", l.Bdev, n, l.Errors)
		}
	}
}

// TestGuestInjectedErrors (issue 6): an error bdev fails reads of a range with
// EIO and delays writes; the guest gets an I/O error (MEDIUM ERROR) for the
// bad range and does not hang, the rest of the disk works, and the target's
// error counter moved.
func TestGuestInjectedErrors(t *testing.T) {
	img := guestImage(t)
	tg := startTarget(t, targetPrelude+`
[[bdev]]
name = "m"
type = "malloc"
size = "16MiB"
[[bdev]]
name = "e"
type = "error"
base = "m"
[[bdev.inject]]
op = "read"
lba_start = 2048
lba_count = 8
error = "eio"
[[bdev.inject]]
op = "write"
delay = "20ms"
[[controller]]
name = "c0"
num_queues = 1
[[controller.lun]]
target = 0
lun = 0
bdev = "e"
`)
	res := runGuest(t, img, guest.Options{
		Controllers: []guest.Controller{{Socket: tg.sock("c0"), NumQueues: 1}},
		Script: `set -e
dd if=/dev/zero of=/dev/sda bs=4096 count=16 oflag=direct 2>/dev/null
dd if=/dev/sda of=/dev/null bs=4096 count=16 iflag=direct 2>/dev/null
if dd if=/dev/sda of=/dev/null bs=512 skip=2048 count=8 iflag=direct 2>/tmp/err; then
  echo "read of the injected range succeeded"; exit 1
fi
echo "@@@ readerr"; cat /tmp/err
dd if=/dev/sda of=/dev/null bs=512 skip=4096 count=8 iflag=direct 2>/dev/null
echo "@@@ dmesg"; dmesg | grep -i -E 'sense|medium|error' | sed 's/^\[[^]]*\] //' | head -5
echo "@@@ end"
echo inject-ok
`,
	})
	secs := sections(res.Console)
	wantMatch(t, "dd error", section(t, secs, "readerr"), `(?i)no data available|input/output error` /* MEDIUM ERROR is BLK_STS_MEDIUM: ENODATA */)
	wantMatch(t, "kernel log", section(t, secs, "dmesg"), `(?i)medium error|unrecovered read error`)
	var medium uint64
	for _, l := range tg.ctrl("c0").Stats.Snapshot().LUNs {
		medium += l.Errors[vhost.ErrMedium]
	}
	if medium == 0 {
		t.Fatal("the target counted no medium errors")
	}
}

// TestGuestFlushErrorNotRetried: a flush that fails on the bdev fails the
// guest's fsync, once. Linux retries a SYNCHRONIZE CACHE answered with
// MEDIUM ERROR / WRITE ERROR (up to five times), and a retry that succeeds
// would turn a lost write into a successful fsync; the target answers a
// failed flush with HARDWARE ERROR, which Linux does not retry.
func TestGuestFlushErrorNotRetried(t *testing.T) {
	img := guestImage(t)
	tg := startTarget(t, errorOverFile(t, `
[[bdev.inject]]
op = "flush"
error = "eio"
`))
	// Counted when the guest says so: at power-off sd_shutdown sends more
	// SYNCHRONIZE CACHEs (and sd_sync_cache tries each three times).
	p := newPhases("counted")
	done := make(chan struct{})
	var res *guest.Result
	var err error
	go func() {
		defer close(done)
		res, err = guest.Run(context.Background(), guest.Options{Image: img,
			Controllers: []guest.Controller{{Socket: tg.sock("c0"), NumQueues: 1}},
			Script: shPrelude + `
sec cache
cat /sys/block/sda/queue/write_cache
sec fsync
if dd if=/dev/zero of=/dev/sda bs=4k count=1 oflag=direct conv=fsync 2>/tmp/err; then echo fsync-succeeded; else echo fsync-failed; fi
echo "phase counted"
sleep 1
`, Console: p, Timeout: 4 * time.Minute})
	}()
	p.wait(t, "counted", done, &res, &err)
	var flushes, errs uint64
	for _, l := range tg.ctrl("c0").Stats.Snapshot().LUNs {
		flushes += l.Flushes
		errs += l.ErrorTotal()
	}
	<-done
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("guest: %v\n%s", err, consoleOf(res))
	}
	secs := sections(res.Console)
	wantMatch(t, "cache", section(t, secs, "cache"), `^write back$`)
	wantMatch(t, "fsync", section(t, secs, "fsync"), `^fsync-failed$`)
	if flushes != 1 || errs != 1 {
		t.Errorf("one fsync: the target saw %d flushes and %d errors, want 1 and 1 (no retry)", flushes, errs)
	}
}

// TestGuestResetWaitsForHeldRead: a real guest's LUN RESET (sg_reset -d,
// a TMF on the control queue) is answered only once the read the guest had
// in flight has completed, as the virtio spec requires of a TMF (the
// affected requests complete first); Linux waits for the answer however
// long it takes and the read's data is right.
//
// The read of block 1000 is held 20 s (an error bdev entry with count 1) and
// the reset sent 2 s into it. The old answer after at most 10 s came with the
// read still held: the reset returned at about 10 s, the read 8 s later.
// (Linux's virtio_scsi does not abort a command that times out, it restarts
// its timer, seen here with a 3 s timeout and no TMF in 20 s; resets, and
// other initiators' aborts, are what send TMFs.)
func TestGuestResetWaitsForHeldRead(t *testing.T) {
	img := guestImage(t)
	tg := startTarget(t, errorOverFile(t, `
[[bdev.inject]]
op = "read"
lba_start = 8000
lba_count = 8
delay = "20s"
count = 1
`))
	res, err := guest.Run(context.Background(), guest.Options{Image: img,
		Controllers: []guest.Controller{{Socket: tg.sock("c0"), NumQueues: 1}},
		Script: shPrelude + `
dd if=/dev/urandom of=/tmp/A bs=4k count=1 2>/dev/null
dd if=/tmp/A of=/dev/sda bs=4k seek=1000 count=1 oflag=direct conv=notrunc 2>/dev/null
( dd if=/dev/sda of=/tmp/R bs=4k skip=1000 count=1 iflag=direct 2>/dev/null && touch /tmp/read-done ) &
sleep 2
sec reset
t0=$(date +%s)
sg_reset -d /dev/sda && echo reset-ok || echo reset-failed
t1=$(date +%s)
[ -e /tmp/read-done ] && echo read-completed-first || echo read-still-held
wait
cmp -s /tmp/R /tmp/A && echo read-ok || echo read-wrong
sec took
echo $((t1 - t0))
sec after
dd if=/dev/sda of=/tmp/R2 bs=4k skip=1000 count=1 iflag=direct 2>/dev/null
cmp -s /tmp/R2 /tmp/A && echo reread-ok || echo reread-wrong
`, Timeout: 5 * time.Minute})
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("guest: %v\n%s", err, consoleOf(res))
	}
	secs := sections(res.Console)
	wantMatch(t, "reset", section(t, secs, "reset"), `^reset-ok\nread-completed-first\nread-ok$`)
	wantMatch(t, "after", section(t, secs, "after"), `^reread-ok$`)
	took, _ := strconv.Atoi(strings.TrimSpace(section(t, secs, "took")))
	st := tg.ctrl("c0").Stats.Snapshot()
	if st.TMFs != 1 {
		t.Errorf("TMFs counted %d, want the one reset", st.TMFs)
	}
	t.Logf("sg_reset took %d s (the read was held 20 s from 2 s before it); target: %q", took,
		grepLines(tg.logs.String(), "task management"))
}

// grepLines returns the lines of s that contain sub.
func grepLines(s, sub string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return out
}

// errorOverFile is the config of the flush and reset tests: an error bdev
// "e" with the given [[bdev.inject]] entries over a 16 MiB file bdev, one
// LUN on controller c0.
func errorOverFile(t *testing.T, inject string) string {
	return targetPrelude + `
[[bdev]]
name = "m"
type = "file"
path = "` + backingDir(t) + `/f.img"
create = true
size = "16MiB"
[[bdev]]
name = "e"
type = "error"
base = "m"
` + inject + `
[[controller]]
name = "c0"
num_queues = 1
[[controller.lun]]
target = 0
lun = 0
bdev = "e"
`
}

//go:build rbd

package main

// The rbd bdev under real guests (issue 14), on a one-host Ceph cluster the
// test starts: verified I/O on scsi and blk disks, SYNCHRONIZE CACHE then
// SIGKILL of the target checked through `rbd export`, and the OSD stopped
// under a guest's I/O.

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"vhost-target/bdev/rbd/cephtest"
	"vhost-target/cmd/vhost-target/guest"
)

// rbdBdev is a [[bdev]] of type rbd on cluster c.
func rbdBdev(c *cephtest.Cluster, name, image string, blockSize int, extra string) string {
	return fmt.Sprintf(`[[bdev]]
name = %q
type = "rbd"
pool = %q
image = %q
conf = %q
keyring = %q
user = %q
block_size = %d
%s`, name, c.Pool, image, c.Conf, c.Keyring, c.User, blockSize, extra)
}

// TestGuestRBD starts one cluster for its subtests.
func TestGuestRBD(t *testing.T) {
	img := guestImage(t)
	c := cephtest.Start(t)
	t.Logf("ceph cluster up in %v", c.Started.Round(time.Millisecond))
	t.Run("IO", func(t *testing.T) { testGuestRBDIO(t, img, c) })
	t.Run("FlushKill", func(t *testing.T) { testGuestRBDFlushKill(t, img, c) })
	t.Run("OSDDown", func(t *testing.T) { testGuestRBDOSDDown(t, img, c) })
	t.Run("Migration", func(t *testing.T) { testGuestRBDMigration(t, c) })
}

// testGuestRBDMigration: issue 12's live migration (QEMU 10, target A → B →
// A, fio verify and page-cache chunks) with the disk an rbd image both
// target processes open: the shared storage a VM host moves VMs over.
// librbd's exclusive lock passes between the two clients as each writes.
func testGuestRBDMigration(t *testing.T, c *cephtest.Cluster) {
	q := qemu10(t)
	checkMigration(t, runMigration(t, migrationTest{bin: buildTagged(t, "rbd"), q: q, twoTargets: true, runtime: 45,
		bdev: func(t *testing.T, file string) string {
			c.RBD(t, "import", "--no-progress", file, c.Pool+"/mig")
			return rbdBdev(c, "f0", "mig", 512, "")
		}}))
}

// pattern is n random bytes, a guest file to write and compare.
func pattern(t *testing.T, n int) []byte {
	p := make([]byte, n)
	if _, err := rand.Read(p); err != nil {
		t.Fatal(err)
	}
	return p
}

// testGuestRBDIO: a scsi LUN (512-byte blocks, two queues) and a blk disk
// (4096) on rbd images: sizes, fio verify, SYNCHRONIZE CACHE, discard and
// write zeroes reading back zeroes, a grow seen by the guest, and data the
// guest flushed read back by another Ceph client.
func testGuestRBDIO(t *testing.T, img *guest.Image, c *cephtest.Cluster) {
	c.CreateImage(t, "io512", 128<<20)
	c.CreateImage(t, "io4k", 64<<20)
	tg := startTarget(t, targetPrelude+`
`+rbdBdev(c, "r512", "io512", 512, "")+rbdBdev(c, "r4k", "io4k", 4096, "")+`
[[controller]]
name = "s0"
num_queues = 2
[[controller.lun]]
target = 0
lun = 0
bdev = "r512"
[[controller]]
name = "b0"
type = "blk"
num_queues = 1
bdev = "r4k"
`)
	pat := pattern(t, 4<<20)
	script := shPrelude + `
sec disks
for d in sda vda; do echo "$d $(blockdev --getsize64 /dev/$d) $(cat /sys/block/$d/queue/logical_block_size)"; done
sec cache
cat /sys/block/sda/queue/write_cache /sys/block/vda/cache_type
sec fio
fio --name=sda --filename=/dev/sda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size=16m --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse --terse-version=3 | cut -d';' -f1-5
fio --name=sdabig --filename=/dev/sda --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=512-256k --iodepth=8 --offset=32m --size=16m --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse --terse-version=3 | cut -d';' -f1-5
fio --name=vda --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size=16m --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse --terse-version=3 | cut -d';' -f1-5
sec discard
dd if=/data/p of=/dev/sda bs=1M seek=64 oflag=direct 2>/dev/null
dd if=/data/p of=/dev/vda bs=1M seek=32 oflag=direct 2>/dev/null
/usr/local/bin/blkdiscard -o $((64<<20)) -l $((1<<20)) /dev/sda
/usr/local/bin/blkdiscard -z -o $((32<<20)) -l $((1<<20)) /dev/vda
echo "sda-discarded $(dd if=/dev/sda bs=1M skip=64 count=1 iflag=direct 2>/dev/null | od -An -tx1 -v | tr -s ' \n' '\n\n' | sort -u | tr '\n' ' ')"
echo "vda-zeroed $(dd if=/dev/vda bs=1M skip=32 count=1 iflag=direct 2>/dev/null | od -An -tx1 -v | tr -s ' \n' '\n\n' | sort -u | tr '\n' ' ')"
echo "sda-rest $(dd if=/dev/sda bs=1M skip=65 count=3 iflag=direct 2>/dev/null | md5sum | cut -c1-32) $(dd if=/data/p bs=1M skip=1 2>/dev/null | md5sum | cut -c1-32)"
sec flush
dd if=/data/p of=/dev/sda bs=1M seek=96 oflag=direct 2>/dev/null
sg_sync /dev/sda && echo sda-synced
dd if=/data/p of=/dev/vda bs=1M seek=48 oflag=direct conv=fsync 2>/dev/null && echo vda-synced
sec resize
before=$(cat /sys/block/vda/size)
echo "phase resize"
i=0
while [ $i -lt 100 ]; do
	[ "$(cat /sys/block/vda/size)" != "$before" ] && break
	sleep 0.1; i=$((i+1))
done
cat /sys/block/vda/size
fio --name=grown --filename=/dev/vda --ioengine=libaio --direct=1 --rw=write --bs=64k --iodepth=4 --offset=64m --size=32m --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse --terse-version=3 | cut -d';' -f1-5
sec errors
dmesg | grep -ciE "i/o error|blk_update_request|critical" || true
`
	p := newPhases("resize")
	done := make(chan struct{})
	var res *guest.Result
	var err error
	go func() {
		defer close(done)
		res, err = guest.Run(context.Background(), guest.Options{Image: img, CPUs: 2,
			Controllers: []guest.Controller{
				{Socket: tg.sock("s0"), NumQueues: 2},
				{Socket: tg.sock("b0"), Blk: true, NumQueues: 1},
			},
			SkipFirmwareScan: true, Files: map[string][]byte{"/data/p": pat},
			Script: script, Console: p, Timeout: 6 * time.Minute})
	}()
	p.wait(t, "resize", done, &res, &err)
	if err := tg.target.resizeBdev("r4k", 96<<20); err != nil {
		t.Errorf("resize r4k: %v", err)
	}
	<-done
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("guest: %v\n%s", err, consoleOf(res))
	}
	secs := sections(res.Console)
	wantMatch(t, "disks", section(t, secs, "disks"), `^sda 134217728 512$`, `^vda 67108864 4096$`)
	// No volatile write cache: the bdev turns librbd's cache off, so a
	// completed write is on the OSDs.
	wantMatch(t, "cache", section(t, secs, "cache"), `^write through$`, `^write through$`)
	wantMatch(t, "fio", section(t, secs, "fio"), `^3;fio-[^;]*;sda;0;0$`, `^3;fio-[^;]*;sdabig;0;0$`, `^3;fio-[^;]*;vda;0;0$`)
	wantMatch(t, "discard", section(t, secs, "discard"), `^sda-discarded +00 $`, `^vda-zeroed +00 $`)
	if m := regexp.MustCompile(`(?m)^sda-rest (\S+) (\S+)$`).FindStringSubmatch(section(t, secs, "discard")); m == nil || m[1] != m[2] {
		t.Errorf("the megabytes after the discarded one: %q", section(t, secs, "discard"))
	}
	wantMatch(t, "flush", section(t, secs, "flush"), `^sda-synced$`, `^vda-synced$`)
	wantMatch(t, "resize", section(t, secs, "resize"), `^196608$`, `^3;fio-[^;]*;grown;0;0$`)
	wantMatch(t, "guest kernel errors", section(t, secs, "errors"), `^0$`)

	// Another client reads what the guest flushed (the images are still open).
	if got := c.Export(t, "io512"); !bytes.Equal(got[96<<20:100<<20], pat) {
		t.Error("rbd export of io512: the data the guest wrote and synchronized is not there")
	}
	got := c.Export(t, "io4k")
	if len(got) != 96<<20 {
		t.Errorf("rbd export of io4k: %d bytes, want the grown 96 MiB", len(got))
	} else if !bytes.Equal(got[48<<20:52<<20], pat) {
		t.Error("rbd export of io4k: the data the guest wrote and flushed is not there")
	}
	for _, name := range []string{"s0", "b0"} {
		for _, l := range tg.ctrl(name).Stats.Snapshot().LUNs {
			if l.Writes == 0 || l.Reads == 0 || name == "s0" && l.Flushes == 0 { // sg_sync; vda's fsync sends none to a write-through disk
				t.Errorf("%s LUN %s: writes %d reads %d flushes %d", name, l.Bdev, l.Writes, l.Reads, l.Flushes)
			}
			if n := l.ErrorTotal(); n != 0 {
				t.Errorf("%s LUN %s: %d errors (by kind %v)", name, l.Bdev, n, l.Errors)
			}
		}
	}
	logs := tg.logs.String()
	for _, bad := range []string{"level=ERROR", "level=WARN"} {
		if strings.Contains(logs, bad) {
			t.Errorf("target log has %s lines", bad)
		}
	}
}

// testGuestRBDFlushKill: the guest writes, flushes (SYNCHRONIZE CACHE on
// scsi, fsync on blk), and the target process is killed with SIGKILL the
// moment the guest prints that the flush completed: another client's
// `rbd export` has every byte. (With librbd's cache off a completed write
// is on the OSDs already; the test holds whatever the cache setting.)
func testGuestRBDFlushKill(t *testing.T, img *guest.Image, c *cephtest.Cluster) {
	c.CreateImage(t, "kill", 64<<20)
	c.CreateImage(t, "killblk", 64<<20)
	dir := shortTempDir(t, "vt-rbdk-")
	cfg := filepath.Join(dir, "t.toml")
	text := fmt.Sprintf("socket_dir = %q\n", dir) + targetPrelude + `
` + rbdBdev(c, "k", "kill", 512, "") + rbdBdev(c, "kb", "killblk", 4096, "") + `
[[controller]]
name = "c0"
num_queues = 1
[[controller.lun]]
target = 0
lun = 0
bdev = "k"
[[controller]]
name = "b0"
type = "blk"
num_queues = 1
bdev = "kb"
`
	if err := os.WriteFile(cfg, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	d := &restartable{t: t, bin: buildTagged(t, "rbd"), cfg: cfg, sock: filepath.Join(dir, "c0"), rpc: filepath.Join(dir, "rpc.sock")}
	d.start()
	defer func() {
		if d.cmd.ProcessState == nil {
			d.stop(syscall.SIGTERM)
		}
	}()
	pat := pattern(t, 4<<20)
	script := shPrelude + `
dd if=/dev/zero of=/dev/sda bs=4k count=1 oflag=direct 2>/dev/null
sg_sync /dev/sda
dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct conv=fsync 2>/dev/null
dd if=/data/p of=/dev/sda bs=1M seek=8 oflag=direct 2>/dev/null
dd if=/data/p of=/dev/vda bs=1M seek=8 oflag=direct 2>/dev/null
sg_sync /dev/sda
dd if=/dev/null of=/dev/vda conv=fsync 2>/dev/null
echo "phase synced"
sleep 300
`
	p := newPhases("synced")
	done := make(chan struct{})
	var res *guest.Result
	var err error
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		defer close(done)
		res, err = guest.Run(ctx, guest.Options{Image: img,
			Controllers: []guest.Controller{
				{Socket: filepath.Join(dir, "c0"), NumQueues: 1},
				{Socket: filepath.Join(dir, "b0"), Blk: true, NumQueues: 1},
			},
			SkipFirmwareScan: true, Files: map[string][]byte{"/data/p": pat},
			Script: script, Console: p, Timeout: 4 * time.Minute})
	}()
	p.wait(t, "synced", done, &res, &err)
	d.stop(syscall.SIGKILL)
	cancel()
	<-done
	for _, im := range []string{"kill", "killblk"} {
		if got := c.Export(t, im); !bytes.Equal(got[8<<20:12<<20], pat) {
			t.Errorf("rbd export of %s after SIGKILL: the data written and flushed before the kill is not there", im)
		}
	}
	if strings.Contains(d.log(), "level=ERROR") {
		t.Errorf("target logged errors:\n%s", d.log())
	}
}

// testGuestRBDOSDDown stops the cluster's only OSD under a guest's I/O.
// sda (the default 30 s op_timeout): a 10 s outage in the middle of a fio
// verify with flushes; its writes wait and fio completes clean. sdb
// (op_timeout 5 s): a longer outage fails a write with an I/O error (after
// the guest's retries) instead of hanging, and after the OSD returns the
// data written before the outage reads back intact and new writes verify.
func testGuestRBDOSDDown(t *testing.T, img *guest.Image, c *cephtest.Cluster) {
	c.CreateImage(t, "wait", 64<<20)
	c.CreateImage(t, "fail", 64<<20)
	tg := startTarget(t, targetPrelude+`
`+rbdBdev(c, "w", "wait", 512, "")+rbdBdev(c, "f", "fail", 512, "op_timeout = \"5s\"\n")+`
[[controller]]
name = "c0"
num_queues = 1
[[controller.lun]]
target = 0
lun = 0
bdev = "w"
[[controller.lun]]
target = 1
lun = 0
bdev = "f"
`)
	pat := pattern(t, 4<<20)
	script := shPrelude + `
dd if=/data/p of=/dev/sdb bs=1M oflag=direct 2>/dev/null
sg_sync /dev/sdb
sec wait
echo "phase stop1"
fio --name=wait --filename=/dev/sda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=8 --size=16m --rate_iops=300 --fsync=16 --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse --terse-version=3 | cut -d';' -f1-5
echo "phase fio1done"
sec fail
echo "phase stop2"
i=0
while dd if=/data/p of=/dev/sdb bs=4k count=1 seek=2048 oflag=direct 2>/dev/null; do
	sleep 0.2; i=$((i+1)); [ $i -lt 300 ] || { echo "writes never failed"; exit 1; }
done
echo "write-failed"
echo "phase failed"
i=0
until dd if=/dev/sdb of=/tmp/back bs=1M count=4 iflag=direct 2>/dev/null && cmp -s /tmp/back /data/p; do
	sleep 1; i=$((i+1)); [ $i -lt 120 ] || { echo "data never came back"; exit 1; }
done
echo "intact"
fio --name=after --filename=/dev/sdb --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=8 --offset=16m --size=8m --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse --terse-version=3 | cut -d';' -f1-5
sg_sync /dev/sdb && echo sdb-synced
`
	p := newPhases("stop1", "fio1done", "stop2", "failed")
	done := make(chan struct{})
	var res *guest.Result
	var err error
	go func() {
		defer close(done)
		res, err = guest.Run(context.Background(), guest.Options{Image: img,
			Controllers:      []guest.Controller{{Socket: tg.sock("c0"), NumQueues: 1}},
			SkipFirmwareScan: true, Files: map[string][]byte{"/data/p": pat},
			Script: script, Console: p, Timeout: 6 * time.Minute})
	}()
	osdDown := false
	defer func() {
		if osdDown {
			c.StartOSD(t)
		}
	}()

	p.wait(t, "stop1", done, &res, &err)
	time.Sleep(time.Second) // fio is writing
	c.StopOSD(t)
	osdDown = true
	t.Log("osd stopped under sda's fio")
	time.Sleep(10 * time.Second)
	select {
	case <-p.marks["fio1done"].seen:
		t.Error("fio finished while the OSD was down: the outage did not hit its I/O")
	default:
	}
	c.StartOSD(t)
	osdDown = false
	p.wait(t, "stop2", done, &res, &err)
	c.StopOSD(t)
	osdDown = true
	stopped := time.Now()
	p.wait(t, "failed", done, &res, &err)
	t.Logf("sdb's write failed %v after the OSD stopped", time.Since(stopped).Round(time.Millisecond))
	c.StartOSD(t)
	osdDown = false
	<-done
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("guest: %v\n%s", err, consoleOf(res))
	}
	secs := sections(res.Console)
	wantMatch(t, "wait", section(t, secs, "wait"), `^3;fio-[^;]*;wait;0;0$`)
	wantMatch(t, "fail", section(t, secs, "fail"), `^write-failed$`, `^intact$`, `^3;fio-[^;]*;after;0;0$`, `^sdb-synced$`)
	for _, l := range tg.ctrl("c0").Stats.Snapshot().LUNs {
		errs := l.ErrorTotal()
		switch {
		case l.Bdev == "w" && errs != 0:
			t.Errorf("LUN w (30 s op timeout, 10 s outage): %d errors", errs)
		case l.Bdev == "f" && errs == 0:
			t.Error("LUN f (5 s op timeout): no error counted for the outage")
		}
	}
}

package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"vhost-target/cmd/vhost-target/guest"
	"vhost-target/config"
	"vhost-target/rpc"
)

// phases is a live console writer for a guest script that announces phases
// ("phase NAME"): the test acts on the target when the guest reaches each.
type phases struct {
	marks map[string]*marker
}

func newPhases(names ...string) *phases {
	p := &phases{marks: map[string]*marker{}}
	for _, n := range names {
		p.marks[n] = newMarker("phase " + n + "\r")
	}
	return p
}

func (p *phases) Write(b []byte) (int, error) {
	for _, m := range p.marks {
		m.Write(b)
	}
	return len(b), nil
}

// wait blocks until the guest reaches phase name or its run ends; then
// it fails the test with the console *res shows.
func (p *phases) wait(t *testing.T, name string, done <-chan struct{}, res **guest.Result, err *error) {
	t.Helper()
	select {
	case <-p.marks[name].seen:
	case <-done:
		t.Fatalf("guest ended before phase %s: %v\n%s", name, *err, consoleOf(*res))
	}
}

// guestWaitDisk is a shell function for guest scripts: wait up to $2 tenths
// of a second for block device $1 to exist (or, with "gone", to vanish).
// busybox sh has no local variables: its counter is _w.
const guestWaitDisk = `
waitdisk() { _w=0; while [ $_w -lt $2 ]; do if [ "$3" = gone ]; then [ -b $1 ] || return 0; else [ -b $1 ] && return 0; fi; sleep 0.1; _w=$((_w+1)); done; echo "timeout waiting for $1 $3"; return 1; }
`

const runtimeConfig = `
[reactors]
cpus = [0]
poll = "adaptive"
[[bdev]]
name = "m0"
type = "malloc"
size = "64MiB"
[[controller]]
name = "c0"
num_queues = 1
[[controller.lun]]
target = 0
bdev = "m0"
`

// TestGuestHotplugResize: a running Linux guest sees a LUN added over
// JSON-RPC appear by itself (RESCAN event) and verifies data on it, sees
// its new size after a resize and a SCSI rescan (UNIT ATTENTION 2A/09 and
// PARAM_CHANGE), and sees it disappear on removal (REMOVED event) while
// fio verifies the other LUN, with no error there.
func TestGuestHotplugResize(t *testing.T) {
	img := guestImage(t)
	tg, c := rpcTarget(t, runtimeConfig)
	dir := backingDir(t)
	file := filepath.Join(dir, "hot.img")

	script := shPrelude + guestWaitDisk + `
sec start
ls /sys/class/scsi_disk
[ -b /dev/sda ] && [ ! -b /dev/sdb ]
echo "phase hotadd"
waitdisk /dev/sdb 600
sec added
cat /sys/block/sdb/device/model /sys/block/sdb/size
fio --name=v --filename=/dev/sdb --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=8 --size=8m --verify=crc32c --do_verify=1 --output-format=terse >/dev/null
echo hotadd-verify-ok
before=$(cat /sys/block/sdb/size)
echo "phase resize"
i=0
while [ $i -lt 300 ]; do
  echo 1 > /sys/block/sdb/device/rescan
  [ "$(cat /sys/block/sdb/size)" != "$before" ] && break
  sleep 0.2; i=$((i+1))
done
sec resized
cat /sys/block/sdb/size
fio --name=v --filename=/dev/sdb --ioengine=libaio --direct=1 --rw=write --bs=64k --iodepth=4 --offset=16m --size=8m --verify=crc32c --do_verify=1 --output-format=terse >/dev/null
echo resize-verify-ok
fio --name=o --filename=/dev/sda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size=32m --verify=crc32c --do_verify=1 --time_based --runtime=8 --output-format=terse >/tmp/fio.out 2>&1 &
pid=$!
sleep 1
echo "phase remove"
waitdisk /dev/sdb 600 gone
sec removed
wait $pid
echo other-lun-ok
dmesg | grep -ci "i/o error" || true
`
	p := newPhases("hotadd", "resize", "remove")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	var res *guest.Result
	var err error
	go func() {
		defer close(done)
		res, err = guest.Run(ctx, guest.Options{Image: img, Controllers: []guest.Controller{{Socket: tg.sock("c0")}},
			Script: script, Console: p, Timeout: 5 * time.Minute})
	}()

	p.wait(t, "hotadd", done, &res, &err)
	call[string](t, c, "bdev_file_create", m{"name": "hot", "filename": file, "create": true, "size": "16MiB"})
	call[int](t, c, "vhost_scsi_controller_add_target", m{"ctrlr": "c0", "scsi_target_num": 1, "bdev_name": "hot"})

	p.wait(t, "resize", done, &res, &err)
	call[bool](t, c, "bdev_resize", m{"name": "hot", "new_size": 32})

	p.wait(t, "remove", done, &res, &err)
	call[bool](t, c, "vhost_scsi_controller_remove_target", m{"ctrlr": "c0", "scsi_target_num": 1})
	<-done
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("guest: %v\n%s", err, consoleOf(res))
	}
	sec := sections(res.Console)
	if !strings.Contains(sec["added"], "32768") { // 16 MiB in 512-byte sectors
		t.Errorf("hot-added disk: %q", sec["added"])
	}
	if !strings.Contains(sec["resized"], "65536") {
		t.Errorf("size after resize and rescan: %q", sec["resized"])
	}
	if !strings.Contains(sec["removed"], "other-lun-ok") {
		t.Errorf("the other LUN's fio during the removal: %q", sec["removed"])
	}
	if lines := strings.Fields(sec["removed"]); len(lines) == 0 || lines[len(lines)-1] != "0" {
		t.Errorf("I/O errors in dmesg: %q", sec["removed"])
	}
}

// TestGuestRuntimeController: a bdev and a controller created over
// JSON-RPC take a new VM at once; deleting it afterwards removes its socket.
func TestGuestRuntimeController(t *testing.T) {
	img := guestImage(t)
	tg, c := rpcTarget(t, runtimeConfig)
	call[string](t, c, "bdev_malloc_create", m{"name": "rt0", "num_blocks": 65536, "block_size": 512})
	call[bool](t, c, "vhost_create_scsi_controller", m{"ctrlr": "rt", "cpumask": "0x1", "num_queues": 2})
	call[int](t, c, "vhost_scsi_controller_add_target", m{"ctrlr": "rt", "scsi_target_num": 0, "bdev_name": "rt0"})
	sock := filepath.Join(tg.cfg.SocketDir, "rt")
	res, err := guest.Run(context.Background(), guest.Options{Image: img, CPUs: 2,
		Controllers: []guest.Controller{{Socket: sock, NumQueues: 2}}, Timeout: 4 * time.Minute,
		Script: shPrelude + `
fio --name=v --filename=/dev/sda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --numjobs=2 --size=8m --offset_increment=8m --verify=crc32c --do_verify=1 --output-format=terse >/dev/null
echo runtime-ok
`})
	if err != nil || res.ExitCode != 0 || !strings.Contains(res.Console, "runtime-ok") {
		t.Fatalf("guest on a runtime controller: %v\n%s", err, consoleOf(res))
	}
	call[bool](t, c, "vhost_delete_controller", m{"ctrlr": "rt"})
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("deleted controller's socket: %v", err)
	}
}

// TestGuestSIGHUP runs the daemon, edits its file and sends SIGHUP: the
// running guest sees a LUN added, then another removed.
func TestGuestSIGHUP(t *testing.T) {
	img := guestImage(t)
	bin := filepath.Join(t.TempDir(), "vhost-target")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	sockDir := t.TempDir()
	file := filepath.Join(t.TempDir(), "t.toml")
	base := fmt.Sprintf("socket_dir = %q\n[metrics]\nlisten = \"\"\n", sockDir) + runtimeConfig + `[[bdev]]
name = "m1"
type = "malloc"
size = "8MiB"
`
	if err := os.WriteFile(file, []byte(base), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-c", file)
	var logs bytes.Buffer
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	}()
	sock := filepath.Join(sockDir, "c0")
	if !waitFor(20*time.Second, func() bool { _, err := os.Stat(sock); return err == nil }) {
		t.Fatalf("no socket\n%s", logs.String())
	}
	script := shPrelude + guestWaitDisk + `
echo "phase add"
waitdisk /dev/sdb 600
sec added
cat /sys/block/sdb/size
dd if=/dev/urandom of=/tmp/p bs=4k count=64 2>/dev/null
dd if=/tmp/p of=/dev/sdb bs=4k oflag=direct 2>/dev/null
dd if=/dev/sdb of=/tmp/q bs=4k count=64 iflag=direct 2>/dev/null
cmp /tmp/p /tmp/q
echo "phase remove"
waitdisk /dev/sdb 600 gone
sec removed
dd if=/dev/sda of=/dev/null bs=4k count=16 iflag=direct 2>/dev/null
echo sighup-ok
`
	p := newPhases("add", "remove")
	done := make(chan struct{})
	var res *guest.Result
	var err error
	go func() {
		defer close(done)
		res, err = guest.Run(context.Background(), guest.Options{Image: img, Controllers: []guest.Controller{{Socket: sock}},
			Script: script, Console: p, Timeout: 4 * time.Minute})
	}()
	hup := func(text, want string) {
		t.Helper()
		if err := os.WriteFile(file, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		cmd.Process.Signal(syscall.SIGHUP)
		if !waitFor(20*time.Second, func() bool { return strings.Contains(logs.String(), want) }) {
			t.Fatalf("no %q after SIGHUP:\n%s", want, logs.String())
		}
	}
	p.wait(t, "add", done, &res, &err)
	hup(base+"[[controller.lun]]\ntarget = 1\nbdev = \"m1\"\n", `configuration reloaded`)
	p.wait(t, "remove", done, &res, &err)
	hup(base, `target 1 lun 0 removed`)
	<-done
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("guest: %v\n%s\ntarget log:\n%s", err, consoleOf(res), logs.String())
	}
	if !strings.Contains(sections(res.Console)["added"], "16384") {
		t.Errorf("added disk: %q", sections(res.Console)["added"])
	}
	// A bad file is refused and the target keeps serving.
	os.WriteFile(file, []byte(base+"[[bdev]]\nname = \"m1\"\n"), 0o644)
	cmd.Process.Signal(syscall.SIGHUP)
	if !waitFor(20*time.Second, func() bool { return strings.Contains(logs.String(), "reload refused") }) {
		t.Fatalf("bad file not refused:\n%s", logs.String())
	}
	c, err := rpc.Dial(filepath.Join(sockDir, config.RPCSocketName))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if ctrls := call[[]controllerJSON](t, c, "vhost_get_controllers", nil); len(ctrls) != 1 {
		t.Errorf("after a refused reload: %+v", ctrls)
	}
}

// TestGuestHotplugSoak adds and removes a LUN under a running guest ten
// times; every other removal happens while fio writes to that very LUN, so
// requests are in flight when it goes. Each time the disk must appear by
// itself, hold the data written to it, and disappear, without hanging the
// guest; the other LUN stays verified to the end.
func TestGuestHotplugSoak(t *testing.T) {
	img := guestImage(t)
	tg, c := rpcTarget(t, runtimeConfig)
	const rounds = 10
	var names []string
	for i := range rounds {
		names = append(names, fmt.Sprintf("add%d", i), fmt.Sprintf("rm%d", i))
	}
	script := shPrelude + guestWaitDisk + fmt.Sprintf(`
r=0
while [ $r -lt %d ]; do
  echo "phase add$r"
  waitdisk /dev/sdb 600
  dd if=/dev/urandom of=/tmp/p bs=64k count=16 2>/dev/null
  dd if=/tmp/p of=/dev/sdb bs=64k oflag=direct 2>/dev/null
  dd if=/dev/sdb of=/tmp/q bs=64k count=16 iflag=direct 2>/dev/null
  cmp /tmp/p /tmp/q
  if [ $((r %% 2)) -eq 1 ]; then
    fio --name=busy --filename=/dev/sdb --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --time_based --runtime=60 --output-format=terse >/dev/null 2>&1 &
    pid=$!
    sleep 0.5
    echo "phase rm$r"
    waitdisk /dev/sdb 600 gone
    wait $pid || true
  else
    echo "phase rm$r"
    waitdisk /dev/sdb 600 gone
  fi
  echo "round $r ok"
  r=$((r+1))
done
fio --name=v --filename=/dev/sda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=8 --size=8m --verify=crc32c --do_verify=1 --output-format=terse >/dev/null
echo soak-ok
`, rounds)
	p := newPhases(names...)
	done := make(chan struct{})
	var res *guest.Result
	var err error
	go func() {
		defer close(done)
		res, err = guest.Run(context.Background(), guest.Options{Image: img, Controllers: []guest.Controller{{Socket: tg.sock("c0")}},
			Script: script, Console: p, Timeout: 6 * time.Minute})
	}()
	for i := range rounds {
		p.wait(t, fmt.Sprintf("add%d", i), done, &res, &err)
		name := fmt.Sprintf("h%d", i)
		call[string](t, c, "bdev_malloc_create", m{"name": name, "num_blocks": 32768, "block_size": 512})
		call[int](t, c, "vhost_scsi_controller_add_target", m{"ctrlr": "c0", "scsi_target_num": 1, "bdev_name": name})
		p.wait(t, fmt.Sprintf("rm%d", i), done, &res, &err)
		call[bool](t, c, "vhost_scsi_controller_remove_target", m{"ctrlr": "c0", "scsi_target_num": 1})
		call[bool](t, c, "bdev_malloc_delete", m{"name": name})
	}
	<-done
	if err != nil || res.ExitCode != 0 || !strings.Contains(res.Console, "soak-ok") {
		t.Fatalf("guest: %v\n%s", err, consoleOf(res))
	}
	if strings.Contains(tg.logs.String(), "level=ERROR") {
		t.Errorf("target logged errors:\n%s", tg.logs.String())
	}
}

package main

import (
	"log/slog"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"vhost-target/cmd/vhost-target/guest"
)

// TestGuestDIMM boots a guest with a second RAM region (a cold-plugged
// pc-dimm on its own memfd, onlined by the guest kernel): QEMU 7.2 sends it
// with ADD_MEM_REG (CONFIGURE_MEM_SLOTS) and fio verify still passes.
func TestGuestDIMM(t *testing.T) {
	img := guestImage(t)
	tg := startTargetWith(t, targetPrelude+`
[[bdev]]
name = "m"
type = "malloc"
size = "32MiB"
[[controller]]
name = "c0"
num_queues = 1
[[controller.lun]]
target = 0
lun = 0
bdev = "m"
`, targetOpts{level: slog.LevelDebug})
	res := runGuest(t, img, guest.Options{
		Controllers: []guest.Controller{{Socket: tg.sock("c0"), NumQueues: 1}},
		KernelArgs:  "memhp_default_state=online",
		QEMUArgs: []string{"-m", "512M,slots=2,maxmem=1G",
			"-object", "memory-backend-memfd,id=dimm0,size=256M,share=on", "-device", "pc-dimm,id=d0,memdev=dimm0"},
		Script: `set -e
grep MemTotal /proc/meminfo
fio --name=v --filename=/dev/sda --ioengine=libaio --direct=1 --rw=randwrite --bs=64k --iodepth=16 --size=16m --verify=crc32c --do_verify=1 --output-format=terse >/dev/null
echo dimm-ok
`,
	})
	// The DIMM is online in the guest, so its pages serve as I/O buffers too.
	if m := regexp.MustCompile(`MemTotal:\s+(\d+) kB`).FindStringSubmatch(res.Console); m == nil {
		t.Fatalf("no MemTotal in the console")
	} else if kb, _ := strconv.Atoi(m[1]); kb < 600<<10 {
		t.Fatalf("guest has %d kB: the 256 MiB DIMM is not online", kb)
	}
	if n := strings.Count(tg.logs.String(), "request=ADD_MEM_REG"); n < 2 {
		t.Fatalf("%d ADD_MEM_REG messages, want one per RAM region (2)", n)
	}
}

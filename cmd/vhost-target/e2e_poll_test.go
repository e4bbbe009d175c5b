package main

import (
	"testing"

	"vhost-target/cmd/vhost-target/guest"
)

// TestGuestBusyPoll runs a real guest against busy-polling reactors (the
// default mode; the other guest tests use adaptive mode so TCG keeps both of
// this machine's cores): two reactors, one controller whose two request
// queues span both, a 2-vCPU guest verifying I/O on a 512- and a 4096-byte LUN.
func TestGuestBusyPoll(t *testing.T) {
	img := guestImage(t)
	tg := startTarget(t, `
[metrics]
listen = ""
[reactors]
cpus = [0, 1]
poll = "busy"
[[bdev]]
name = "a"
type = "malloc"
size = "32MiB"
block_size = 512
[[bdev]]
name = "b"
type = "malloc"
size = "32MiB"
block_size = 4096
[[controller]]
name = "c0"
num_queues = 2
[[controller.lun]]
target = 0
lun = 0
bdev = "a"
[[controller.lun]]
target = 1
lun = 0
bdev = "b"
`)
	runGuest(t, img, guest.Options{
		Controllers: []guest.Controller{{Socket: tg.sock("c0"), NumQueues: 2}},
		CPUs:        2,
		Script: `set -e
for d in /dev/sda /dev/sdb; do
  fio --name=v0 --filename=$d --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size=4m --offset=0 --verify=crc32c --do_verify=1 --cpus_allowed=0 --output-format=terse >/dev/null
  fio --name=v1 --filename=$d --ioengine=io_uring --direct=1 --rw=randwrite --bs=64k --iodepth=4 --size=4m --offset=8m --verify=crc32c --do_verify=1 --cpus_allowed=1 --output-format=terse >/dev/null
done
echo busy-ok
`,
	})
	s := tg.ctrl("c0").Stats.Snapshot()
	if s.Queues[0].Requests == 0 || s.Queues[1].Requests == 0 {
		t.Fatalf("requests per queue %+v: want both queues used", s.Queues)
	}
	for _, l := range s.LUNs {
		if l.Writes == 0 || l.Reads == 0 {
			t.Errorf("LUN %d/%d: %d writes %d reads", l.Target, l.LUN, l.Writes, l.Reads)
		}
	}
}

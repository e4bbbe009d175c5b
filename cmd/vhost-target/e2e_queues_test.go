package main

import (
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"vhost-target/cmd/vhost-target/guest"
)

const twoControllersConfig = targetPrelude + `
[[bdev]]
name = "a512"
type = "malloc"
size = "32MiB"
block_size = 512
[[bdev]]
name = "b4k"
type = "malloc"
size = "48MiB"
block_size = 4096
[[controller]]
name = "c0"
num_queues = 1
[[controller.lun]]
target = 0
lun = 0
bdev = "a512"
[[controller]]
name = "c1"
num_queues = 1
[[controller.lun]]
target = 0
lun = 0
bdev = "b4k"
`

// TestGuestTwoGuests (issue 3 d): two controllers of one target serve two
// QEMUs at the same time; each guest sees only its own disk and verifies I/O.
func TestGuestTwoGuests(t *testing.T) {
	img := guestImage(t)
	tg := startTarget(t, twoControllersConfig)

	// Prove the two sessions overlapped, from the target side.
	var both atomic.Bool
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			if tg.ctrl("c0").Sessions() == 1 && tg.ctrl("c1").Sessions() == 1 {
				both.Store(true)
			}
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()

	guests := []struct {
		ctrl string
		size int
		bs   int
	}{{"c0", 32 << 20, 512}, {"c1", 48 << 20, 4096}}
	t.Run("parallel", func(t *testing.T) {
		for _, g := range guests {
			t.Run(g.ctrl, func(t *testing.T) {
				t.Parallel()
				res := runGuest(t, img, guest.Options{
					Controllers: []guest.Controller{{Socket: tg.sock(g.ctrl), NumQueues: 1}},
					Script: shPrelude + `
sec disks
for d in /sys/block/sd*; do echo "${d##*/} $(blockdev --getsize64 /dev/${d##*/}) $(cat $d/queue/logical_block_size)"; done
sec fio
fio --name=v --filename=/dev/sda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size=16m --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse --terse-version=3 | cut -d';' -f1-5
`,
				})
				secs := sections(res.Console)
				if got, want := strings.TrimSpace(section(t, secs, "disks")), fmt.Sprintf("sda %d %d", g.size, g.bs); got != want {
					t.Errorf("guest of %s sees disks %q, want %q", g.ctrl, got, want)
				}
				wantMatch(t, "fio", section(t, secs, "fio"), `^3;fio-[^;]*;v;0;0$`)
			})
		}
	})
	close(stop)
	wg.Wait()
	if !both.Load() {
		t.Error("the two guests were never connected at the same time")
	}
	for _, g := range guests {
		s := tg.ctrl(g.ctrl).Stats.Snapshot()
		if s.Connections != 1 || len(s.LUNs) != 1 || s.LUNs[0].Writes == 0 || s.LUNs[0].Reads == 0 {
			t.Errorf("%s: connections %d, LUNs %+v", g.ctrl, s.Connections, s.LUNs)
		}
	}
}

const multiQueueConfig = `
[metrics]
listen = ""
[reactors]
cpus = [0, 1]
poll = "adaptive"
[[bdev]]
name = "m512"
type = "malloc"
size = "64MiB"
block_size = 512
[[controller]]
name = "c0"
num_queues = 2
cpus = [0, 1]
[[controller.lun]]
target = 0
lun = 0
bdev = "m512"
`

// TestGuestMultiQueue (issue 3 e): a 2-vCPU guest on a controller with two
// request queues served by two reactors. fio jobs pinned to each vCPU make
// blk-mq submit on both hardware queues, and the target's per-queue counters
// show requests on request queue 0 and 1.
func TestGuestMultiQueue(t *testing.T) {
	img := guestImage(t)
	var mu sync.Mutex
	started := map[string]string{} // vring -> reactor
	tg := startTargetWith(t, multiQueueConfig, targetOpts{level: slog.LevelDebug, hook: func(msg string, a map[string]string) {
		if msg == "request queue started" {
			mu.Lock()
			started[a["vring"]] = a["reactor"]
			mu.Unlock()
		}
	}})
	before := tg.ctrl("c0").Stats.Snapshot().Queues
	res := runGuest(t, img, guest.Options{
		Controllers: []guest.Controller{{Socket: tg.sock("c0"), NumQueues: 2}},
		CPUs:        2,
		Script: shPrelude + `
sec cpus; nproc
sec hctx; ls -1 /sys/block/sda/mq
sec fio
fio --filename=/dev/sda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse --terse-version=3 \
	--name=cpu0 --cpus_allowed=0 --offset=0 --size=8m \
	--name=cpu1 --cpus_allowed=1 --offset=16m --size=8m | cut -d';' -f1-5
`,
	})
	secs := sections(res.Console)
	wantMatch(t, "nproc", section(t, secs, "cpus"), `^2$`)
	wantMatch(t, "blk-mq hardware queues", section(t, secs, "hctx"), `^0$`, `^1$`)
	wantMatch(t, "fio", section(t, secs, "fio"), `^3;fio-[^;]*;cpu0;0;0$`, `^3;fio-[^;]*;cpu1;0;0$`)

	// Each job did 2048 writes and 2048 verify reads from its own vCPU.
	q := tg.ctrl("c0").Stats.Snapshot().Queues
	t.Logf("requests by request queue: 0: %d, 1: %d", q[0].Requests-before[0].Requests, q[1].Requests-before[1].Requests)
	for rq := 0; rq < 2; rq++ {
		if n := q[rq].Requests - before[rq].Requests; n < 2048 {
			t.Errorf("request queue %d served %d requests, want >= 2048 (all queues: %+v)", rq, n, q)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if started["2"] == "" || started["3"] == "" || started["2"] == started["3"] {
		t.Errorf("request queues on reactors %v (vring -> reactor), want vrings 2 and 3 on different reactors", started)
	}
	if t.Failed() {
		t.Logf("console:\n%s", res.Console)
	}
}

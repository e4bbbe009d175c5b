package main

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"strings"
	"sync"
	"testing"
	"time"

	"vhost-target/cmd/vhost-target/guest"
)

// marker is a live console writer that closes seen when the guest prints
// text (the console may split it across writes, so a tail is kept).
type marker struct {
	text string
	seen chan struct{}
	mu   sync.Mutex
	tail []byte
	once sync.Once
}

func newMarker(text string) *marker { return &marker{text: text, seen: make(chan struct{})} }

func (m *marker) Write(p []byte) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.tail = append(m.tail, p...)
	if bytes.Contains(m.tail, []byte(m.text)) {
		m.once.Do(func() { close(m.seen) })
	}
	if len(m.tail) > 4096 {
		m.tail = append(m.tail[:0], m.tail[len(m.tail)-len(m.text):]...)
	}
	return len(p), nil
}

const sessionsConfig = targetPrelude + `
[[bdev]]
name = "m0"
type = "malloc"
size = "256MiB"
block_size = 512
[[bdev]]
name = "m1"
type = "malloc"
size = "64MiB"
block_size = 512
[[controller]]
name = "c0"
num_queues = 1
[[controller.lun]]
target = 0
lun = 0
bdev = "m0"
[[controller]]
name = "c1"
num_queues = 1
max_sessions = 2
[[controller.lun]]
target = 0
lun = 0
bdev = "m1"
[[bdev]]
name = "m2"
type = "malloc"
size = "256MiB"
block_size = 512
[[controller]]
name = "b0"
type = "blk"
num_queues = 1
bdev = "m2"
`

// TestGuestKillReattach kills QEMU (SIGKILL) in the middle of a write load
// and starts the next guest on the same socket at once, five times. Every
// guest first runs an fio verify of its own 16 MiB and must pass: the killed
// VM's in-flight requests drain, its session goes, and the new VM is
// admitted (max_sessions 1) and served.
func TestGuestKillReattach(t *testing.T) { testKillReattach(t, false) }

// TestGuestKillReattachBlk: the same on a vhost-user-blk controller.
func TestGuestKillReattachBlk(t *testing.T) { testKillReattach(t, true) }

func testKillReattach(t *testing.T, blk bool) {
	img := guestImage(t)
	tg := startTarget(t, sessionsConfig)
	ctrl, dev := "c0", "/dev/sda"
	if blk {
		ctrl, dev = "b0", "/dev/vda"
	}
	const rounds = 5
	for i := 0; i < rounds; i++ {
		off := 16 * i
		script := shPrelude + fmt.Sprintf(`
fio --name=v --filename=%s --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --offset=%dm --size=16m --verify=crc32c --do_verify=1 --output-format=terse >/dev/null
echo verify-ok
`, dev, off)
		last := i == rounds-1
		if !last {
			// Then a write load over the next guest's range too, until killed.
			script += `echo load-start
fio --name=w --filename=` + dev + ` --ioengine=libaio --direct=1 --rw=randwrite --bs=16k --iodepth=32 --size=128m --time_based --runtime=600 --output-format=terse >/dev/null
echo load-ended
exit 1
`
		}
		m := newMarker("load-start")
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		var res *guest.Result
		var err error
		go func() {
			defer close(done)
			res, err = guest.Run(ctx, guest.Options{Image: img, Controllers: []guest.Controller{{Socket: tg.sock(ctrl), Blk: blk}},
				Script: script, Console: m, Timeout: 4 * time.Minute})
		}()
		if last {
			<-done
			cancel()
			if err != nil || res.ExitCode != 0 {
				t.Fatalf("guest %d: %v\n%s", i, err, consoleOf(res))
			}
			break
		}
		select {
		case <-m.seen:
		case <-done:
			cancel()
			t.Fatalf("guest %d ended before its load: %v\n%s", i, err, consoleOf(res))
		}
		// Let the load run a moment, a different one each round.
		time.Sleep(time.Duration(300+rand.Intn(1500)) * time.Millisecond)
		before := tg.ctrl(ctrl).Stats.Snapshot().LUNs[0].Writes
		cancel() // SIGKILL
		<-done
		if res == nil || !strings.Contains(res.Console, "verify-ok") {
			t.Fatalf("guest %d: fio verify did not pass before the kill: %v\n%s", i, err, consoleOf(res))
		}
		t.Logf("guest %d killed during its write load (%d writes by then)", i, before)
	}
	s := tg.ctrl(ctrl).Stats.Snapshot()
	if s.Refused != 0 {
		t.Errorf("%d reattaching guests were refused", s.Refused)
	}
	if s.Connections != rounds {
		t.Errorf("%d connections, want %d", s.Connections, rounds)
	}
	if strings.Contains(tg.logs.String(), "level=ERROR") {
		t.Errorf("target logged errors:\n%s", tg.logs.String())
	}
}

func consoleOf(r *guest.Result) string {
	if r == nil {
		return ""
	}
	return r.Console
}

// TestGuestSecondSession: a second QEMU on a controller whose guest is
// running is refused at the default max_sessions (QEMU fails to start its
// vhost-user device and exits; the target logs a WARN naming both) and is
// served where max_sessions = 2, with the first guest still doing I/O.
func TestGuestSecondSession(t *testing.T) {
	img := guestImage(t)
	tg := startTarget(t, sessionsConfig)
	for _, c := range []struct {
		ctrl  string
		admit bool
	}{{"c0", false}, {"c1", true}} {
		t.Run(c.ctrl, func(t *testing.T) {
			// The first guest writes and verifies a range, says so, then
			// keeps its session open until killed.
			m := newMarker("first-ready")
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := make(chan struct{})
			var res1 *guest.Result
			var err1 error
			go func() {
				defer close(done)
				res1, err1 = guest.Run(ctx, guest.Options{Image: img, Controllers: []guest.Controller{{Socket: tg.sock(c.ctrl)}},
					Console: m, Timeout: 4 * time.Minute, Script: shPrelude + `
dd if=/dev/urandom of=/tmp/p bs=4096 count=256 2>/dev/null
dd if=/tmp/p of=/dev/sda bs=4096 seek=1000 oflag=direct 2>/dev/null
echo first-ready
while :; do
  dd if=/dev/sda of=/tmp/r bs=4096 skip=1000 count=256 iflag=direct 2>/dev/null
  cmp /tmp/p /tmp/r || { echo first-mismatch; exit 1; }
done
`})
			}()
			select {
			case <-m.seen:
			case <-done:
				t.Fatalf("first guest ended: %v\n%s", err1, consoleOf(res1))
			}
			refusedBefore := tg.ctrl(c.ctrl).Stats.Snapshot().Refused
			res2, err2 := guest.Run(context.Background(), guest.Options{Image: img, Controllers: []guest.Controller{{Socket: tg.sock(c.ctrl)}},
				Timeout: 3 * time.Minute, Script: shPrelude + `
dd if=/dev/urandom of=/tmp/p bs=4096 count=16 2>/dev/null
dd if=/tmp/p of=/dev/sda bs=4096 seek=5000 oflag=direct 2>/dev/null
dd if=/dev/sda of=/tmp/r bs=4096 skip=5000 count=16 iflag=direct 2>/dev/null
cmp /tmp/p /tmp/r
echo second-ok
`})
			refused := tg.ctrl(c.ctrl).Stats.Snapshot().Refused - refusedBefore
			if c.admit {
				if err2 != nil || res2.ExitCode != 0 {
					t.Fatalf("second guest with max_sessions 2: %v\n%s", err2, consoleOf(res2))
				}
				if refused != 0 || !strings.Contains(tg.logs.String(), "another front-end connected while one is served") {
					t.Errorf("refused %d; want 0 and a WARN naming both sessions", refused)
				}
			} else {
				if err2 == nil {
					t.Fatalf("second QEMU on a max_sessions 1 controller ran its script:\n%s", consoleOf(res2))
				}
				if refused != 1 || !strings.Contains(tg.logs.String(), "front-end refused") {
					t.Errorf("refused %d; want 1 and a WARN", refused)
				}
				t.Logf("second QEMU refused: %v", strings.SplitN(err2.Error(), "\n", 2)[0])
			}
			select {
			case <-done:
				t.Fatalf("first guest ended while the second ran: %v\n%s", err1, consoleOf(res1))
			default:
			}
			cancel()
			<-done
			if strings.Contains(consoleOf(res1), "first-mismatch") {
				t.Fatalf("first guest read back other data:\n%s", consoleOf(res1))
			}
		})
	}
}

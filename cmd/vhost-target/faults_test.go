package main

// Fault tests: front-ends that vanish in the middle of heavy I/O (closed
// abruptly in process, or a separate process killed with SIGKILL) and the
// daemon itself stopped with SIGTERM or SIGINT while a front-end has
// requests in flight. The target must give back everything a dead
// connection held, keep serving, and on a signal finish and publish every
// request it was given before it exits 0.

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"vhost-target/vhost/frontend"
)

const faultConfig = `
[[bdev]]
name = "m0"
type = "malloc"
size = "64MiB"
block_size = 512
[[controller]]
name = "c0"
num_queues = 2
[[controller.lun]]
target = 0
lun = 0
bdev = "m0"
`

// loadQueue keeps a front-end queue full of random 16 KiB reads and writes.
type loadQueue struct {
	q         *frontend.Queue
	rng       *rand.Rand
	submitted int
	completed int
	failed    int
	blocks    uint64 // LUN size in 512-byte blocks
}

const loadBS = 16 << 10

// fill submits until the queue's slots are used up and kicks once.
func (l *loadQueue) fill() {
	n := 0
	for l.q.Free() > 0 {
		s := l.q.Get()
		if s == nil {
			break
		}
		lba := uint64(l.rng.Intn(int(l.blocks/32))) * 32
		op, dir := byte(0x88), frontend.DirIn
		if l.rng.Intn(2) == 0 {
			op, dir = 0x8a, frontend.DirOut
		}
		l.q.Prepare(s, 0, 0, rw16(op, lba, loadBS/512), dir, loadBS)
		l.q.Submit(s)
		l.submitted++
		n++
	}
	if n > 0 {
		l.q.Kick()
	}
}

func (l *loadQueue) reap() int {
	return l.q.Reap(func(s *frontend.Slot) {
		l.completed++
		if s.Response() != 0 || s.Status() != 0 {
			l.failed++
		}
		l.q.Put(s)
	})
}

func (l *loadQueue) inflight() int { return l.submitted - l.completed }

func loadOptions() frontend.Options {
	return frontend.Options{NumQueues: 2, QueueSize: 128, Slots: 32, SlotDataSize: loadBS, Timeout: 5 * time.Second}
}

// TestFaultAbortDuringIO drops a front-end 100 times in a row with up to 64
// requests in flight on two queues (the socket closed and guest memory
// unmapped, as when a VMM dies). Afterwards no goroutine, fd or memfd
// mapping is left, nothing counted as a protocol error, and a new front-end
// does verified I/O on both queues.
func TestFaultAbortDuringIO(t *testing.T) {
	tg := startTarget(t, cfgText("[0]", "adaptive", faultConfig))
	c := tg.ctrl("c0")
	sock := tg.sock("c0")
	rng := rand.New(rand.NewSource(1))
	round := func() (inflight int) {
		dev, err := frontend.Dial(sock, loadOptions())
		if err != nil {
			t.Fatal(err)
		}
		qs := []*loadQueue{{q: dev.Queue(0), rng: rng, blocks: 64 << 20 / 512}, {q: dev.Queue(1), rng: rng, blocks: 64 << 20 / 512}}
		for _, l := range qs {
			l.fill()
		}
		// Let some complete and refill, so the abort lands at a random point
		// of a busy ring rather than right after the start.
		for i := rng.Intn(4); i > 0; i-- {
			for _, l := range qs {
				l.reap()
				l.fill()
			}
		}
		time.Sleep(time.Duration(rng.Intn(300)) * time.Microsecond)
		for _, l := range qs {
			inflight += l.inflight()
			if l.failed > 0 {
				t.Fatalf("%d requests failed before the abort", l.failed)
			}
		}
		dev.Abort()
		return inflight
	}
	round() // the first connection starts lazily created runtime state
	if !waitFor(5*time.Second, func() bool { return c.Sessions() == 0 }) {
		t.Fatal("warm-up session did not end")
	}
	base := readProcState(t)
	const rounds = 100
	inflight, busy := 0, 0
	for i := 0; i < rounds; i++ {
		n := round()
		inflight += n
		if n > 0 {
			busy++
		}
	}
	var now procState
	if !waitFor(10*time.Second, func() bool {
		now = readProcState(t)
		return c.Sessions() == 0 && now.fds == base.fds && now.memfdMaps == base.memfdMaps && now.goroutines <= base.goroutines+2
	}) {
		t.Fatalf("after %d aborts: %d sessions, state %+v, before %+v\n%s", rounds, c.Sessions(), now, base, goroutineDump())
	}
	s := c.Stats.Snapshot()
	if s.ProtocolErrors != 0 {
		t.Errorf("%d protocol errors from aborted connections", s.ProtocolErrors)
	}
	if busy < rounds/2 {
		t.Errorf("only %d of %d aborts had requests in flight", busy, rounds)
	}
	if err := verifyIO(sock, 2, 512, 64); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d aborts (%d with I/O in flight, %d requests in flight in all); state before %+v after %+v; then 64 x 2 KiB written and read back on two queues",
		rounds, busy, inflight, base, now)
}

// The helper process for TestFaultKillBench: the bench load against
// VT_FAULT_BENCH_SOCKET until it is killed.
func TestFaultBenchHelper(t *testing.T) {
	sock := os.Getenv("VT_FAULT_BENCH_SOCKET")
	if sock == "" {
		t.Skip("helper process for TestFaultKillBench")
	}
	_, err := runBench(benchOpts{socket: sock, rw: "randrw", bs: 4096, qd: 32, queues: 2, dur: time.Minute, mix: 50, queueSize: 256}, nil)
	t.Fatalf("bench ended before it was killed: %v", err)
}

// TestFaultKillBench runs the bench load generator in a child process and
// kills it with SIGKILL mid-run, three times: the kernel closes the socket
// and the memfds with no goodbye, as when QEMU is killed.
func TestFaultKillBench(t *testing.T) {
	if testing.Short() {
		t.Skip("starts child processes")
	}
	tg := startTarget(t, cfgText("[0]", "adaptive", faultConfig))
	c := tg.ctrl("c0")
	sock := tg.sock("c0")
	var base procState
	for i := 0; i < 3; i++ {
		if i == 0 {
			base = readProcState(t)
		}
		before := c.Stats.Snapshot()
		cmd := exec.Command(os.Args[0], "-test.run=^TestFaultBenchHelper$", "-test.v")
		cmd.Env = append(os.Environ(), "VT_FAULT_BENCH_SOCKET="+sock)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// Kill once the load is flowing on both queues.
		ok := waitFor(20*time.Second, func() bool {
			s := c.Stats.Snapshot()
			return len(s.Queues) == 2 && len(before.Queues) < 2 ||
				len(s.Queues) == 2 && s.Queues[0].Requests > before.Queues[0].Requests+1000 && s.Queues[1].Requests > before.Queues[1].Requests+1000
		})
		time.Sleep(200 * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		err := cmd.Wait()
		if !ok {
			t.Fatalf("bench load did not start:\n%s", out.String())
		}
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Fatalf("child: %v\n%s", err, out.String())
		}
		after := c.Stats.Snapshot()
		t.Logf("kill %d: %d requests served on the killed connection", i+1,
			after.Queues[0].Requests+after.Queues[1].Requests-before.Queues[0].Requests-before.Queues[1].Requests)
	}
	var now procState
	if !waitFor(10*time.Second, func() bool {
		now = readProcState(t)
		return c.Sessions() == 0 && now.fds == base.fds && now.memfdMaps == base.memfdMaps && now.goroutines <= base.goroutines+2
	}) {
		t.Fatalf("after SIGKILLs: %d sessions, state %+v, before %+v\n%s", c.Sessions(), now, base, goroutineDump())
	}
	if s := c.Stats.Snapshot(); s.ProtocolErrors != 0 {
		t.Errorf("%d protocol errors", s.ProtocolErrors)
	}
	if err := verifyIO(sock, 2, 512, 64); err != nil {
		t.Fatal(err)
	}
}

var (
	buildMu sync.Mutex
	builds  = map[string]string{} // build tags → binary
)

// buildBinary builds the daemon once per test process.
func buildBinary(t *testing.T) string { return buildTagged(t, "") }

// buildTagged builds the daemon with the given build tags (a debug build)
// once per test process.
func buildTagged(t *testing.T, tags string) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if bin, ok := builds[tags]; ok {
		return bin
	}
	dir, err := os.MkdirTemp("", "vt-bin-")
	if err != nil {
		t.Fatal(err)
	}
	goCmd, err := exec.LookPath("go")
	if err != nil {
		goCmd = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin := filepath.Join(dir, "vhost-target")
	out, err := exec.Command(goCmd, "build", "-tags", tags, "-o", bin, "vhost-target/cmd/vhost-target").CombinedOutput()
	if err != nil {
		t.Fatalf("go build -tags %q: %v\n%s", tags, err, out)
	}
	builds[tags] = bin
	return bin
}

// daemon is the built binary running on a config file.
type daemon struct {
	cmd  *exec.Cmd
	out  *logBuffer
	sock string
	done chan error
}

func startDaemon(t *testing.T, cfg string) *daemon {
	t.Helper()
	bin := buildBinary(t)
	dir := shortTempDir(t, "vt-daemon-")
	path := filepath.Join(dir, "target.toml")
	if err := os.WriteFile(path, []byte(fmt.Sprintf("socket_dir = %q\n", filepath.Join(dir, "sock"))+cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	d := &daemon{cmd: exec.Command(bin, "-c", path), out: &logBuffer{}, sock: filepath.Join(dir, "sock", "c0"), done: make(chan error, 1)}
	d.cmd.Stdout, d.cmd.Stderr = d.out, d.out
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.done <- d.cmd.Wait() }()
	t.Cleanup(func() {
		d.cmd.Process.Kill()
		<-d.done
	})
	if !waitFor(20*time.Second, func() bool { return strings.Contains(d.out.String(), "vhost-target ready") }) {
		t.Fatalf("daemon did not start:\n%s", d.out.String())
	}
	return d
}

// TestSignalDuringIO stops the daemon with SIGTERM (and SIGINT) while a
// front-end keeps 64 requests in flight on two queues. The front-end stops
// submitting, the signal goes out at once, and then every request it had
// submitted must come back completed in its used ring — the target drains
// and publishes before it closes the socket — and the process exits 0.
func TestSignalDuringIO(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the daemon binary")
	}
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			d := startDaemon(t, cfgText("[0]", "busy", faultConfig))
			dev, err := frontend.Dial(d.sock, loadOptions())
			if err != nil {
				t.Fatal(err)
			}
			defer dev.Abort()
			rng := rand.New(rand.NewSource(int64(sig)))
			qs := []*loadQueue{{q: dev.Queue(0), rng: rng, blocks: 64 << 20 / 512}, {q: dev.Queue(1), rng: rng, blocks: 64 << 20 / 512}}
			for end := time.Now().Add(300 * time.Millisecond); time.Now().Before(end); {
				for _, l := range qs {
					l.reap()
					l.fill()
				}
			}
			// Last submissions (kicked), then the signal.
			atSignal := 0
			for _, l := range qs {
				atSignal += l.inflight()
			}
			if err := d.cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(10 * time.Second)
			for {
				n := 0
				for _, l := range qs {
					l.reap()
					n += l.inflight()
				}
				if n == 0 || time.Now().After(deadline) {
					break
				}
				runtime.Gosched()
			}
			var exitErr error
			select {
			case exitErr = <-d.done:
			case <-time.After(15 * time.Second):
				t.Fatalf("daemon still running 15 s after %v:\n%s", sig, d.out.String())
			}
			d.done <- exitErr // for the cleanup
			submitted, completed, failed := 0, 0, 0
			for i, l := range qs {
				submitted += l.submitted
				completed += l.completed
				failed += l.failed
				if err := l.q.Err(); err != nil {
					t.Errorf("queue %d: %v", i, err)
				}
			}
			t.Logf("%v with %d requests in flight: %d submitted, %d completed, %d failed; exit %v",
				sig, atSignal, submitted, completed, failed, exitErr)
			if exitErr != nil {
				t.Errorf("daemon exit after %v: %v\n%s", sig, exitErr, d.out.String())
			}
			if completed != submitted || failed != 0 {
				t.Errorf("%d of %d requests never completed, %d failed", submitted-completed, submitted, failed)
			}
			if atSignal == 0 {
				t.Error("no request was in flight when the signal was sent")
			}
			log := d.out.String()
			if !strings.Contains(log, "stopped") || strings.Contains(log, "level=ERROR") {
				t.Errorf("daemon log:\n%s", log)
			}
			if _, err := os.Lstat(d.sock); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("socket left behind: %v", err)
			}
		})
	}
}

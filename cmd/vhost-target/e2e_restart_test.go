package main

// Restarting the target under a running VM (issue 11): QEMU 10 reconnects
// its vhost-user-scsi device (reconnect-ms) and, after a crash, the new
// process resubmits what was in flight through the INFLIGHT_SHMFD region.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"vhost-target/cmd/vhost-target/guest"
	"vhost-target/rpc"
)

// freeLoopbackAddr returns a loopback TCP address no one listens on now:
// the /metrics address every instance of a restarted target takes in turn.
func freeLoopbackAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// blkVariant turns oneLUNConfig's scsi controller into a blk controller
// over the same bdev.
func blkVariant(t *testing.T, text string) string {
	t.Helper()
	scsiLUN := "num_queues = 1\n[[controller.lun]]\ntarget = 0\nlun = 0\nbdev = \"f0\"\n"
	if !strings.Contains(text, scsiLUN) {
		t.Fatalf("oneLUNConfig changed; the blk variant needs its LUN: %s", text)
	}
	return strings.Replace(text, scsiLUN, "type = \"blk\"\nnum_queues = 1\nbdev = \"f0\"\n", 1)
}

// restartable is the target binary run as a separate process that a test
// stops and starts again on the same configuration.
type restartable struct {
	t    *testing.T
	bin  string
	cfg  string
	sock string
	rpc  string // its RPC socket: accepting once the controllers listen
	mu   sync.Mutex
	cmd  *exec.Cmd
	logs bytes.Buffer // every instance's stderr, in order
}

func (d *restartable) start() {
	d.t.Helper()
	cmd := exec.Command(d.bin, "-c", d.cfg)
	cmd.Stderr = &lockedWriter{mu: &d.mu, w: &d.logs}
	if err := cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	d.cmd = cmd
	// The new instance is up when its RPC socket accepts: it starts
	// after the controllers listen. (A SIGKILLed instance leaves its socket
	// files behind, so their existence says nothing; and a probe of the
	// controller socket would be a session QEMU could be refused beside.)
	if !waitFor(30*time.Second, func() bool {
		c, err := net.DialTimeout("unix", d.rpc, time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil
	}) {
		d.t.Fatalf("target did not come up:\n%s", d.log())
	}
}

// stop sends sig and waits for the process to exit.
func (d *restartable) stop(sig syscall.Signal) time.Duration {
	start := time.Now()
	d.cmd.Process.Signal(sig)
	d.cmd.Wait()
	return time.Since(start)
}

func (d *restartable) log() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.logs.String()
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// clatOutliers reads the guest's fio completion-latency outliers ("clat
// TIME_MS NSEC" lines: completion time since fio started, latency).
func clatOutliers(console string) (at []int64, lat []time.Duration) {
	for _, l := range strings.Split(console, "\n") {
		f := strings.Fields(strings.TrimSpace(l))
		if len(f) != 3 || f[0] != "clat" {
			continue
		}
		ms, err1 := strconv.ParseInt(f[1], 10, 64)
		ns, err2 := strconv.ParseInt(f[2], 10, 64)
		if err1 == nil && err2 == nil {
			at, lat = append(at, ms), append(lat, time.Duration(ns))
		}
	}
	return at, lat
}

// pauses returns, for each restart (ms after fio started, host clock), the
// longest guest completion latency of an I/O completed within 3 s after it:
// how long the guest's I/O stood still. Restarts with no outlier paused
// less than the outlier threshold and count as the threshold.
func pauses(console string, restarts []int64, threshold time.Duration) []time.Duration {
	at, lat := clatOutliers(console)
	out := make([]time.Duration, len(restarts))
	for i, r := range restarts {
		out[i] = threshold
		for j := range at {
			if at[j] >= r-500 && at[j] <= r+3000 {
				out[i] = max(out[i], lat[j])
			}
		}
	}
	return out
}

// testRestarts runs a guest doing fio with verify for 60 s on a file or aio
// LUN while the target is restarted with each of signals at random moments.
// The guest issues SYNCHRONIZE CACHE every half second (a heartbeat the test
// watches for stalls); with syncFirst the target is killed right after one
// completed. With blk the disk is a vhost-user-blk controller's (the guest's
// /dev/vda; its heartbeat is an fsync of the device, a virtio-blk FLUSH).
func testRestarts(t *testing.T, typ string, signals []syscall.Signal, syncFirst, blk bool) {
	img := guestImage(t)
	q := qemu10(t)
	dir := shortTempDir(t, "vt-rs-")
	disk := filepath.Join(backingDir(t), "restart.img")
	cfg := filepath.Join(dir, "t.toml")
	metricsAddr := freeLoopbackAddr(t) // for the instances' /metrics
	text := fmt.Sprintf("socket_dir = %q\n", dir) + oneLUNConfig(typ, disk, "256MiB", metricsAddr)
	dev, flush := "/dev/sda", "sg_sync /dev/sda"
	if blk {
		text = blkVariant(t, text)
		dev, flush = "/dev/vda", "dd if=/dev/null of=/dev/vda conv=fsync 2>/dev/null"
	}
	// VHOST_TARGET_RESTART_POLL=busy runs the reactor busy-polling.
	if p := os.Getenv("VHOST_TARGET_RESTART_POLL"); p != "" {
		text = strings.Replace(text, `poll = "adaptive"`, fmt.Sprintf("poll = %q", p), 1)
	}
	if err := os.WriteFile(cfg, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	d := &restartable{t: t, bin: buildBinary(t), cfg: cfg, sock: filepath.Join(dir, "c0"), rpc: filepath.Join(dir, "rpc.sock")}
	d.start()
	defer func() {
		if d.cmd.ProcessState == nil {
			d.stop(syscall.SIGTERM)
		}
	}()

	// SYNCHRONIZE CACHE every half second: the kill point of the sync
	// variant, and a heartbeat of the queue for the stall watch below.
	syncLoop := `(n=0; while [ -e /tmp/run ]; do ` + flush + ` && echo "synced $n"; n=$((n+1)); sleep 0.5; done) &
`
	script := shPrelude + `
touch /tmp/run
` + syncLoop + `echo fio-start
sec fio
fio --name=v --filename=` + dev + ` --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size=64m \
  --time_based --runtime=60 --verify=crc32c --verify_backlog=512 --do_verify=1 \
  --write_lat_log=/tmp/l --log_avg_msec=0 --output-format=terse > /tmp/fio.out 2>&1 || { cat /tmp/fio.out; exit 1; }
rm /tmp/run
echo fio-ok
sec clat
awk -F, '$2 > 50000000 { printf "clat %.0f %.0f\n", $1, $2 }' /tmp/l_clat.1.log
sec dmesg
dmesg | grep -ciE 'i/o error|blk_update_request|reset|abort' || true
`
	traceFile := filepath.Join(dir, "qemu-trace.log")
	start := newMarker("fio-start")
	synced := &syncWatcher{}
	done := make(chan struct{})
	var res *guest.Result
	var rerr error
	gctx, gcancel := context.WithCancel(context.Background())
	defer gcancel()
	go func() {
		defer close(done)
		res, rerr = guest.Run(gctx, guest.Options{Image: img, QEMU: q, MemoryMiB: 768,
			Console:     multiWriter{start, synced},
			Controllers: []guest.Controller{{Socket: d.sock, Blk: blk, Reconnect: 100 * time.Millisecond}},
			// QEMU's vhost-user messages and the interrupts it raises: a
			// failure shows the last of them.
			QEMUArgs: []string{"-D", traceFile, "-trace", "vhost_user_write", "-trace", "virtio_pci_notify",
				"-trace", "vhost_user_event"},
			Timeout: 6 * time.Minute, Script: script})
	}()
	select {
	case <-start.seen:
	case <-done:
		t.Fatalf("guest ended before fio: %v\n%s", rerr, consoleOf(res))
	}
	// A queue that stands still for 20 s: record where its requests are
	// (vhost_get_queue_states) while QEMU is still connected.
	var stall strings.Builder
	var stallMu sync.Mutex
	go func() {
		last, since := -1, time.Now()
		for {
			select {
			case <-done:
				return
			case <-time.After(time.Second):
			}
			synced.mu.Lock()
			n := synced.count
			synced.mu.Unlock()
			if n != last {
				last, since = n, time.Now()
				continue
			}
			if time.Since(since) > 20*time.Second {
				c, err := rpc.Dial(d.rpc)
				if err == nil {
					var st any
					err = c.Call(context.Background(), "vhost_get_queue_states", nil, &st)
					c.Close()
					stallMu.Lock()
					fmt.Fprintf(&stall, "no SYNCHRONIZE CACHE for 20 s after %d; queue states: %+v (err %v)\n", n, st, err)
					stallMu.Unlock()
				}
				// Tell a lost interrupt from a lost completion: write the
				// call eventfd the target holds, from outside, and see if
				// the guest goes on.
				msg := signalCallFDs(d.cmd.Process.Pid, d.rpc)
				revived := synced.waitBeyond(n, 15*time.Second, done)
				stallMu.Lock()
				fmt.Fprintf(&stall, "%s\nguest resumed within 15 s after that: %v\n", msg, revived)
				stallMu.Unlock()
				if !revived {
					gcancel() // nothing more to learn from this guest
				}
				d.cmd.Process.Signal(syscall.SIGUSR1)
				return
			}
		}
	}()
	fioStart := time.Now()
	var restarts []int64 // ms after fio started
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	for i, sig := range signals {
		time.Sleep(time.Duration(3000+rng.Intn(4000)) * time.Millisecond)
		if syncFirst && !synced.next(done) { // SYNCHRONIZE CACHE completed just now
			// The queue stands still: stop restarting and let the guest's
			// end (or its timeout) report the target's state.
			t.Errorf("no SYNCHRONIZE CACHE completed in 30 s before restart %d", i+1)
			break
		}
		restarts = append(restarts, time.Since(fioStart).Milliseconds())
		took := d.stop(sig)
		restart := time.Now()
		d.start()
		t.Logf("restart %d: %v (stop took %v), serving again after %v", i+1, sig, took.Round(time.Millisecond),
			time.Since(restart).Round(time.Millisecond))
	}
	<-done
	if rerr != nil || res.ExitCode != 0 {
		// What the target was doing: its counters, then its goroutines.
		var state strings.Builder
		if resp, err := http.Get("http://" + metricsAddr + "/metrics"); err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			for _, l := range strings.Split(string(b), "\n") {
				if strings.Contains(l, "in_flight") || strings.Contains(l, "queue_requests") || strings.Contains(l, "broken") ||
					strings.Contains(l, "reactor_sleeps") || strings.Contains(l, "lun_reads_total") || strings.Contains(l, "lun_writes_total") {
					state.WriteString(l + "\n")
				}
			}
		}
		d.cmd.Process.Signal(syscall.SIGQUIT) // Go prints every goroutine's stack
		d.cmd.Wait()
		stallMu.Lock()
		defer stallMu.Unlock()
		trace, _ := os.ReadFile(traceFile)
		if lines := strings.Split(string(trace), "\n"); len(lines) > 60 {
			trace = []byte(strings.Join(lines[len(lines)-60:], "\n"))
		}
		t.Fatalf("guest: %v\n%s\nstall: %s\ntarget metrics:\n%s\ntarget log:\n%s\nQEMU trace (last lines):\n%s", rerr, consoleOf(res),
			stall.String(), state.String(), d.log(), trace)
	}
	// Interrupts the guest waited for without having been sent one
	// (virtq.Unnotified): with QEMU TCG and one vCPU its barrier does not
	// reach us, and before the late notification such a run hung.
	for _, l := range strings.Split(d.log(), "\n") {
		if strings.Contains(l, "notification it was not sent") {
			t.Logf("late notification: %s", l)
		}
	}
	sec := sections(res.Console)
	if !strings.Contains(sec["fio"], "fio-ok") {
		t.Errorf("fio: %q", sec["fio"])
	}
	if n := strings.TrimSpace(sec["dmesg"]); n != "0" {
		t.Errorf("guest kernel logged %s I/O error/reset/abort lines", n)
	}
	ps := pauses(sec["clat"], restarts, 50*time.Millisecond)
	t.Logf("guest I/O pause per restart (longest fio completion latency within 3 s after it; 50ms = at most that): %v", ps)
	sort.Slice(ps, func(i, j int) bool { return ps[i] < ps[j] })
	if len(ps) > 0 {
		t.Logf("guest I/O pause over %d restarts: p50 %v, max %v", len(ps), ps[len(ps)/2].Round(time.Millisecond),
			ps[len(ps)-1].Round(time.Millisecond))
	}
	// For scale: the longest completion away from any restart (TCG stalls
	// a guest now and then by itself).
	at, lat := clatOutliers(sec["clat"])
	var background time.Duration
	for j := range at {
		near := false
		for _, r := range restarts {
			near = near || at[j] >= r-500 && at[j] <= r+3000
		}
		if !near {
			background = max(background, lat[j])
		}
	}
	t.Logf("%d completions over 50ms in the run; the longest away from a restart: %v", len(at), background.Round(time.Millisecond))
	if strings.Contains(d.log(), "level=ERROR") {
		t.Errorf("target logged errors:\n%s", d.log())
	}
}

// syncWatcher counts the guest's "synced N" lines.
type syncWatcher struct {
	mu    sync.Mutex
	count int
	tail  []byte
}

func (s *syncWatcher) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tail = append(s.tail, p...)
	for {
		i := bytes.IndexByte(s.tail, '\n')
		if i < 0 {
			break
		}
		if bytes.HasPrefix(bytes.TrimSpace(s.tail[:i]), []byte("synced ")) {
			s.count++
		}
		s.tail = s.tail[i+1:]
	}
	return len(p), nil
}

// next waits up to 30 s for a SYNCHRONIZE CACHE completed after the call;
// false when none came or the guest ended.
func (s *syncWatcher) next(done <-chan struct{}) bool {
	s.mu.Lock()
	n := s.count
	s.mu.Unlock()
	return s.waitBeyond(n, 30*time.Second, done)
}

// waitBeyond waits up to d for a count above n; false when none came or
// done was closed.
func (s *syncWatcher) waitBeyond(n int, d time.Duration, done <-chan struct{}) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		s.mu.Lock()
		c := s.count
		s.mu.Unlock()
		if c > n {
			return true
		}
		select {
		case <-done:
			return false
		case <-time.After(20 * time.Millisecond):
		}
	}
	return false
}

// signalCallFDs writes 1 to each running queue's call eventfd, taken from
// the target process with pidfd_getfd, and reports what it found: the
// eventfd's count before the write, and which other processes (QEMU) hold
// the same eventfd (matched by eventfd-id in fdinfo).
func signalCallFDs(pid int, rpcSock string) string {
	c, err := rpc.Dial(rpcSock)
	if err != nil {
		return fmt.Sprintf("signal: rpc: %v", err)
	}
	var sts []struct {
		Vring, Call int
		Signals     uint64
	}
	err = c.Call(context.Background(), "vhost_get_queue_states", nil, &sts)
	c.Close()
	if err != nil {
		return fmt.Sprintf("signal: states: %v", err)
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return fmt.Sprintf("signal: pidfd_open: %v", err)
	}
	defer unix.Close(pidfd)
	var out strings.Builder
	for _, st := range sts {
		if st.Call < 0 {
			continue
		}
		info, _ := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%d", pid, st.Call))
		id := fdinfoField(string(info), "eventfd-id")
		fmt.Fprintf(&out, "vring %d call fd %d (signals %d) %s count %s; held by:", st.Vring, st.Call, st.Signals, id,
			fdinfoField(string(info), "eventfd-count"))
		procs, _ := filepath.Glob("/proc/[0-9]*/fdinfo/*")
		for _, f := range procs {
			if strings.HasPrefix(f, fmt.Sprintf("/proc/%d/", pid)) {
				continue
			}
			b, err := os.ReadFile(f)
			if err == nil && id != "" && fdinfoField(string(b), "eventfd-id") == id {
				comm, _ := os.ReadFile(filepath.Join(filepath.Dir(filepath.Dir(f)), "comm"))
				fmt.Fprintf(&out, " %s %s (count %s)", strings.TrimSpace(string(comm)), f, fdinfoField(string(b), "eventfd-count"))
			}
		}
		fd, err := unix.PidfdGetfd(pidfd, st.Call, 0)
		if err != nil {
			fmt.Fprintf(&out, "; pidfd_getfd: %v\n", err)
			continue
		}
		_, err = unix.Write(fd, []byte{1, 0, 0, 0, 0, 0, 0, 0})
		unix.Close(fd)
		fmt.Fprintf(&out, "; wrote 1 (err %v)\n", err)
	}
	return out.String()
}

func fdinfoField(info, key string) string {
	for _, l := range strings.Split(info, "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == key {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

type multiWriter []interface{ Write([]byte) (int, error) }

func (m multiWriter) Write(p []byte) (int, error) {
	for _, w := range m {
		w.Write(p)
	}
	return len(p), nil
}

// TestGuestRestart: fio verify for 60 s on a file LUN while the target is
// restarted three times with SIGTERM (drain, exit) and three times with
// SIGKILL, in a random order at random moments; QEMU 10 reconnects each
// time. fio finishes with no error and no verify failure, and the guest
// kernel logs no I/O error.
func TestGuestRestart(t *testing.T) {
	sigs := []syscall.Signal{syscall.SIGTERM, syscall.SIGTERM, syscall.SIGTERM, syscall.SIGKILL, syscall.SIGKILL, syscall.SIGKILL}
	rand.Shuffle(len(sigs), func(i, j int) { sigs[i], sigs[j] = sigs[j], sigs[i] })
	testRestarts(t, "file", sigs, false, false)
}

// TestGuestRestartBlk: the same on a vhost-user-blk controller (issue 13),
// twice SIGTERM and twice SIGKILL in a random order: QEMU's
// vhost-user-blk reconnects and resubmits from the inflight area.
func TestGuestRestartBlk(t *testing.T) {
	sigs := []syscall.Signal{syscall.SIGTERM, syscall.SIGTERM, syscall.SIGKILL, syscall.SIGKILL}
	rand.Shuffle(len(sigs), func(i, j int) { sigs[i], sigs[j] = sigs[j], sigs[i] })
	testRestarts(t, "file", sigs, false, true)
}

// TestGuestRestartAIOSync: the same on an aio LUN, killed (SIGKILL) three
// times right after a SYNCHRONIZE CACHE completed; fio's verify and a final
// read-back check the data.
func TestGuestRestartAIOSync(t *testing.T) {
	testRestarts(t, "aio", []syscall.Signal{syscall.SIGKILL, syscall.SIGKILL, syscall.SIGKILL}, true, false)
}

// TestGuestRestartBlkWritethrough: a guest that switched its virtio-blk
// disk to write through (cache_type, one SET_CONFIG from QEMU) keeps that
// mode across a target crash. QEMU 10 reconnects but does not send the
// config again; the restarted target reads the mode from the inflight area
// the first one allocated and QEMU handed back, and flushes each write
// before completing it. Counted on the new process's /metrics: 50 direct
// writes after the restart, at least 50 flushes (none before this fix: the
// restarted target served writeback while the guest sent no flushes).
func TestGuestRestartBlkWritethrough(t *testing.T) {
	img := guestImage(t)
	q := qemu10(t)
	dir := shortTempDir(t, "vt-wt-")
	metricsAddr := freeLoopbackAddr(t)
	text := fmt.Sprintf("socket_dir = %q\n", dir) +
		blkVariant(t, oneLUNConfig("file", filepath.Join(backingDir(t), "wt.img"), "64MiB", metricsAddr))
	cfg := filepath.Join(dir, "t.toml")
	if err := os.WriteFile(cfg, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	d := &restartable{t: t, bin: buildBinary(t), cfg: cfg, sock: filepath.Join(dir, "c0"), rpc: filepath.Join(dir, "rpc.sock")}
	d.start()
	defer func() {
		if d.cmd.ProcessState == nil {
			d.stop(syscall.SIGTERM)
		}
	}()
	p := newPhases("wt", "written")
	done := make(chan struct{})
	var res *guest.Result
	var rerr error
	go func() {
		defer close(done)
		res, rerr = guest.Run(context.Background(), guest.Options{Image: img, QEMU: q, Console: p,
			Controllers: []guest.Controller{{Socket: d.sock, Blk: true, Reconnect: 100 * time.Millisecond}},
			Script: shPrelude + `
sec mode
cat /sys/block/vda/cache_type
echo "write through" > /sys/block/vda/cache_type
cat /sys/block/vda/cache_type
echo "phase wt"
sleep 8
sec writes
dd if=/dev/urandom of=/dev/vda bs=4k count=50 oflag=direct 2>/dev/null && echo writes-ok
cat /sys/block/vda/cache_type
echo "phase written"
sleep 1
`, Timeout: 4 * time.Minute})
	}()
	p.wait(t, "wt", done, &res, &rerr)
	d.stop(syscall.SIGKILL)
	d.start()
	p.wait(t, "written", done, &res, &rerr)
	var flushes, writes float64
	for k, v := range scrape(t, metricsAddr) {
		switch {
		case strings.HasPrefix(k, "vhost_target_lun_flushes_total{"):
			flushes += v
		case strings.HasPrefix(k, "vhost_target_lun_writes_total{"):
			writes += v
		}
	}
	<-done
	if rerr != nil || res.ExitCode != 0 {
		t.Fatalf("guest: %v\n%s", rerr, consoleOf(res))
	}
	secs := sections(res.Console)
	wantMatch(t, "mode", section(t, secs, "mode"), `^write back\nwrite through$`)
	wantMatch(t, "writes", section(t, secs, "writes"), `^writes-ok\nwrite through$`)
	if writes < 50 || flushes < 50 {
		t.Errorf("after the restart the target counted %v writes and %v flushes, want at least 50 of each "+
			"(each write flushed in write through)\n%s", writes, flushes, d.log())
	}
	if !strings.Contains(d.log(), "cache mode restored from the inflight area") {
		t.Errorf("the restarted target did not log the restored cache mode:\n%s", d.log())
	}
	t.Logf("after the restart: %v writes, %v flushes", writes, flushes)
}

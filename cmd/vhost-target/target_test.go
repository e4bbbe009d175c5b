package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"vhost-target/vhost/frontend"
)

func rw16(op byte, lba uint64, blocks uint32) []byte {
	c := make([]byte, 16)
	c[0] = op
	binary.BigEndian.PutUint64(c[2:], lba)
	binary.BigEndian.PutUint32(c[10:], blocks)
	return c
}

// scrape fetches /metrics and returns sample values by "name{labels}".
func scrape(t *testing.T, addr string) map[string]float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	m := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("bad sample %q", line)
		}
		m[line[:i]] = v
	}
	return m
}

func cfgText(cpus, poll string, extra string) string {
	return fmt.Sprintf(`
[metrics]
listen = "127.0.0.1:0"
[reactors]
cpus = %s
poll = %q
`, cpus, poll) + extra
}

// TestMetricsMatchIO issues a known set of commands and checks the per-LUN
// counters on /metrics count exactly those.
func TestMetricsMatchIO(t *testing.T) {
	tg := startTarget(t, cfgText("[0]", "adaptive", `
[[bdev]]
name = "m0"
type = "malloc"
size = "16MiB"
block_size = 512
[[controller]]
name = "c0"
num_queues = 1
[[controller.lun]]
target = 0
lun = 0
bdev = "m0"
`))
	dev, err := frontend.Dial(tg.sock("c0"), frontend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	const writes, reads = 7, 5
	for i := 0; i < writes; i++ {
		r, err := dev.Do(frontend.Command{CDB: rw16(0x8a, uint64(i*8), 8), DataOut: make([]byte, 4096)})
		if err != nil || r.Status != 0 {
			t.Fatalf("write: %v %+v", err, r)
		}
	}
	for i := 0; i < reads; i++ {
		r, err := dev.Do(frontend.Command{CDB: rw16(0x88, uint64(i), 2), DataInLen: 1024})
		if err != nil || r.Status != 0 {
			t.Fatalf("read: %v %+v", err, r)
		}
	}
	dev.Do(frontend.Command{CDB: []byte{0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0}})             // SYNCHRONIZE CACHE(10)
	dev.Do(frontend.Command{CDB: rw16(0x88, 1<<40, 1), DataInLen: 512})                // LBA out of range
	r, _ := dev.Do(frontend.Command{CDB: []byte{0x12, 0, 0, 0, 36, 0}, DataInLen: 36}) // INQUIRY: not block I/O
	if r.Status != 0 {
		t.Fatalf("inquiry status %d", r.Status)
	}
	m := scrape(t, tg.metricsAddr)
	l := `{bdev="m0",controller="c0",lun="0",target="0"}`
	want := map[string]float64{
		"vhost_target_lun_writes_total" + l:             writes,
		"vhost_target_lun_reads_total" + l:              reads,
		"vhost_target_lun_written_bytes_total" + l:      writes * 4096,
		"vhost_target_lun_read_bytes_total" + l:         reads * 1024,
		"vhost_target_lun_flushes_total" + l:            1,
		"vhost_target_lun_io_latency_seconds_count" + l: writes + reads + 1,
		"vhost_target_lun_io_in_flight" + l:             0,
		`vhost_target_lun_errors_total{bdev="m0",controller="c0",kind="illegal_request",lun="0",target="0"}`: 1,
		`vhost_target_lun_errors_total{bdev="m0",controller="c0",kind="medium_error",lun="0",target="0"}`:    0,
		`vhost_target_queue_requests_total{controller="c0",queue="0"}`:                                       writes + reads + 3,
		`vhost_target_sessions{controller="c0"}`:                                                             1,
	}
	for k, v := range want {
		got, ok := m[k]
		if !ok {
			t.Errorf("metric %s missing", k)
		} else if got != v {
			t.Errorf("%s = %v, want %v", k, got, v)
		}
	}
	if m[`vhost_target_reactor_poll_iterations_total{cpu="0",reactor="0"}`] == 0 {
		t.Error("reactor iterations not counted")
	}
}

// TestTwoReactors serves two controllers and a controller whose two request
// queues span both reactors, in both poll modes, with verified I/O.
func TestTwoReactors(t *testing.T) {
	for _, poll := range []string{"busy", "adaptive"} {
		t.Run(poll, func(t *testing.T) {
			tg := startTarget(t, cfgText("[0, 1]", poll, `
[[bdev]]
name = "a"
type = "malloc"
size = "16MiB"
[[bdev]]
name = "b"
type = "malloc"
size = "16MiB"
block_size = 4096
[[bdev]]
name = "s"
type = "malloc"
size = "16MiB"
[[controller]]
name = "ca"
cpus = [0]
num_queues = 1
[[controller.lun]]
target = 0
lun = 0
bdev = "a"
[[controller]]
name = "cb"
cpus = [1]
num_queues = 1
[[controller.lun]]
target = 0
lun = 0
bdev = "b"
[[controller]]
name = "span"
cpus = [0, 1]
num_queues = 2
[[controller.lun]]
target = 0
lun = 0
bdev = "s"
`))
			type job struct {
				ctrl   string
				queues int
				bs     int
			}
			jobs := []job{{"ca", 1, 512}, {"cb", 1, 4096}, {"span", 2, 512}}
			errc := make(chan error, len(jobs))
			for _, j := range jobs {
				go func(j job) { errc <- verifyIO(tg.sock(j.ctrl), j.queues, j.bs, 200) }(j)
			}
			for range jobs {
				if err := <-errc; err != nil {
					t.Fatal(err)
				}
			}
			span := tg.ctrl("span")
			s := span.Stats.Snapshot()
			if s.Queues[0].Requests == 0 || s.Queues[1].Requests == 0 {
				t.Fatalf("spanning controller: requests per queue %+v, want both > 0", s.Queues)
			}
			for _, r := range tg.reactors {
				if r.Stats.BusyNanos.Load() == 0 {
					t.Errorf("reactor %d did no work", r.ID())
				}
			}
		})
	}
}

// verifyIO writes random data through every queue of a fresh front-end and
// reads it back.
func verifyIO(socket string, queues, bs, n int) error {
	dev, err := frontend.Dial(socket, frontend.Options{NumQueues: queues})
	if err != nil {
		return err
	}
	defer dev.Close()
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	for i := 0; i < n; i++ {
		q := i % queues
		lba := uint64(rng.Intn(1000)) * 4
		data := make([]byte, 4*bs)
		rng.Read(data)
		r, err := dev.Do(frontend.Command{Queue: q, CDB: rw16(0x8a, lba, 4), DataOut: data, Segments: 1 + i%3})
		if err != nil || r.Response != 0 || r.Status != 0 {
			return fmt.Errorf("%s queue %d write: %v %+v", socket, q, err, r)
		}
		r, err = dev.Do(frontend.Command{Queue: (q + 1) % queues, CDB: rw16(0x88, lba, 4), DataInLen: len(data)})
		if err != nil || r.Response != 0 || r.Status != 0 {
			return fmt.Errorf("%s queue %d read: %v %+v", socket, q, err, r)
		}
		if !bytes.Equal(r.DataIn, data) {
			return fmt.Errorf("%s: data read back at LBA %d differs", socket, lba)
		}
	}
	return nil
}

// TestFlushSurvivesKill writes through the real daemon to file and aio LUNs,
// sends SYNCHRONIZE CACHE, kills the daemon with SIGKILL, and reads the
// backing files: every acknowledged write after the flush is there.
func TestFlushSurvivesKill(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "vhost-target")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	dir := backingDir(t)
	sockDir := t.TempDir()
	cfg := filepath.Join(dir, "t.toml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`socket_dir = %q
[metrics]
listen = ""
[reactors]
cpus = [0]
poll = "adaptive"
[[bdev]]
name = "f"
type = "file"
path = "%[2]s/f.img"
create = true
size = "16MiB"
[[bdev]]
name = "u"
type = "aio"
path = "%[2]s/u.img"
create = true
size = "16MiB"
block_size = 4096
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
`, sockDir, dir)), 0o644)
	cmd := exec.Command(bin, "-c", cfg)
	var logs bytes.Buffer
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	sock := filepath.Join(sockDir, "c0")
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		time.Sleep(25 * time.Millisecond)
	}
	dev, err := frontend.Dial(sock, frontend.Options{})
	if err != nil {
		t.Fatalf("%v\n%s", err, logs.String())
	}
	rng := rand.New(rand.NewSource(1))
	want := map[string][]byte{}
	for tgt, name := range []string{"f", "u"} {
		bs := []int{512, 4096}[tgt]
		img := make([]byte, 2<<20)
		for i := 0; i < 64; i++ {
			lba := uint64(rng.Intn(len(img)/bs - 8))
			data := make([]byte, 8*bs)
			rng.Read(data)
			r, err := dev.Do(frontend.Command{Target: uint8(tgt), CDB: rw16(0x8a, lba, 8), DataOut: data, Segments: 1 + i%3})
			if err != nil || r.Response != 0 || r.Status != 0 {
				t.Fatalf("write %s: %v %+v", name, err, r)
			}
			copy(img[lba*uint64(bs):], data)
		}
		r, err := dev.Do(frontend.Command{Target: uint8(tgt), CDB: []byte{0x91, 15: 0}}) // SYNCHRONIZE CACHE(16)
		if err != nil || r.Response != 0 || r.Status != 0 {
			t.Fatalf("sync %s: %v %+v", name, err, r)
		}
		want[name] = img
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	dev.Abort()
	for name, img := range want {
		got, err := os.ReadFile(filepath.Join(dir, name+".img"))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got[:len(img)], img) {
			t.Errorf("%s: data acknowledged before SYNCHRONIZE CACHE is missing after SIGKILL", name)
		}
	}
}

//go:build rbd

package main

// The rbd bdev through the whole target against fio's own rbd engine
// (issue 14's goal: >= 0.9x): the same image, the same 4 KiB random
// workload at queue depth 32, rounds alternating. Opt-in (a measurement,
// asserts nothing about speed): VHOST_TARGET_RBD_PERF=1.

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"vhost-target/bdev/rbd/cephtest"
)

func TestRBDBenchVersusFio(t *testing.T) {
	if os.Getenv("VHOST_TARGET_RBD_PERF") == "" {
		t.Skip("a performance comparison of a few minutes: VHOST_TARGET_RBD_PERF=1 runs it")
	}
	if _, err := exec.LookPath("fio"); err != nil {
		t.Skip("no fio on the host (apt-get install fio)")
	}
	c := cephtest.Start(t)
	const size = 1 << 30
	c.CreateImage(t, "perf", size)
	c.Fill(t, "perf", size)
	poll := "adaptive"
	if p := os.Getenv("VHOST_TARGET_RBD_POLL"); p != "" {
		poll = p
	}
	rounds := 3
	if n, err := strconv.Atoi(os.Getenv("VHOST_TARGET_RBD_ROUNDS")); err == nil && n > 0 {
		rounds = n
	}
	// VHOST_TARGET_RBD_SPLIT=1: the cluster's daemons on CPU 1, the client
	// side (fio and its librbd, or this process: reactor, bench, librbd) on
	// CPU 0 (run the test under taskset -c 0), as with a remote cluster.
	benchCPU := 1
	if os.Getenv("VHOST_TARGET_RBD_SPLIT") != "" {
		c.PinDaemons(t, "1")
		c.FioCPUs = "0"
		benchCPU = 0
	}
	dir := shortTempDir(t, "vt-rbdb-")
	var sb strings.Builder
	fmt.Fprintf(&sb, "[metrics]\nlisten = \"\"\n[reactors]\ncpus = [0]\npoll = %q\n", poll)
	sb.WriteString(rbdBdev(c, "perf", "perf", 512, "queue_depth = 128\n"))
	sb.WriteString("[[controller]]\nname = \"s0\"\nnum_queues = 1\n[[controller.lun]]\ntarget = 0\nlun = 0\nbdev = \"perf\"\n")
	tg := startTargetWith(t, sb.String(), targetOpts{dir: dir})
	sock := filepath.Join(dir, "s0")
	const secs = 5
	// fio twice: with librbd's defaults (rbd_cache on, write-around) and
	// with the cache off as the target runs it.
	noCache := "CEPH_ARGS=--rbd_cache=false"
	for _, rw := range []string{"randread", "randwrite"} {
		var ours, fio, fioNC float64
		for r := 0; r < rounds; r++ {
			// The load generator waits for completion interrupts as a
			// guest does: busy-polling, it would take one of the cores
			// the OSD needs on a small host.
			res, err := runBench(benchOpts{socket: sock, rw: rw, bs: 4096, qd: 32, queues: 1, dur: secs * time.Second,
				cpus: []int{benchCPU}, interrupts: true}, nil)
			if err != nil {
				t.Fatalf("bench: %v", err)
			}
			f := c.FioIOPS(t, "perf", rw, 4096, 32, secs*time.Second)
			fnc := c.FioIOPS(t, "perf", rw, 4096, 32, secs*time.Second, noCache)
			t.Logf("%s 4 KiB QD32 round %d: target (vhost-user-scsi, reactor %s) %.0f IOPS (%s); fio --ioengine=rbd %.0f IOPS, with %s %.0f IOPS",
				rw, r, poll, res.IOPS(), res, f, noCache, fnc)
			ours, fio, fioNC = ours+res.IOPS(), fio+f, fioNC+fnc
		}
		n := float64(rounds)
		t.Logf("%s 4 KiB QD32: target %.0f IOPS; fio %.0f IOPS (%.2fx), fio without the cache %.0f IOPS (%.2fx)",
			rw, ours/n, fio/n, ours/fio, fioNC/n, ours/fioNC)
	}
	tg.Stop()
}

// Package cephtest starts a one-host Ceph cluster for the rbd bdev's tests
// (issue 14): one monitor and one OSD whose BlueStore lives in a sparse file,
// cephx on, bound to 127.0.0.1, all of it under a temporary directory that
// goes with the test. It needs root and Debian's Ceph packages, which it
// installs when they are missing (as the guest tests install QEMU).
package cephtest

import (
	"bytes"
	_ "embed"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

//go:embed start-cluster.sh
var startScript []byte

// Packages are the Debian packages the cluster and the rbd bdev need.
var Packages = []string{"ceph-mon", "ceph-osd", "ceph-common", "librbd-dev"}

// Cluster is a running one-host cluster.
type Cluster struct {
	Dir     string // everything of the cluster: config, keyrings, daemon data, logs
	Conf    string // ceph.conf
	Keyring string // client.admin's keyring
	User    string // client id: "admin"
	Pool    string // a replicated pool (size 1) initialised for rbd
	MonAddr string // 127.0.0.1:port
	// Started is how long the cluster took to come up, pool included.
	Started time.Duration
	// FioCPUs, when set, runs FioIOPS's fio under `taskset -c FioCPUs`.
	FioCPUs string
	osdID   string
}

// Start brings up a cluster and stops it when the test ends. It fails the
// test (it does not skip) when it cannot.
func Start(t testing.TB) *Cluster {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("cephtest: a Ceph cluster needs root")
	}
	Install(t)
	begin := time.Now()
	dir, err := os.MkdirTemp("/var/tmp", "vt-ceph-") // not tmpfs: BlueStore opens its file O_DIRECT
	if err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	c := &Cluster{Dir: dir, Conf: filepath.Join(dir, "ceph.conf"), Keyring: filepath.Join(dir, "keyring"),
		User: "admin", Pool: "rbd", MonAddr: "127.0.0.1:" + strconv.Itoa(port)}
	t.Cleanup(func() {
		c.stopDaemons(t)
		if !t.Failed() {
			os.RemoveAll(dir)
		} else {
			t.Logf("cephtest: cluster left in %s for inspection", dir)
		}
	})
	script := filepath.Join(dir, "start-cluster.sh")
	if err := os.WriteFile(script, startScript, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("/bin/bash", script, dir, strconv.Itoa(port)).CombinedOutput(); err != nil {
		t.Fatalf("cephtest: starting the cluster: %v\n%s\n%s", err, out, c.logTail())
	}
	id, err := os.ReadFile(filepath.Join(dir, "osd-id"))
	if err != nil {
		t.Fatal(err)
	}
	c.osdID = strings.TrimSpace(string(id))
	c.Ceph(t, "osd", "pool", "create", c.Pool, "8")
	c.RBD(t, "pool", "init", c.Pool)
	c.Started = time.Since(begin)
	t.Logf("cephtest: cluster up in %v (mon %s, osd.%s, pool %s) in %s", c.Started.Round(time.Millisecond),
		c.MonAddr, c.osdID, c.Pool, dir)
	return c
}

// Install installs Packages with apt-get when a command of them is missing.
func Install(t testing.TB) {
	t.Helper()
	missing := false
	for _, cmd := range []string{"ceph-mon", "ceph-osd", "ceph", "rbd"} {
		if _, err := exec.LookPath(cmd); err != nil {
			missing = true
		}
	}
	if _, err := os.Stat("/usr/include/rbd/librbd.h"); err != nil {
		missing = true
	}
	if !missing {
		return
	}
	t.Logf("cephtest: installing %s", strings.Join(Packages, " "))
	// go test runs packages in parallel, and each may install: apt waits
	// for another apt's lock (up to 10 min) instead of failing on it, as CI
	// on a fresh machine did. A stale package list is refreshed once.
	apt := func(args ...string) ([]byte, error) {
		cmd := exec.Command("apt-get", append([]string{"-o", "DPkg::Lock::Timeout=600", "-q"}, args...)...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		return cmd.CombinedOutput()
	}
	install := append([]string{"install", "-y", "--no-install-recommends"}, Packages...)
	out, err := apt(install...)
	if err != nil {
		if uout, uerr := apt("update"); uerr != nil {
			t.Fatalf("cephtest: apt-get update: %v\n%s", uerr, tail(uout, 40))
		}
		out, err = apt(install...)
	}
	if err != nil {
		t.Fatalf("cephtest: apt-get install %s: %v\n%s", strings.Join(Packages, " "), err, tail(out, 40))
	}
}

// Ceph runs the ceph CLI against the cluster and returns its output.
func (c *Cluster) Ceph(t testing.TB, args ...string) string {
	t.Helper()
	return c.run(t, "ceph", append([]string{"-c", c.Conf, "--connect-timeout", "30"}, args...)...)
}

// RBD runs the rbd CLI against the cluster and returns its output.
func (c *Cluster) RBD(t testing.TB, args ...string) string {
	t.Helper()
	return c.run(t, "rbd", append([]string{"-c", c.Conf}, args...)...)
}

// CreateImage creates image name of size bytes in the pool.
func (c *Cluster) CreateImage(t testing.TB, name string, size uint64) {
	t.Helper()
	c.RBD(t, "create", "--size", strconv.FormatUint(size>>20, 10)+"M", c.Pool+"/"+name)
}

// Export reads image name whole through `rbd export` (another client than
// the one under test).
func (c *Cluster) Export(t testing.TB, name string) []byte {
	t.Helper()
	f := filepath.Join(c.Dir, "export-"+name)
	os.Remove(f)
	c.RBD(t, "export", "--no-progress", c.Pool+"/"+name, f)
	b, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(f)
	return b
}

// Fill writes image name's first size bytes (rbd bench, 4 MiB sequential
// writes), so reads hit objects as they would on a used disk rather than
// holes librbd answers without asking an OSD.
func (c *Cluster) Fill(t testing.TB, name string, size uint64) {
	t.Helper()
	c.RBD(t, "bench", "--io-type", "write", "--io-size", "4M", "--io-total", strconv.FormatUint(size>>20, 10)+"M",
		"--io-pattern", "seq", c.Pool+"/"+name)
}

// FioIOPS runs `fio --ioengine=rbd` (librbd in fio's process) on image name
// for d with random bs-byte reads or writes (rw: randread, randwrite) at
// queue depth qd, and returns its IOPS. env is added to fio's environment
// (CEPH_ARGS=--rbd_cache=false runs librbd without its cache).
func (c *Cluster) FioIOPS(t testing.TB, name, rw string, bs, qd int, d time.Duration, env ...string) float64 {
	t.Helper()
	args := []string{"--name=vt", "--ioengine=rbd", "--clientname=" + c.User, "--pool=" + c.Pool,
		"--rbdname=" + name, "--rw=" + rw, "--bs=" + strconv.Itoa(bs), "--iodepth=" + strconv.Itoa(qd),
		"--runtime=" + strconv.Itoa(int(d.Seconds())), "--time_based", "--direct=1", "--output-format=json"}
	cmd := exec.Command("fio", args...)
	if c.FioCPUs != "" {
		cmd = exec.Command("taskset", append([]string{"-c", c.FioCPUs, "fio"}, args...)...)
	}
	cmd.Env = append(append(os.Environ(), "CEPH_CONF="+c.Conf), env...)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("cephtest: %s CEPH_CONF=%s fio %s: %v\n%s", strings.Join(env, " "), c.Conf, strings.Join(args, " "), err, out)
	}
	var res struct {
		Jobs []struct {
			Read, Write struct{ IOPS float64 }
		}
	}
	if i := bytes.IndexByte(out, '{'); i < 0 || json.Unmarshal(out[i:], &res) != nil || len(res.Jobs) != 1 {
		t.Fatalf("cephtest: fio output:\n%s", out)
	}
	return res.Jobs[0].Read.IOPS + res.Jobs[0].Write.IOPS
}

// PinDaemons binds every thread of the monitor and the OSD to cpus (a
// taskset list such as "1"), so a measurement can give the cluster and the
// client separate CPUs, as a remote cluster has its own.
func (c *Cluster) PinDaemons(t testing.TB, cpus string) {
	t.Helper()
	for _, p := range []string{"osd." + c.osdID + ".pid", "mon.a.pid"} {
		b, err := os.ReadFile(filepath.Join(c.Dir, p))
		if err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("taskset", "-a", "-p", "-c", cpus, strings.TrimSpace(string(b))).CombinedOutput(); err != nil {
			t.Fatalf("cephtest: taskset %s: %v\n%s", p, err, out)
		}
	}
}

// StopOSD stops the OSD (SIGTERM, then waits for it to exit); StartOSD
// starts it again on the same store.
func (c *Cluster) StopOSD(t testing.TB) {
	t.Helper()
	if err := stopPID(filepath.Join(c.Dir, "osd."+c.osdID+".pid"), 30*time.Second); err != nil {
		t.Fatalf("cephtest: stopping osd.%s: %v", c.osdID, err)
	}
}

// StartOSD starts the OSD stopped by StopOSD.
func (c *Cluster) StartOSD(t testing.TB) {
	t.Helper()
	c.run(t, "ceph-osd", "-c", c.Conf, "-i", c.osdID, "--keyring", filepath.Join(c.Dir, "osd", "ceph-"+c.osdID, "keyring"))
}

func (c *Cluster) run(t testing.TB, name string, args ...string) string {
	t.Helper()
	var out bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatalf("cephtest: %s: %v", name, err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("cephtest: %s %s: %v\n%s", name, strings.Join(args, " "), err, out.String())
		}
	case <-time.After(2 * time.Minute):
		cmd.Process.Kill()
		t.Fatalf("cephtest: %s %s: no answer in 2 minutes\n%s\n%s", name, strings.Join(args, " "), out.String(), c.logTail())
	}
	return out.String()
}

// stopDaemons stops the OSD, then the monitor.
func (c *Cluster) stopDaemons(t testing.TB) {
	for _, p := range []string{"osd." + c.osdID + ".pid", "mon.a.pid"} {
		if err := stopPID(filepath.Join(c.Dir, p), 30*time.Second); err != nil {
			t.Logf("cephtest: %s: %v", p, err)
		}
	}
}

// stopPID sends SIGTERM to the daemon whose pid file is path and waits for
// it to go (SIGKILL after timeout). A missing file is a daemon not running.
func stopPID(path string, timeout time.Duration) error {
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return fmt.Errorf("pid file %s: %w", path, err)
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		os.Remove(path)
		return nil // already gone
	}
	deadline := time.Now().Add(timeout)
	for syscall.Kill(pid, 0) == nil {
		if time.Now().After(deadline) {
			syscall.Kill(pid, syscall.SIGKILL)
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	os.Remove(path)
	return nil
}

// logTail is the end of every daemon log, for failures.
func (c *Cluster) logTail() string {
	var b strings.Builder
	logs, _ := filepath.Glob(filepath.Join(c.Dir, "log", "*"))
	for _, l := range logs {
		data, err := os.ReadFile(l)
		if err != nil {
			continue
		}
		fmt.Fprintf(&b, "--- %s\n%s\n", filepath.Base(l), tail(data, 20))
	}
	return b.String()
}

func tail(b []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// freePort returns a TCP port free on 127.0.0.1 now.
func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

package kiotest

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"vhost-target/bdev"
)

// helperEnv tells a re-executed test binary that it is the writer.
const helperEnv = "KIOTEST_DURABILITY_FILE"

// Pattern is what the durability writer puts in block i of its 64 KiB.
func pattern(buf []byte) {
	for i := range buf {
		buf[i] = byte(i*7 + i/4096)
	}
}

// Durability checks that data written and flushed through a bdev survives
// the death of the process: the test binary re-executes itself (running only
// the calling test, with helperEnv set); that child opens the file, writes,
// flushes, prints "ready" and then waits to be killed with SIGKILL. The
// parent kills it, opens the file again and reads the data back. testName is
// the calling test's name; open makes the bdev over path.
//
// A test calls it first thing: in the child it never returns.
func Durability(t *testing.T, testName string, open func(path string) (bdev.Bdev, error)) {
	if path := os.Getenv(helperEnv); path != "" {
		durabilityChild(t, path, open)
		return
	}
	path := DirectDir(t) + "/durable.img"
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^"+testName+"$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperEnv+"="+path)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if strings.TrimSpace(sc.Text()) == "ready" {
				ready <- true
				return
			}
		}
		ready <- false
	}()
	select {
	case ok := <-ready:
		if !ok {
			cmd.Wait()
			t.Fatal("the writer exited without writing")
		}
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		t.Fatal("the writer did not get ready in 30 s")
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err == nil || !strings.Contains(err.Error(), "killed") {
		t.Fatalf("writer exit: %v, want killed", err)
	}
	d, err := open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ch, err := d.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	buf := Mem(t, 64<<10)
	want := make([]byte, 64<<10)
	pattern(want)
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpRead, Offset: 128 << 10, Len: 64 << 10, Iov: [][]byte{buf}}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, want) {
		t.Fatal("data written and flushed by the killed process is not in the file")
	}
}

func durabilityChild(t *testing.T, path string, open func(path string) (bdev.Bdev, error)) {
	d, err := open(path)
	if err != nil {
		t.Fatal(err)
	}
	ch, err := d.Open()
	if err != nil {
		t.Fatal(err)
	}
	buf := Mem(t, 64<<10)
	pattern(buf)
	// Unaligned iovecs: the bounce path must be durable too.
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpWrite, Offset: 128 << 10, Len: 64 << 10,
		Iov: [][]byte{buf[:1000], buf[1000:40000], buf[40000:]}}); err != nil {
		t.Fatal(err)
	}
	if err := Do(t, ch, &bdev.IO{Op: bdev.OpFlush}); err != nil {
		t.Fatal(err)
	}
	os.Stdout.WriteString("ready\n")
	time.Sleep(time.Minute) // killed here
	t.Fatal("not killed")
}

// DirectDir returns a temporary directory on a filesystem that supports
// O_DIRECT: t.TempDir() unless it is on tmpfs, else one under /var/tmp.
func DirectDir(t testing.TB) string {
	dir := t.TempDir()
	var st syscall.Statfs_t
	if syscall.Statfs(dir, &st) == nil && st.Type == 0x01021994 { // TMPFS_MAGIC
		d, err := os.MkdirTemp("/var/tmp", "kiotest")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(d) })
		return d
	}
	return dir
}

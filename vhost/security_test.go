package vhost_test

// Security defaults of a controller's socket (mode, owner, the directory it
// lives in, never following a planted path) and the separation of guest
// memory between sessions.

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"vhost-target/bdev/malloc"
	"vhost-target/reactor"
	"vhost-target/vhost"
	"vhost-target/vhost/frontend"
)

// newListener builds a controller on sock (not listening yet).
func newListener(t *testing.T, e *env, sock string, uid, gid int) *vhost.Controller {
	t.Helper()
	c, err := vhost.NewController(vhost.Config{
		Name: "sec", SocketPath: sock, NumQueues: 1, Reactors: e.r, SocketUID: uid, SocketGID: gid,
		LUNs: []vhost.LUNSpec{lun(0, 0, e.disk("sec"+strconv.Itoa(len(e.disks)), 1<<20, 512))}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func statT(t *testing.T, path string) (os.FileInfo, *syscall.Stat_t) {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi, fi.Sys().(*syscall.Stat_t)
}

// TestSocketModeAndOwner: the socket is created 0600 by default, with the
// configured mode otherwise, and (as root) handed to a numeric uid/gid.
func TestSocketModeAndOwner(t *testing.T) {
	e := newEnv(t, 1, reactor.Adaptive)
	sock := e.controller("c0", 1, lun(0, 0, e.disk("m0", 1<<20, 512)))
	fi, st := statT(t, sock)
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Errorf("default socket: mode %v, want a socket with 0600", fi.Mode())
	}
	if int(st.Uid) != os.Geteuid() {
		t.Errorf("default socket owned by uid %d, want %d", st.Uid, os.Geteuid())
	}
	if os.Geteuid() != 0 {
		t.Skip("chown of the socket needs root")
	}
	dir := t.TempDir()
	c, err := vhost.NewController(vhost.Config{
		Name: "owned", SocketPath: filepath.Join(dir, "owned"), SocketMode: 0o660, SocketUID: 4242, SocketGID: 4343,
		NumQueues: 1, Reactors: e.r, LUNs: []vhost.LUNSpec{lun(0, 0, e.disk("m1", 1<<20, 512))},
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Listen(); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fi, st = statT(t, filepath.Join(dir, "owned"))
	if fi.Mode().Perm() != 0o660 || st.Uid != 4242 || st.Gid != 4343 {
		t.Errorf("socket mode %v uid %d gid %d, want 0660 4242 4343", fi.Mode(), st.Uid, st.Gid)
	}
}

// TestSocketPathChecks: a world-writable directory without the sticky bit is
// refused; a sticky one (like /tmp) is fine; a symlink, regular file or
// directory at the socket path is refused and left as it was; a stale socket
// is replaced and a live one is not.
func TestSocketPathChecks(t *testing.T) {
	e := newEnv(t, 1, reactor.Adaptive)
	root := t.TempDir()
	mkdir := func(name string, mode os.FileMode) string {
		d := filepath.Join(root, name)
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(d, mode); err != nil {
			t.Fatal(err)
		}
		return d
	}
	listenErr := func(sock string) error { return newListener(t, e, sock, -1, -1).Listen() }

	if err := listenErr(filepath.Join(mkdir("open", 0o777), "s")); err == nil || !strings.Contains(err.Error(), "world-writable without the sticky bit") {
		t.Errorf("world-writable directory: %v", err)
	}
	if err := listenErr(filepath.Join(mkdir("groupw", 0o770), "s")); err != nil {
		t.Errorf("group-writable directory: %v", err)
	}
	sticky := mkdir("sticky", 0o777|os.ModeSticky)
	if err := listenErr(filepath.Join(sticky, "s")); err != nil {
		t.Errorf("sticky world-writable directory: %v", err)
	}
	if err := listenErr(filepath.Join(root, "missing", "s")); err == nil {
		t.Error("missing directory accepted")
	}

	// Planted paths are refused and not touched.
	dir := mkdir("plain", 0o755)
	victim := filepath.Join(root, "victim-file")
	if err := os.WriteFile(victim, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(victim, link); err != nil {
		t.Fatal(err)
	}
	// A symlink to a live socket elsewhere: following it would either hijack
	// or delete another listener's socket.
	other := filepath.Join(root, "other.sock")
	ln, err := net.Listen("unix", other)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	link2 := filepath.Join(dir, "link2")
	if err := os.Symlink(other, link2); err != nil {
		t.Fatal(err)
	}
	dangling := filepath.Join(dir, "dangling")
	if err := os.Symlink(filepath.Join(root, "nothing-here"), dangling); err != nil {
		t.Fatal(err)
	}
	regular := filepath.Join(dir, "regular")
	if err := os.WriteFile(regular, []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	sub := filepath.Join(dir, "subdir")
	if err := os.Mkdir(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{link, link2, dangling, regular, sub} {
		before, _ := os.Lstat(p)
		if err := listenErr(p); err == nil || !strings.Contains(err.Error(), "exists and is not a socket") {
			t.Errorf("%s: %v", filepath.Base(p), err)
		}
		after, err := os.Lstat(p)
		if err != nil || after.Mode() != before.Mode() || after.ModTime() != before.ModTime() {
			t.Errorf("%s changed by the refused Listen: %v", filepath.Base(p), err)
		}
	}
	if b, _ := os.ReadFile(victim); string(b) != "keep me" {
		t.Error("symlink target changed")
	}
	if _, err := os.Lstat(filepath.Join(root, "nothing-here")); err == nil {
		t.Error("a dangling symlink was followed: its target now exists")
	}
	if _, err := os.Lstat(other); err != nil {
		t.Errorf("the other listener's socket: %v", err)
	}

	// A stale socket (nobody listening) is replaced; a live one is refused.
	stale := filepath.Join(dir, "stale")
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: stale}); err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	c := newListener(t, e, stale, -1, -1)
	if err := c.Listen(); err != nil {
		t.Fatalf("stale socket: %v", err)
	}
	if err := listenErr(stale); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("live socket: %v", err)
	}
	if conn, err := net.Dial("unix", stale); err != nil {
		t.Errorf("the first controller lost its socket: %v", err)
	} else {
		conn.Close()
	}
}

// memfdMaps counts this process's mappings of the file with inode ino.
func memfdMaps(t *testing.T, ino uint64) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) >= 6 && strings.Contains(l, "/memfd:") && f[4] == strconv.FormatUint(ino, 10) {
			n++
		}
	}
	return n
}

func inode(t *testing.T, fd int) uint64 {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// TestSessionMemorySeparate: two front-ends on two controllers each get
// their own mapping of their own guest memory in the target. Data written
// by one never shows up in the other's memory, and when one disconnects only
// its mappings go away while the other keeps working.
func TestSessionMemorySeparate(t *testing.T) {
	e := newEnv(t, 1, reactor.Adaptive)
	disks := make([]*malloc.Disk, 2)
	devs := make([]*frontend.Device, 2)
	for i := range devs {
		disks[i] = e.disk("sep"+strconv.Itoa(i), 4<<20, 512)
		sock := e.controller("sep"+strconv.Itoa(i), 1, lun(0, 0, disks[i]))
		d, err := frontend.Dial(sock, frontend.Options{Slots: 2, MemSize: 64 << 20})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Abort()
		settle(t, d)
		devs[i] = d
	}
	ino := []uint64{inode(t, devs[0].MemFDs()[0]), inode(t, devs[1].MemFDs()[0])}
	// Each memfd is mapped twice: by its front-end and by the target's session.
	for i := range ino {
		if n := memfdMaps(t, ino[i]); n != 2 {
			t.Fatalf("front-end %d's memory mapped %d times, want 2 (front-end + its session)", i, n)
		}
	}
	pat := [][]byte{bytes.Repeat([]byte("AAAA-session-zero-"), 2048)[:32<<10], bytes.Repeat([]byte("BBBB-session-one--"), 2048)[:32<<10]}
	for i, d := range devs {
		if r, err := d.Do(frontend.Command{CDB: rw10(0x2a, 0, 64), DataOut: pat[i]}); err != nil || r.Status != 0 || r.Response != 0 {
			t.Fatalf("write %d: %v %+v", i, err, r)
		}
		r, err := d.Do(frontend.Command{CDB: rw10(0x28, 0, 64), DataInLen: len(pat[i])})
		if err != nil || r.Status != 0 || !bytes.Equal(r.DataIn, pat[i]) {
			t.Fatalf("read back %d: %v", i, err)
		}
	}
	// Neither guest's memory holds the other's pattern.
	for i, d := range devs {
		mem := d.Mem(0, int(d.Options().MemSize))
		if bytes.Contains(mem, pat[1-i][:64]) {
			t.Errorf("front-end %d's guest memory contains front-end %d's data", i, 1-i)
		}
		if !bytes.Equal(disks[i].Bytes()[:len(pat[i])], pat[i]) || bytes.Contains(disks[i].Bytes(), pat[1-i][:64]) {
			t.Errorf("disk %d holds the wrong data", i)
		}
	}
	// Session 0 ends: only its mapping in the target goes (the front-end's own
	// goes with Close too); session 1's stay and it keeps working.
	if err := devs[0].Close(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "session 0's mappings to go", 2*time.Second, func() bool { return memfdMaps(t, ino[0]) == 0 })
	if n := memfdMaps(t, ino[1]); n != 2 {
		t.Fatalf("front-end 1's memory mapped %d times after the other session ended, want 2", n)
	}
	ioRoundTrip(t, devs[1], 0, 128, disks[1])
}

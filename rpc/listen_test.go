package rpc

// Goal: Listen makes the socket only where nobody else can swap it, never
// touches what is not a stale socket, and applies mode and owner.
// Method: one case per kind of path already there, on real files in a
// temporary directory (the tests run as root, so ownership can be set).

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func newServer(t *testing.T) *Server {
	t.Helper()
	s := NewServer(Options{})
	testMethods(s)
	t.Cleanup(func() { s.Close() })
	return s
}

func TestListenStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "rpc.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close() // the file stays: a crashed target's socket
	s := newServer(t)
	if err := s.Listen(path, 0o600, -1, -1); err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	if err := NewTestClient(t, path).Call(context.Background(), "add", nil, nil); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Fatalf("socket left after Close: %v", err)
	}
}

func TestListenInUse(t *testing.T) {
	_, path := serve(t, Options{})
	s := newServer(t)
	if err := s.Listen(path, 0o600, -1, -1); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("Listen on a live socket: %v", err)
	}
	if err := NewTestClient(t, path).Call(context.Background(), "add", nil, nil); err != nil {
		t.Fatalf("the first server lost its socket: %v", err)
	}
}

func TestListenNotSocket(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("precious"), 0o644); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(dir, "target")
	if err := os.WriteFile(target, []byte("precious"), 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	// A symlink to a live socket is not followed either.
	_, live := serve(t, Options{})
	linkToSocket := filepath.Join(dir, "socklink")
	if err := os.Symlink(live, linkToSocket); err != nil {
		t.Fatal(err)
	}
	sub := filepath.Join(dir, "sub")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{file, link, linkToSocket, sub} {
		s := newServer(t)
		err := s.Listen(path, 0o600, -1, -1)
		if err == nil || !strings.Contains(err.Error(), "not a socket") {
			t.Errorf("%s: %v", path, err)
		}
	}
	for _, p := range []string{file, target} {
		if b, err := os.ReadFile(p); err != nil || string(b) != "precious" {
			t.Errorf("%s changed: %q, %v", p, b, err)
		}
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("symlink changed: %v", err)
	}
}

func TestListenDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "open")
	if err := os.Mkdir(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o777) // past the umask
	s := newServer(t)
	if err := s.Listen(filepath.Join(dir, "rpc.sock"), 0o600, -1, -1); err == nil || !strings.Contains(err.Error(), "world-writable") {
		t.Fatalf("world-writable directory: %v", err)
	}
	os.Chmod(dir, 0o777|os.ModeSticky)
	if err := s.Listen(filepath.Join(dir, "rpc.sock"), 0o600, -1, -1); err != nil {
		t.Fatalf("sticky directory: %v", err)
	}
	s2 := newServer(t)
	if err := s2.Listen(filepath.Join(t.TempDir(), "missing", "rpc.sock"), 0o600, -1, -1); err == nil {
		t.Fatal("missing directory accepted")
	}
	if err := s2.Listen(filepath.Join(t.TempDir(), strings.Repeat("x", 120)), 0o600, -1, -1); err == nil || !strings.Contains(err.Error(), "longer") {
		t.Fatalf("long path: %v", err)
	}
}

func TestListenModeOwner(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("setting a socket's owner needs root")
	}
	path := filepath.Join(t.TempDir(), "rpc.sock")
	s := newServer(t)
	if err := s.Listen(path, 0o660, 4321, 8765); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if fi.Mode().Perm() != 0o660 || fi.Mode()&os.ModeSocket == 0 || st.Uid != 4321 || st.Gid != 8765 {
		t.Fatalf("socket %v uid %d gid %d, want socket 0660 4321:8765", fi.Mode(), st.Uid, st.Gid)
	}

	// -1 leaves the owner alone: only the group changes.
	path2 := filepath.Join(t.TempDir(), "rpc.sock")
	s2 := newServer(t)
	if err := s2.Listen(path2, 0o600, -1, 8765); err != nil {
		t.Fatal(err)
	}
	fi, _ = os.Lstat(path2)
	st = fi.Sys().(*syscall.Stat_t)
	if fi.Mode().Perm() != 0o600 || int(st.Uid) != os.Geteuid() || st.Gid != 8765 {
		t.Fatalf("socket %v uid %d gid %d", fi.Mode(), st.Uid, st.Gid)
	}
}

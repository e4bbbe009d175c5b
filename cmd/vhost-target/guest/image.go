// Package guest boots a small Linux guest under QEMU against vhost-user-scsi
// sockets so tests can drive the target the way a real VM does: SeaBIOS
// first, then Debian's virtio_scsi/sd/sg drivers, fio and sg3_utils.
//
// The guest image (Debian kernel + busybox initramfs) is built once by the
// embedded build-image.sh and cached; each Run appends a small cpio archive
// holding the test's script, so no per-test files are needed on disk.
//
// Guests run under the system's QEMU (Debian 12: 7.2) unless Options.QEMU
// names another. QEMU10 provides Debian's QEMU 10 from bookworm-backports,
// the first QEMU here that reconnects a vhost-user-scsi device to a
// restarted back-end (8.2 and later can): the embedded get-qemu10.sh takes
// qemu-system-x86, qemu-system-common, qemu-system-data and seabios (QEMU 10
// wants SeaBIOS > 1.16.3-1~, bookworm has 1.16.2) with apt-get download on a
// private sources list and list directory, unpacks them with dpkg-deb into
// <cache>/qemu10/root and never installs them, so 7.2 stays the default.
// Runs pass -L for the unpacked firmware and QEMU_MODULE_DIR for its
// modules; the libraries are bookworm's, the ones 7.2 already pulled in.
// Controller.Reconnect sets the chardev's reconnect-ms: QEMU 10 then waits
// for a socket that is not there yet instead of exiting, and after the
// target closes the socket it stops the device and starts it again on the
// next connection.
package guest

import (
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

//go:embed build-image.sh
var buildScript []byte

// Image is a built guest: an uncompressed kernel QEMU boots through its PVH
// entry (about 5 s faster under TCG than bzImage) and the base initramfs.
type Image struct {
	Kernel    string
	Initramfs string
}

// ErrNeedRoot is returned by Build when no current image is cached and the
// caller is not root, so the build script cannot install packages.
var ErrNeedRoot = errors.New("guest: building the image needs root (apt-get); run once as root or set VHOST_TARGET_GUEST_CACHE to a built image")

// CacheDir is where Build keeps the image: $VHOST_TARGET_GUEST_CACHE, else
// /var/cache/vhost-target-guest for root, else ~/.cache/vhost-target-guest.
func CacheDir() string {
	if d := os.Getenv("VHOST_TARGET_GUEST_CACHE"); d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return "/var/cache/vhost-target-guest"
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".cache", "vhost-target-guest")
	}
	return filepath.Join(os.TempDir(), "vhost-target-guest")
}

// ScriptHash is the sha256 of the embedded build script; the cache is
// current when its stamp file holds this value.
func ScriptHash() string {
	sum := sha256.Sum256(buildScript)
	return hex.EncodeToString(sum[:])
}

// Build returns the cached image, building it first with build-image.sh when
// the cache is missing or was made by a different script. Concurrent callers
// (parallel test binaries) serialise on a lock file in the cache directory.
// logf receives the script's progress lines; it may be nil.
func Build(ctx context.Context, logf func(string, ...any)) (*Image, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	dir := CacheDir()
	img := &Image{Kernel: filepath.Join(dir, "vmlinux"), Initramfs: filepath.Join(dir, "initramfs.cpio.gz")}
	if cached(dir) {
		return img, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("guest: creating cache dir: %w", err)
	}
	unlock, err := lockDir(ctx, dir, logf)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if cached(dir) { // another process built it while we waited
		return img, nil
	}
	if os.Geteuid() != 0 {
		return nil, ErrNeedRoot
	}
	logf("guest: building image in %s (cold build takes a few minutes)", dir)
	if err := runScript(ctx, dir, "build-image.sh", buildScript, logf); err != nil {
		return nil, err
	}
	if !cached(dir) {
		return nil, fmt.Errorf("guest: build-image.sh finished but %s holds no current image", dir)
	}
	return img, nil
}

// cached reports whether dir holds an image made by the embedded script and
// QEMU is installed (the script installs it, so a restored cache on a fresh
// machine must go through the script once).
func cached(dir string) bool {
	stamp, err := os.ReadFile(filepath.Join(dir, "stamp"))
	if err != nil || strings.TrimSpace(string(stamp)) != ScriptHash() {
		return false
	}
	for _, f := range []string{"vmlinux", "initramfs.cpio.gz"} {
		if st, err := os.Stat(filepath.Join(dir, f)); err != nil || !st.Mode().IsRegular() {
			return false
		}
	}
	_, err = exec.LookPath(qemuBinary)
	return err == nil
}

// lockDir takes an exclusive flock on dir/.lock, polling so ctx can cancel.
func lockDir(ctx context.Context, dir string, logf func(string, ...any)) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("guest: opening cache lock: %w", err)
	}
	logged := false
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("guest: locking cache dir: %w", err)
		}
		if !logged {
			logf("guest: waiting for another build of %s", dir)
			logged = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("guest: waiting for cache lock: %w", ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// lineTail keeps the last maxTailLines lines written to it, for error
// messages that must show what the guest or the build printed last.
type lineTail struct {
	mu    sync.Mutex
	lines []string
}

const maxTailLines = 200

func (t *lineTail) add(l string) {
	t.mu.Lock()
	t.lines = append(t.lines, l)
	if len(t.lines) > 2*maxTailLines {
		t.lines = append(t.lines[:0], t.lines[len(t.lines)-maxTailLines:]...)
	}
	t.mu.Unlock()
}

func (t *lineTail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	l := t.lines
	if len(l) > maxTailLines {
		l = l[len(l)-maxTailLines:]
	}
	return strings.Join(l, "\n")
}

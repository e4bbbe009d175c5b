//go:build rbd

package rbd

/*
#cgo LDFLAGS: -lrbd -lrados
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/uio.h>
#include <rados/librados.h>
#include <rbd/librbd.h>

// Operation codes of vt_submit (the same numbers as bdev.Op).
enum { VT_READ = 1, VT_WRITE, VT_FLUSH, VT_UNMAP, VT_WRITE_ZEROES, VT_WRITE_SAME };

// VT_MAXIOV bounds the segments of one read or write (IOV_MAX; a virtqueue
// chain has at most 1024 descriptors).
#define VT_MAXIOV 1024
#define VT_MAXRANGES 32

// vt_iov has struct iovec's layout with integer fields, so Go stores guest
// addresses in it without storing Go pointers into C memory.
struct vt_iov { uint64_t base, len; };

struct vt_ch;

// vt_slot is one IO in flight. Go fills iov or ranges before vt_submit; the
// callbacks write res and pending.
struct vt_slot {
	struct vt_ch *ch;
	uint32_t idx;
	int32_t pending; // librbd completions outstanding, +1 while vt_submit runs
	int64_t res;     // 0, or the first negative errno of the IO's operations
	uint64_t ranges[2 * VT_MAXRANGES]; // unmap: offset, length pairs
	uint8_t pattern[4096];             // write same: the block, copied out of Go memory
	struct vt_iov iov[VT_MAXIOV];
};

// vt_ch is a channel's shared state. tail is written by librbd's callback
// threads; the consumer index lives in Go (only the reactor reads the ring).
struct vt_ch {
	uint64_t tail;   // next ring position a callback claims
	char pad0[56];
	int32_t efd;     // eventfd written after each push, or -1
	int32_t busy;    // callbacks between their push and their last access to the channel
	uint32_t mask;   // ring size - 1
	uint32_t nslots;
	rbd_image_t image;
	uint32_t *ring;  // slot index + 1 per finished IO; 0 = empty
	struct vt_slot *slots;
};

static void vt_push(struct vt_ch *ch, uint32_t idx) {
	__atomic_add_fetch(&ch->busy, 1, __ATOMIC_SEQ_CST);
	uint64_t t = __atomic_fetch_add(&ch->tail, 1, __ATOMIC_SEQ_CST);
	__atomic_store_n(&ch->ring[t & ch->mask], idx + 1, __ATOMIC_SEQ_CST);
	int fd = __atomic_load_n(&ch->efd, __ATOMIC_SEQ_CST);
	if (fd >= 0) {
		uint64_t one = 1;
		ssize_t r = write(fd, &one, sizeof one);
		(void)r;
	}
	__atomic_sub_fetch(&ch->busy, 1, __ATOMIC_SEQ_CST);
}

static void vt_fail(struct vt_slot *s, int64_t r) {
	int64_t zero = 0;
	__atomic_compare_exchange_n(&s->res, &zero, r, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static void vt_put(struct vt_slot *s) {
	if (__atomic_sub_fetch(&s->pending, 1, __ATOMIC_SEQ_CST) == 0)
		vt_push(s->ch, s->idx);
}

// vt_cb runs on a librbd thread: record, release, push. No Go here.
static void vt_cb(rbd_completion_t c, void *arg) {
	struct vt_slot *s = arg;
	ssize_t r = rbd_aio_get_return_value(c);
	rbd_aio_release(c);
	if (r < 0)
		vt_fail(s, r);
	vt_put(s);
}

static int vt_issue(struct vt_ch *ch, struct vt_slot *s, int op, uint64_t off, uint64_t len, int n) {
	rbd_completion_t c;
	int r = rbd_aio_create_completion(s, vt_cb, &c);
	if (r < 0)
		return r;
	__atomic_add_fetch(&s->pending, 1, __ATOMIC_SEQ_CST);
	switch (op) {
	case VT_READ:
		r = rbd_aio_readv(ch->image, (const struct iovec *)s->iov, n, off, c);
		break;
	case VT_WRITE:
		r = rbd_aio_writev(ch->image, (const struct iovec *)s->iov, n, off, c);
		break;
	case VT_FLUSH:
		r = rbd_aio_flush(ch->image, c);
		break;
	case VT_UNMAP:
		r = rbd_aio_discard(ch->image, off, len, c);
		break;
	case VT_WRITE_ZEROES:
		r = rbd_aio_write_zeroes(ch->image, off, len, c, 0, 0);
		break;
	case VT_WRITE_SAME:
		r = rbd_aio_writesame(ch->image, off, len, (const char *)s->pattern, (size_t)n, c, 0);
		break;
	default:
		r = -EINVAL;
	}
	if (r < 0) {
		// Not started: the callback will not run.
		__atomic_sub_fetch(&s->pending, 1, __ATOMIC_SEQ_CST);
		rbd_aio_release(c);
	}
	return r;
}

// vt_submit starts slot idx's IO. n is the iovec count (read, write), the
// range count (unmap) or the pattern length (write same). The IO always
// finishes through the ring, even when librbd refuses it here.
static void vt_submit(struct vt_ch *ch, uint32_t idx, int op, uint64_t off, uint64_t len, int n) {
	struct vt_slot *s = &ch->slots[idx];
	s->res = 0;
	s->pending = 1;
	int r = 0;
	if (op == VT_UNMAP) {
		for (int i = 0; i < n && r >= 0; i++)
			if (s->ranges[2*i+1] != 0)
				r = vt_issue(ch, s, op, s->ranges[2*i], s->ranges[2*i+1], 0);
	} else {
		r = vt_issue(ch, s, op, off, len, n);
	}
	if (r < 0)
		vt_fail(s, r);
	vt_put(s);
}

static struct vt_ch *vt_ch_new(rbd_image_t image, uint32_t nslots, uint32_t ringsize) {
	struct vt_ch *ch = calloc(1, sizeof *ch);
	if (!ch)
		return NULL;
	ch->ring = calloc(ringsize, sizeof *ch->ring);
	// The slots are mostly iovec space, touched only as far as IOs use it.
	ch->slots = calloc(nslots, sizeof *ch->slots);
	if (!ch->ring || !ch->slots) {
		free(ch->ring);
		free(ch->slots);
		free(ch);
		return NULL;
	}
	ch->efd = -1;
	ch->mask = ringsize - 1;
	ch->nslots = nslots;
	ch->image = image;
	for (uint32_t i = 0; i < nslots; i++) {
		ch->slots[i].ch = ch;
		ch->slots[i].idx = i;
	}
	return ch;
}

// vt_ch_free waits for callbacks still past their push (they finish within
// microseconds) and frees the channel. Every IO must have been reaped.
static void vt_ch_free(struct vt_ch *ch) {
	while (__atomic_load_n(&ch->busy, __ATOMIC_SEQ_CST) != 0)
		usleep(10);
	free(ch->ring);
	free(ch->slots);
	free(ch);
}

static int vt_efd_set(struct vt_ch *ch, int fd) {
	__atomic_store_n(&ch->efd, fd, __ATOMIC_SEQ_CST);
	return 0;
}

static void vt_efd_clear(struct vt_ch *ch) {
	__atomic_store_n(&ch->efd, -1, __ATOMIC_SEQ_CST);
	while (__atomic_load_n(&ch->busy, __ATOMIC_SEQ_CST) != 0)
		usleep(10);
}

// vt_watch_cb runs on a librbd thread when the image header changes (a
// resize by any client): it only wakes the Go goroutine waiting on fd.
static void vt_watch_cb(void *arg) {
	int fd = (int)(intptr_t)arg;
	uint64_t one = 1;
	ssize_t r = write(fd, &one, sizeof one);
	(void)r;
}

static int vt_watch(rbd_image_t image, int fd, uint64_t *handle) {
	return rbd_update_watch(image, handle, vt_watch_cb, (void *)(intptr_t)fd);
}

static int vt_conf_get(rados_t cluster, const char *key, char *buf, size_t n) {
	return rados_conf_get(cluster, key, buf, n);
}
*/
import "C"

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"vhost-target/bdev"
)

// Limits of one channel.
const (
	// MaxIovecs bounds the segments of one read or write (IOV_MAX); an IO
	// with more fails with bdev.ErrIO. A virtqueue chain cannot have more.
	MaxIovecs = C.VT_MAXIOV
	// WaitMax bounds the IOs waiting for a slot in one channel (as kio).
	WaitMax = 1024
)

// Available reports whether this binary has the rbd bdev.
func Available() bool { return true }

// Disk is an rbd bdev: one librados connection and one open image, shared by
// every channel (librbd's image handle is thread-safe for aio).
type Disk struct {
	name       string
	blockSize  uint32
	info       atomic.Pointer[bdev.Info] // replaced on a capacity change
	size       atomic.Uint64             // bytes served: every IO's range check loads it
	resizeMu   sync.Mutex                // serialises Resize and Rescan
	readOnly   bool
	queueDepth int
	log        *slog.Logger

	cluster C.rados_t
	ioctx   C.rados_ioctx_t
	image   C.rbd_image_t

	channels    atomic.Int32
	blocklisted atomic.Bool // logged once
	closed      bool

	// The update watch (WatchCapacity): librbd's callback writes watchFD,
	// a goroutine reads it and calls the watcher's fn.
	watching    bool
	watchHandle C.uint64_t
	watchFD     int
	watchStop   atomic.Bool
}

// Open connects to the cluster and opens the image. Errors name the bdev.
func Open(c Config) (*Disk, error) {
	if c.BlockSize == 0 {
		c.BlockSize = 512
	}
	if c.BlockSize != 512 && c.BlockSize != 4096 {
		return nil, fmt.Errorf("bdev %q: block size %d is not 512 or 4096", c.Name, c.BlockSize)
	}
	if c.QueueDepth == 0 {
		c.QueueDepth = QueueDepthDefault
	}
	if c.QueueDepth < 0 || c.QueueDepth > 32768 {
		return nil, fmt.Errorf("bdev %q: queue depth %d is out of range 1..32768", c.Name, c.QueueDepth)
	}
	if c.Pool == "" || c.Image == "" {
		return nil, fmt.Errorf("bdev %q: pool and image are required", c.Name)
	}
	if c.User == "" {
		c.User = UserDefault
	}
	if c.ConnectTimeout <= 0 {
		c.ConnectTimeout = ConnectTimeoutDefault
	}
	if c.OpTimeout == 0 {
		c.OpTimeout = OpTimeoutDefault
	}
	d := &Disk{name: c.Name, readOnly: c.ReadOnly, queueDepth: c.QueueDepth, log: c.Logger}
	if d.log == nil {
		d.log = slog.Default()
	}
	if err := d.connect(c); err != nil {
		d.release()
		return nil, fmt.Errorf("bdev %q: rbd %s/%s: %w", c.Name, c.Pool, imagePath(c), err)
	}
	return d, nil
}

func imagePath(c Config) string {
	if c.Namespace != "" {
		return c.Namespace + "/" + c.Image
	}
	return c.Image
}

func errno(op string, r C.int) error {
	return fmt.Errorf("%s: %w", op, unix.Errno(-r))
}

func (d *Disk) set(key, val string) error {
	k, v := C.CString(key), C.CString(val)
	defer C.free(unsafe.Pointer(k))
	defer C.free(unsafe.Pointer(v))
	if r := C.rados_conf_set(d.cluster, k, v); r < 0 {
		return errno("set "+key+" = "+val, r)
	}
	return nil
}

func (d *Disk) get(key string) (string, bool) {
	k := C.CString(key)
	defer C.free(unsafe.Pointer(k))
	var buf [256]C.char
	if C.vt_conf_get(d.cluster, k, &buf[0], C.size_t(len(buf))) < 0 {
		return "", false
	}
	return C.GoString(&buf[0]), true
}

func seconds(t time.Duration) string {
	return strconv.FormatFloat(max(t.Seconds(), 1), 'f', 0, 64)
}

func (d *Disk) connect(c Config) error {
	user := C.CString(c.User)
	defer C.free(unsafe.Pointer(user))
	if r := C.rados_create(&d.cluster, user); r < 0 {
		d.cluster = nil
		return errno("rados_create", r)
	}
	if c.Conf != "" {
		p := C.CString(c.Conf)
		defer C.free(unsafe.Pointer(p))
		if r := C.rados_conf_read_file(d.cluster, p); r < 0 {
			return errno("read "+c.Conf, r)
		}
	} else if r := C.rados_conf_read_file(d.cluster, nil); r < 0 && r != -C.ENOENT {
		return errno("read the default ceph.conf", r)
	}
	if c.Keyring != "" {
		if err := d.set("keyring", c.Keyring); err != nil {
			return err
		}
	}
	// An unreachable cluster is an error within the connect timeout, not a
	// hang: rados_connect gives up after client_mount_timeout, and monitor
	// commands after rados_mon_op_timeout.
	to := seconds(c.ConnectTimeout)
	for _, kv := range [][2]string{{"client_mount_timeout", to}, {"rados_mon_op_timeout", to}} {
		if err := d.set(kv[0], kv[1]); err != nil {
			return err
		}
	}
	if c.OpTimeout > 0 {
		if err := d.set("rados_osd_op_timeout", seconds(c.OpTimeout)); err != nil {
			return err
		}
	}
	// rbd_aio_* only queue the request for librbd's own threads (the
	// default, made explicit): a reactor's submit never waits on the cluster.
	if err := d.set("rbd_non_blocking_aio", "true"); err != nil {
		return err
	}
	// No librbd write cache: a write completes when the OSDs have it, and
	// a failed write fails itself. With the cache (write-around in Ceph
	// 16) a write is acknowledged before it is sent; if it then fails, the
	// error is reported once, to the next flush, and the flush after that
	// succeeds. Linux retries a SYNCHRONIZE CACHE that failed with a
	// medium error, so its fsync succeeded over lost writes (seen in
	// TestGuestRBD/OSDDown: an OSD stopped under dd conv=fsync).
	if err := d.set("rbd_cache", "false"); err != nil {
		return err
	}
	// Discards zero what they cover, partial objects included, so unmapped
	// blocks read back as zeroes (LBPRZ). Checked below: image metadata or
	// an older librbd may say otherwise.
	d.set("rbd_skip_partial_discard", "false")
	d.set("rbd_discard_granularity_bytes", "0")
	if r := C.rados_connect(d.cluster); r < 0 {
		msg := "connect to the cluster"
		if r == -C.ETIMEDOUT || r == -C.EINTR {
			msg += " (no monitor answered in " + to + " s)"
		}
		return errno(msg, r)
	}
	pool := C.CString(c.Pool)
	defer C.free(unsafe.Pointer(pool))
	if r := C.rados_ioctx_create(d.cluster, pool, &d.ioctx); r < 0 {
		d.ioctx = nil
		return errno("open pool "+c.Pool, r)
	}
	if c.Namespace != "" {
		ns := C.CString(c.Namespace)
		defer C.free(unsafe.Pointer(ns))
		C.rados_ioctx_set_namespace(d.ioctx, ns)
	}
	img := C.CString(c.Image)
	defer C.free(unsafe.Pointer(img))
	var r C.int
	if c.ReadOnly {
		r = C.rbd_open_read_only(d.ioctx, img, &d.image, nil)
	} else {
		r = C.rbd_open(d.ioctx, img, &d.image, nil)
	}
	if r < 0 {
		d.image = nil
		if r == -C.ENOENT {
			return fmt.Errorf("open image %q: no such image in pool %q: %w", imagePath(c), c.Pool, unix.ENOENT)
		}
		return errno("open image "+imagePath(c), r)
	}
	var st C.rbd_image_info_t
	if r := C.rbd_stat(d.image, &st, C.size_t(unsafe.Sizeof(st))); r < 0 {
		return errno("stat", r)
	}
	bs := uint64(c.BlockSize)
	d.blockSize = c.BlockSize
	size := uint64(st.size) / bs * bs
	d.size.Store(size)
	if size == 0 {
		return fmt.Errorf("image of %d bytes is less than one %d-byte block", uint64(st.size), bs)
	}
	uuid := c.UUID
	if uuid == ([16]byte{}) {
		uuid = deriveUUID(c.Pool, c.Namespace, d.imageID(c.Image))
	}
	skip, _ := d.get("rbd_skip_partial_discard")
	d.info.Store(&bdev.Info{
		Name: c.Name, Type: "rbd", BlockSize: c.BlockSize, NumBlocks: size / bs, UUID: uuid,
		ReadOnly:    c.ReadOnly,
		Unmap:       !c.ReadOnly,
		UnmapZeroes: !c.ReadOnly && skip == "false" && d.meta("conf_rbd_skip_partial_discard", "false") == "false",
		WriteZeroes: !c.ReadOnly,
		WriteCache:  d.cacheOn(),
	})
	return nil
}

// cacheOn says whether librbd caches writes for this image. The bdev turns
// rbd_cache off (see connect); image metadata (conf_rbd_cache) may turn it
// on again, and then the LUN reports a volatile write cache and SYNCHRONIZE
// CACHE maps to rbd_aio_flush.
func (d *Disk) cacheOn() bool {
	v, ok := d.get("rbd_cache")
	on := !ok || v == "true"
	switch d.meta("conf_rbd_cache", "") {
	case "true":
		on = true
	case "false":
		on = false
	}
	return on
}

// meta returns the image metadata value of key, or def.
func (d *Disk) meta(key, def string) string {
	k := C.CString(key)
	defer C.free(unsafe.Pointer(k))
	var buf [64]C.char
	n := C.size_t(len(buf))
	if C.rbd_metadata_get(d.image, k, &buf[0], &n) < 0 {
		return def
	}
	return strings.TrimSpace(C.GoString(&buf[0]))
}

// imageID returns the image's id (stable across renames), or its name for
// an old-format image that has none.
func (d *Disk) imageID(name string) string {
	var buf [128]C.char
	if C.rbd_get_id(d.image, &buf[0], C.size_t(len(buf))) < 0 {
		return "name:" + name
	}
	return C.GoString(&buf[0])
}

// deriveUUID is a stable UUID (RFC 9562 version 8) for an image.
func deriveUUID(pool, ns, id string) [16]byte {
	h := sha256.Sum256([]byte("vhost-target rbd\x00" + pool + "\x00" + ns + "\x00" + id))
	var u [16]byte
	copy(u[:], h[:16])
	u[6] = u[6]&0x0f | 0x80
	u[8] = u[8]&0x3f | 0x80
	return u
}

// clientAddrs returns the addresses of this disk's RADOS session, as
// `ceph osd blocklist add` takes them (tests blocklist the client).
func (d *Disk) clientAddrs() (string, error) {
	var p *C.char
	if r := C.rados_getaddrs(d.cluster, &p); r < 0 {
		return "", errno("rados_getaddrs", r)
	}
	defer C.free(unsafe.Pointer(p))
	return C.GoString(p), nil
}

// release undoes what connect did, in reverse.
func (d *Disk) release() {
	if d.image != nil {
		C.rbd_close(d.image)
		d.image = nil
	}
	if d.ioctx != nil {
		C.rados_ioctx_destroy(d.ioctx)
		d.ioctx = nil
	}
	if d.cluster != nil {
		C.rados_shutdown(d.cluster)
		d.cluster = nil
	}
}

// Info describes the disk.
func (d *Disk) Info() *bdev.Info { return d.info.Load() }

// setSize serves size bytes: IOs checked from now on see it, and Info
// returns a new Info with the new NumBlocks.
func (d *Disk) setSize(size uint64) {
	ni := *d.info.Load()
	ni.NumBlocks = size / uint64(d.blockSize)
	d.size.Store(size)
	d.info.Store(&ni)
}

// Resize grows the image (rbd_resize) and serves the new size
// (bdev.Resizer, SPDK's bdev_rbd_resize). A shrink is refused, as SPDK
// refuses it: rbd_resize to a smaller size deletes the objects beyond it,
// so it is left to an operator's `rbd resize --allow-shrink` and a rescan.
// rbd_resize waits for the cluster: call it from a management goroutine,
// never a reactor.
func (d *Disk) Resize(newSize uint64) error {
	bs := uint64(d.blockSize)
	switch {
	case newSize == 0 || newSize%bs != 0:
		return fmt.Errorf("bdev %q: new size %d is not a positive multiple of the block size %d", d.name, newSize, bs)
	case d.readOnly:
		return fmt.Errorf("bdev %q: the image is open read-only: it cannot be resized", d.name)
	}
	d.resizeMu.Lock()
	defer d.resizeMu.Unlock()
	if d.closed {
		return fmt.Errorf("bdev %q: resize: closed", d.name)
	}
	cur := d.size.Load()
	if newSize < cur {
		return fmt.Errorf("bdev %q: shrink from %d to %d bytes refused: shrinking an rbd image deletes its data "+
			"beyond the new size (use `rbd resize --allow-shrink` with the image unused, then rescan): %w",
			d.name, cur, newSize, bdev.ErrInUse)
	}
	if newSize == cur {
		return nil
	}
	var have C.uint64_t
	if r := C.rbd_get_size(d.image, &have); r < 0 {
		return fmt.Errorf("bdev %q: resize: %w", d.name, errno("rbd_get_size", r))
	}
	if uint64(have) < newSize {
		if r := C.rbd_resize(d.image, C.uint64_t(newSize)); r < 0 {
			return fmt.Errorf("bdev %q: %w", d.name, errno("rbd_resize to "+strconv.FormatUint(newSize, 10)+" bytes", r))
		}
	}
	d.setSize(newSize)
	return nil
}

// Rescan serves the whole image again, as its size is now (after an
// `rbd resize` by another client), rounded down to the block size
// (bdev.Rescanner). A smaller image is refused while a channel is open.
func (d *Disk) Rescan() (bool, error) {
	d.resizeMu.Lock()
	defer d.resizeMu.Unlock()
	if d.closed {
		return false, fmt.Errorf("bdev %q: rescan: closed", d.name)
	}
	var have C.uint64_t
	if r := C.rbd_get_size(d.image, &have); r < 0 {
		return false, fmt.Errorf("bdev %q: rescan: %w", d.name, errno("rbd_get_size", r))
	}
	bs := uint64(d.blockSize)
	size := uint64(have) / bs * bs
	cur := d.size.Load()
	switch {
	case size == cur:
		return false, nil
	case size == 0:
		return false, fmt.Errorf("bdev %q: rescan: the image is smaller than one block", d.name)
	case size < cur && d.channels.Load() > 0:
		return false, fmt.Errorf("bdev %q: image shrunk from %d to %d bytes, refused while %d channels are open: %w",
			d.name, cur, size, d.channels.Load(), bdev.ErrInUse)
	}
	d.setSize(size)
	return true, nil
}

var (
	_ bdev.Resizer   = (*Disk)(nil)
	_ bdev.Rescanner = (*Disk)(nil)
)

// Close closes the image (librbd writes back its cache) and the connection.
// Every channel must be closed.
func (d *Disk) Close() error {
	d.resizeMu.Lock()
	defer d.resizeMu.Unlock()
	if d.closed {
		return nil
	}
	if n := d.channels.Load(); n != 0 {
		return fmt.Errorf("bdev %q: close with %d channels open", d.name, n)
	}
	d.closed = true
	if d.watching {
		// No callback runs after rbd_update_unwatch returns; the
		// goroutine, woken, sees watchStop and closes the eventfd.
		C.rbd_update_unwatch(d.image, d.watchHandle)
		d.watchStop.Store(true)
		var one = [8]byte{1}
		unix.Write(d.watchFD, one[:])
		d.watching = false
	}
	var err error
	if d.image != nil {
		if r := C.rbd_close(d.image); r < 0 {
			err = fmt.Errorf("bdev %q: %w", d.name, errno("rbd_close", r))
		}
		d.image = nil
	}
	d.release()
	return err
}

var _ bdev.Bdev = (*Disk)(nil)

// WatchCapacity registers an update watch on the image (bdev.CapacityWatcher):
// after another client's `rbd resize` (or our own Resize) fn runs on a
// goroutine of its own. Close unregisters it; fn may still be running then.
func (d *Disk) WatchCapacity(fn func()) error {
	d.resizeMu.Lock()
	defer d.resizeMu.Unlock()
	if d.closed || d.watching {
		return fmt.Errorf("bdev %q: watch: closed or watched already", d.name)
	}
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("bdev %q: watch: eventfd: %w", d.name, err)
	}
	if r := C.vt_watch(d.image, C.int(fd), &d.watchHandle); r < 0 {
		unix.Close(fd)
		return fmt.Errorf("bdev %q: %w", d.name, errno("rbd_update_watch", r))
	}
	d.watching, d.watchFD = true, fd
	go func() {
		defer unix.Close(fd)
		var buf [8]byte
		for {
			if _, err := unix.Read(fd, buf[:]); err != nil && err != unix.EINTR {
				return
			}
			if d.watchStop.Load() {
				return
			}
			fn()
		}
	}()
	return nil
}

var _ bdev.CapacityWatcher = (*Disk)(nil)

// Open makes a channel: its slots, ring and (on first EventFD) eventfd.
func (d *Disk) Open() (bdev.Channel, error) {
	if d.closed {
		return nil, fmt.Errorf("bdev %q: open channel: closed", d.name)
	}
	ringSize := 1
	for ringSize < d.queueDepth {
		ringSize <<= 1
	}
	cc := C.vt_ch_new(d.image, C.uint32_t(d.queueDepth), C.uint32_t(ringSize))
	if cc == nil {
		return nil, fmt.Errorf("bdev %q: open channel: out of memory", d.name)
	}
	ch := &channel{
		d: d, c: cc, efd: -1,
		cslots: unsafe.Slice(cc.slots, d.queueDepth),
		ring:   unsafe.Slice((*uint32)(unsafe.Pointer(cc.ring)), ringSize),
		ios:    make([]*bdev.IO, d.queueDepth),
		free:   make([]uint32, 0, d.queueDepth),
	}
	for i := d.queueDepth - 1; i >= 0; i-- {
		ch.free = append(ch.free, uint32(i))
	}
	d.channels.Add(1)
	return ch, nil
}

// channel is one reactor's queue to the image.
type channel struct {
	d      *Disk
	c      *C.struct_vt_ch
	cslots []C.struct_vt_slot // C memory: iovecs, ranges, results
	ring   []uint32           // C memory: slot index + 1 of finished IOs
	head   uint64             // next ring position to reap
	ios    []*bdev.IO         // the IO in each slot
	free   []uint32

	wait      [WaitMax]*bdev.IO // FIFO of IOs waiting for a slot
	waitHead  int
	waitCount int
	inflight  int
	efd       int
}

var _ bdev.Waker = (*channel)(nil)

// check validates io (bdev.Check, and no more guest segments than a slot's
// C iovec array holds); it returns true when io is finished already.
func (c *channel) check(io *bdev.IO) bool {
	d := c.d
	if bdev.Check(io, d.blockSize, d.size.Load(), d.readOnly) {
		return true
	}
	if (io.Op == bdev.OpRead || io.Op == bdev.OpWrite) && len(io.Iov) > MaxIovecs {
		// Count the segments that carry data, as vt_submit does.
		segs, n := 0, uint64(0)
		for _, v := range io.Iov {
			if n < io.Len && len(v) > 0 {
				segs++
			}
			n += uint64(len(v))
		}
		if segs > MaxIovecs {
			io.Err = bdev.ErrIO // more segments than any virtqueue chain has
			return true
		}
	}
	return false
}

// Submit starts io, or queues it while every slot is in use. Only a bad IO
// completes before Submit returns; librbd's answer always comes from Poll.
func (c *channel) Submit(io *bdev.IO) {
	if c.check(io) {
		io.Done.IODone(io)
		return
	}
	c.inflight++
	if c.waitCount == 0 && len(c.free) > 0 {
		c.start(io)
		return
	}
	if c.waitCount == WaitMax {
		c.inflight--
		io.Err = bdev.ErrBusy
		io.Done.IODone(io)
		return
	}
	c.wait[(c.waitHead+c.waitCount)%WaitMax] = io
	c.waitCount++
}

// start puts io (checked) in a free slot and hands it to librbd.
func (c *channel) start(io *bdev.IO) {
	idx := c.free[len(c.free)-1]
	c.free = c.free[:len(c.free)-1]
	c.ios[idx] = io
	s := &c.cslots[idx]
	n := 0
	switch io.Op {
	case bdev.OpRead, bdev.OpWrite:
		left := io.Len
		for _, v := range io.Iov {
			if left == 0 {
				break
			}
			if len(v) == 0 {
				continue
			}
			if uint64(len(v)) > left {
				v = v[:left]
			}
			// Guest memory is mapped outside the Go heap; the address is
			// stored as an integer, so C memory holds no Go pointer.
			s.iov[n] = C.struct_vt_iov{base: C.uint64_t(uintptr(unsafe.Pointer(&v[0]))), len: C.uint64_t(len(v))}
			n++
			left -= uint64(len(v))
		}
	case bdev.OpUnmap:
		for i, r := range io.Ranges[:io.NRanges] {
			s.ranges[2*i] = C.uint64_t(r.Offset)
			s.ranges[2*i+1] = C.uint64_t(r.Len)
		}
		n = io.NRanges
	case bdev.OpWriteSame:
		// The pattern block is often Go memory (SCSI copies it into its
		// command): librbd gets a copy in the slot, in C memory.
		n = int(c.d.blockSize)
		copy(unsafe.Slice((*byte)(unsafe.Pointer(&s.pattern[0])), n), io.Iov[0][:n])
	}
	C.vt_submit(c.c, C.uint32_t(idx), C.int(io.Op), C.uint64_t(io.Offset), C.uint64_t(io.Len), C.int(n))
}

// Poll reaps finished IOs. With nothing finished it makes no cgo call: one
// atomic load of C memory.
func (c *channel) Poll() int {
	work := 0
	for {
		p := &c.ring[c.head&uint64(len(c.ring)-1)]
		v := atomic.LoadUint32(p)
		if v == 0 {
			return work
		}
		atomic.StoreUint32(p, 0)
		c.head++
		idx := v - 1
		res := atomic.LoadInt64((*int64)(unsafe.Pointer(&c.cslots[idx].res)))
		c.finish(idx, res)
		work++
	}
}

// finish completes slot idx with librbd's result, frees the slot and starts
// waiting IOs.
func (c *channel) finish(idx uint32, res int64) {
	io := c.ios[idx]
	c.ios[idx] = nil
	c.free = append(c.free, idx)
	c.inflight--
	if res < 0 {
		io.Err = c.mapErr(unix.Errno(-res))
	}
	io.Done.IODone(io)
	for c.waitCount > 0 && len(c.free) > 0 {
		w := c.wait[c.waitHead]
		c.wait[c.waitHead] = nil
		c.waitHead = (c.waitHead + 1) % WaitMax
		c.waitCount--
		c.start(w)
	}
}

// eshutdown is what librados returns to a client the cluster has
// blocklisted (EBLOCKLISTED is ESHUTDOWN).
const eshutdown = unix.ESHUTDOWN

// mapErr turns a librbd error into the bdev error SCSI understands: what a
// real disk would say (a medium error for EIO and timeouts, so the guest
// sees an error rather than a hang).
func (c *channel) mapErr(e unix.Errno) error {
	switch e {
	case unix.ENOSPC, unix.EDQUOT:
		return bdev.ErrNoSpace
	case unix.EROFS:
		return bdev.ErrReadOnly
	case eshutdown:
		if !c.d.blocklisted.Swap(true) {
			c.d.log.Error("rbd client blocklisted by the cluster: every IO fails until the bdev is reopened",
				"bdev", c.d.name)
		}
	}
	return bdev.ErrIO
}

// InFlight returns the IOs accepted and not completed, waiting ones included.
func (c *channel) InFlight() int { return c.inflight }

// EventFD returns an eventfd that librbd's callbacks write after each
// completion; it is made on first use. -1 if it cannot be made.
func (c *channel) EventFD() int {
	if c.efd >= 0 {
		return c.efd
	}
	fd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return -1
	}
	c.efd = fd
	C.vt_efd_set(c.c, C.int(fd))
	return fd
}

// ErrInFlight is wrapped by the error of closing a channel with IOs in flight.
var ErrInFlight = errors.New("IOs in flight")

// Close frees the channel. InFlight must be 0.
func (c *channel) Close() error {
	if c.c == nil {
		return nil
	}
	if c.inflight != 0 {
		return fmt.Errorf("bdev %q: close with %d %w", c.d.name, c.inflight, ErrInFlight)
	}
	if c.efd >= 0 {
		C.vt_efd_clear(c.c)
		unix.Close(c.efd)
		c.efd = -1
	}
	C.vt_ch_free(c.c)
	c.c, c.cslots, c.ring = nil, nil, nil
	c.d.channels.Add(-1)
	return nil
}

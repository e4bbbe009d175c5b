// Package rbd is a bdev on a Ceph RBD image, through librbd's C API (cgo).
//
// The bdev itself is built only with the build tag rbd (it needs librbd-dev
// and links librbd and librados dynamically); the default build stays pure Go
// and static, and there Open returns ErrNotBuilt. Config is in both builds so
// that configuration code compiles either way.
//
// Data path: each channel (one per reactor queue) owns a fixed set of slots
// in C memory, each with its own iovec array, and a lock-free ring of
// finished slot numbers, also in C memory. Submit fills a slot's iovecs from
// the guest buffers and makes one cgo call that creates the librbd
// completion(s) and starts rbd_aio_readv/writev/flush/discard/write_zeroes/
// writesame. librbd runs the completion callback on one of its own threads:
// that callback is C (no Go on librbd's threads), records the result, pushes
// the slot number onto the channel's ring and writes the channel's eventfd.
// Poll, on the reactor, reads the ring from Go with atomic loads (no cgo call
// when nothing finished), maps the result to a bdev error and calls IODone.
package rbd

import (
	"errors"
	"log/slog"
	"time"
)

// Defaults.
const (
	QueueDepthDefault     = 128
	UserDefault           = "admin"
	ConnectTimeoutDefault = 5 * time.Second
	OpTimeoutDefault      = 30 * time.Second
)

// Config describes an rbd bdev.
type Config struct {
	Name      string
	Pool      string
	Image     string
	Namespace string // RADOS namespace of the image; "" = the default one
	Conf      string // ceph.conf path; "" = librados's search (/etc/ceph/ceph.conf, $CEPH_CONF)
	User      string // client id, without "client." ("" = UserDefault)
	Keyring   string // keyring path; "" = what ceph.conf says
	BlockSize uint32 // 512 (0 = 512) or 4096
	// QueueDepth bounds the librbd operations in flight per channel
	// (0 = QueueDepthDefault); more wait in a FIFO.
	QueueDepth int
	ReadOnly   bool
	// UUID overrides the UUID derived from the pool, namespace and image id.
	UUID [16]byte
	// ConnectTimeout bounds connecting to the monitors and every monitor
	// operation (client_mount_timeout, rados_mon_op_timeout); 0 =
	// ConnectTimeoutDefault.
	ConnectTimeout time.Duration
	// OpTimeout fails an OSD operation that has not finished in that long
	// with ETIMEDOUT (rados_osd_op_timeout), which the IO reports as
	// bdev.ErrIO; 0 = OpTimeoutDefault, negative = wait for ever.
	OpTimeout time.Duration
	Logger    *slog.Logger // nil = slog.Default()
}

// ErrNotBuilt is returned by Open in a binary built without the rbd bdev.
var ErrNotBuilt = errors.New("this binary was built without the rbd bdev (build tag rbd, needs librbd-dev)")

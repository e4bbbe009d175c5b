// Package config reads and checks the target's TOML configuration.
//
// A file is decoded into loosely typed raw structs (so that a size may be a
// string or an integer and so that an absent key can be told from a zero),
// defaults are filled in one place (fromRaw), and the typed Config is then
// checked by Validate. Every error names the file, the key path and the entry
// ("target.toml: controller[1] \"vhost.1\": lun[0].bdev: bdev \"mem9\" is not
// defined"); all errors found are reported together through errors.Join, so a
// user fixes a file in one pass. deploy/README.md is the key reference and must
// match the defaults and limits here.
package config

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"
)

// Bdev types (key bdev.type).
const (
	TypeMalloc = "malloc" // RAM disk; contents are lost when the target exits
	TypeFile   = "file"   // regular file or block device, O_DIRECT, served by worker goroutines
	TypeAIO    = "aio"    // regular file or block device, O_DIRECT, kernel async I/O (io_uring or libaio)
	TypeError  = "error"  // wraps another bdev and injects I/O errors or delays (for tests)
	// TypeRBD is a Ceph RBD image served through librbd. The configuration
	// accepts it in every binary; only one built with the rbd build tag can
	// open it (others refuse it at start-up, naming the bdev).
	TypeRBD = "rbd"
)

// Operations an error bdev's inject entry can match (key bdev.inject.op).
// "all" matches every operation; the others are bdev.Op names.
var InjectOps = []string{"all", "read", "write", "flush", "unmap", "write_zeroes", "write_same"}

// InjectEIO is the one error an inject entry can return (key bdev.inject.error):
// an I/O error, which SCSI reports as MEDIUM ERROR.
const InjectEIO = "eio"

// I/O engines of an aio bdev (key bdev.engine).
const (
	EngineAuto   = "auto"   // io_uring when the kernel allows it, else libaio
	EngineURing  = "uring"  // io_uring only; fail at start-up if unavailable
	EngineLibaio = "libaio" // Linux native AIO only
)

// Backing memory of a malloc bdev (key bdev.hugepages). Every mode allocates
// and populates the whole disk at start-up, so a read of a never-written
// block is not served from the kernel's zero page and a first write takes no
// page fault; they differ in the page size behind it.
const (
	HugepagesAuto    = "auto"    // hugetlb if enough 2 MiB hugepages are free, else THP, else 4 KiB pages
	HugepagesHugeTLB = "hugetlb" // 2 MiB hugetlbfs pages (vm.nr_hugepages); fail at start-up if too few are free
	HugepagesTHP     = "thp"     // transparent huge pages (madvise); fail if THP is disabled ("never")
	HugepagesNone    = "none"    // 4 KiB pages
)

// Controller types (key controller.type).
const (
	ControllerSCSI = "scsi" // vhost-user-scsi: a virtio-scsi HBA with [[controller.lun]] entries (the default)
	ControllerBlk  = "blk"  // vhost-user-blk: one virtio-blk disk, key bdev
)

// Reactor poll modes (key reactors.poll).
const (
	PollBusy     = "busy"     // spin on every reactor CPU: lowest latency, 100% CPU
	PollAdaptive = "adaptive" // spin while busy, sleep on eventfds when idle
)

// Limits and defaults. deploy/README.md repeats them; keep both in step.
const (
	// SocketPathMax is the longest socket path in bytes: sun_path holds 108
	// bytes including the terminating NUL (unix(7)).
	SocketPathMax = 107

	// NameLengthMax bounds bdev and controller names. Names appear in socket
	// paths, logs and metric labels; 64 bytes is plenty for all three.
	NameLengthMax = 64

	// NumQueuesMax is the most request queues one controller offers
	// (GET_QUEUE_NUM), so the vhost layer can size its tables for at most
	// 2 + NumQueuesMax vrings (control, event, requests); 64 request queues
	// serve a 64-vCPU guest with one queue per vCPU.
	NumQueuesMax = 64

	// NumQueuesDefault is offered when num_queues is absent. QEMU gives a guest
	// one request queue per vCPU unless -device ...,num_queues= says
	// otherwise, and QEMU 7.2 does not check that against what the backend
	// offers, so a default of 1 would break most multi-vCPU guests. Guests
	// may use fewer queues than offered.
	NumQueuesDefault = 4

	// MaxSessionsDefault and MaxSessionsMax bound a controller's max_sessions.
	MaxSessionsDefault = 1
	MaxSessionsMax     = 8

	TargetMax = 255   // SCSI target ids 0..255 (one byte in the virtio-scsi LUN field)
	LUNMax    = 16383 // LUN ids 0..16383 (SAM flat space addressing, 14 bits)

	BlockSizeDefault = 512 // the only block size SeaBIOS boots from

	WorkersDefault    = 2  // file bdev worker goroutines
	WorkersMax        = 64 // more workers than this only add contention
	QueueDepthDefault = 128
	QueueDepthMax     = 4096 // io_uring SQ entries / io_setup nr_events of one aio bdev channel; librbd operations of one rbd bdev channel

	// OpTimeoutDefault is an rbd bdev's op_timeout when the file gives
	// none: an OSD operation not finished in that long fails the IO.
	OpTimeoutDefault = 30 * time.Second

	// InjectDelayMax bounds an error bdev's injected delay: longer than a
	// minute only trips guest command timeouts (30 s on Linux), which a
	// shorter delay does as well.
	InjectDelayMax = time.Minute

	// SocketModeDefault lets only the socket's owner (the target's user,
	// normally root, unless socket_owner says otherwise) connect.
	SocketModeDefault = 0o600

	MetricsListenDefault = "127.0.0.1:9478"

	// RPCSocketName is the JSON-RPC socket's file name in SocketDir when
	// [rpc] socket is absent. A controller cannot take this name.
	RPCSocketName = "rpc.sock"
)

// Config is a validated target configuration.
type Config struct {
	// SocketDir holds one vhost-user socket per controller, named after it.
	SocketDir   string
	Metrics     Metrics
	RPC         RPC
	Reactors    Reactors
	Bdevs       []Bdev
	Controllers []Controller

	// source names where the configuration came from, for error messages.
	source string
}

// Metrics configures the Prometheus endpoint.
type Metrics struct {
	// Listen is the host:port of the HTTP endpoint serving /metrics;
	// "" disables it.
	Listen string
}

// RPC configures the JSON-RPC management socket.
type RPC struct {
	// Socket is the unix socket's path; "" disables the RPC server. Default
	// SocketDir/RPCSocketName.
	Socket string
	// SocketMode is the socket file's permission bits (at most 0o777).
	// Whoever can connect can create, delete and resize disks: 0600 by
	// default, like controller sockets.
	SocketMode uint32
	// SocketOwner and SocketGroup, when not "", are the user and group the
	// socket file is given, by name or numeric id.
	SocketOwner string
	SocketGroup string
}

// Reactors configures the polling threads.
type Reactors struct {
	// CPUs lists the CPUs to run one reactor on each, in order; no duplicates.
	CPUs []int
	// Poll is PollBusy or PollAdaptive.
	Poll string
}

// Bdev describes one block device.
type Bdev struct {
	Name string
	Type string // TypeMalloc, TypeFile, TypeAIO, TypeError or TypeRBD
	// Path is the backing file or block device (file and aio only).
	Path string
	// Engine is the aio engine (aio only): EngineAuto, EngineURing or EngineLibaio.
	Engine string
	// Hugepages is the page size behind a malloc bdev's memory (malloc only):
	// HugepagesAuto, HugepagesHugeTLB, HugepagesTHP or HugepagesNone.
	Hugepages string
	// Size is the device size in bytes, a multiple of BlockSize. For file and
	// aio bdevs without Create, 0 means "the size of the backing file".
	Size uint64
	// BlockSize is the logical block size in bytes: 512 or 4096.
	BlockSize uint32
	// Create makes the backing file (file and aio only) if it does not exist,
	// with Size bytes; an existing file is used as it is.
	Create bool
	// ReadOnly opens the backing file (or rbd image) read-only and makes the
	// LUN write-protected.
	ReadOnly bool
	// Workers is the number of I/O goroutines (file only).
	Workers int
	// QueueDepth is the most I/Os in flight per reactor channel (file, aio
	// and rbd); more wait in a FIFO.
	QueueDepth int
	// Base is the bdev an error bdev wraps (error only); it must be defined
	// earlier in the file. Size and block size are the base's.
	Base string
	// Inject lists an error bdev's faults, first match wins (error only).
	Inject []Inject
	// Pool and Image name an rbd bdev's image (rbd only; both required).
	// Its size is the image's: an rbd bdev has no Size.
	Pool  string
	Image string
	// Namespace is the RADOS namespace of the image (rbd only); "" is the
	// pool's default namespace.
	Namespace string
	// Conf is the ceph.conf path, absolute (rbd only); "" lets librados
	// search (/etc/ceph/ceph.conf, $CEPH_CONF).
	Conf string
	// User is the cephx client id without "client." (rbd only); "" is
	// "admin".
	User string
	// Keyring is the keyring path, absolute (rbd only); "" takes what
	// ceph.conf says.
	Keyring string
	// OpTimeout fails an rbd bdev's OSD operation that has not finished in
	// that long, and the IO with it (rbd only); 0 waits for ever. A file
	// without op_timeout gets OpTimeoutDefault.
	OpTimeout time.Duration
	// UUID identifies the device to guests (SCSI serial and VPD page 0x83 are
	// derived from it). When the file gives none it is BdevUUID(Name), so it
	// is stable across restarts.
	UUID [16]byte
}

// Inject is one fault of an error bdev: IOs of operation Op overlapping
// blocks [LBAStart, LBAStart+LBACount) (LBACount 0 = to the end; a flush
// matches on Op alone) wait Delay and then fail with Error, or go on to the
// base when Error is "". At least one of Error and Delay is set. Count > 0
// limits the entry to that many IOs (SPDK's num): one slow or failed
// command, its retry served.
type Inject struct {
	Op       string // one of InjectOps
	LBAStart uint64
	LBACount uint64
	Error    string // "" or InjectEIO
	Delay    time.Duration
	Count    uint64 // 0: every matching IO
}

// Controller describes one vhost-user controller (one socket): a
// virtio-scsi HBA with LUNs, or a virtio-blk disk.
type Controller struct {
	Name string
	// Type is ControllerSCSI or ControllerBlk.
	Type string
	// Bdev is a blk controller's disk: the name of a Bdev in Config.Bdevs
	// (blk only; a scsi controller's bdevs are in LUNs).
	Bdev string
	// ReadOnly presents a blk controller's disk read-only (VIRTIO_BLK_F_RO)
	// whether or not the bdev takes writes (blk only).
	ReadOnly bool
	// CPUs are the reactors (named by CPU) serving this controller's queues;
	// a subset of Reactors.CPUs.
	CPUs []int
	// NumQueues is the number of request queues offered, 1..NumQueuesMax.
	NumQueues int
	// MaxSessions is how many front-ends may be connected at once,
	// 1..MaxSessionsMax. One by default: a second VM started on a mistyped
	// socket path is refused instead of sharing (and corrupting) the disks.
	// Two let the destination QEMU of a live migration on the same host
	// connect while the source still runs.
	MaxSessions int
	// Migration offers live migration to front-ends (VHOST_F_LOG_ALL and
	// LOG_SHMFD: the target marks what it writes into guest memory in QEMU's
	// dirty log while a migration runs). On by default; false pins every VM
	// using this controller to its host (QEMU refuses to migrate it).
	Migration bool
	// SocketMode is the permission bits of the socket file (at most 0o777).
	SocketMode uint32
	// SocketOwner and SocketGroup, when not "", are the user and group the
	// socket file is given, by name or numeric id. See SocketIDs.
	SocketOwner string
	SocketGroup string
	// LUNs are a scsi controller's disks; a blk controller has none.
	LUNs []LUN
}

// NewController returns a controller named name on reactors cpus with every
// other setting at its default (the file, the runtime API and the built-in
// configuration all start from it): type scsi, NumQueuesDefault queues,
// MaxSessionsDefault sessions, migration offered, SocketModeDefault, no LUNs.
// A blk controller sets Type to ControllerBlk and Bdev.
func NewController(name string, cpus []int) Controller {
	return Controller{Name: name, Type: ControllerSCSI, CPUs: cpus, NumQueues: NumQueuesDefault,
		MaxSessions: MaxSessionsDefault, Migration: true, SocketMode: SocketModeDefault}
}

// LUN maps a SCSI (target, LUN) address of a controller to a bdev.
type LUN struct {
	Target uint8
	LUN    uint16
	Bdev   string // name of a Bdev in Config.Bdevs
}

// Load reads and parses the configuration file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return Parse(data, path)
}

// Default returns the built-in configuration: one reactor on the first CPU
// this process may run on, busy polling, metrics on 127.0.0.1:9478, the
// JSON-RPC socket at DefaultSocketDir()/rpc.sock, a 256 MiB
// malloc bdev "mem0" with 512-byte blocks (hugepages "auto"), and a controller "vhost.0" offering
// NumQueuesDefault request queues with mem0 at target 0, LUN 0. It is valid.
func Default() *Config {
	cpu := allowedCPUs()[0]
	ctrl := NewController("vhost.0", []int{cpu})
	ctrl.LUNs = []LUN{{Target: 0, LUN: 0, Bdev: "mem0"}}
	c := &Config{
		SocketDir: DefaultSocketDir(),
		Metrics:   Metrics{Listen: MetricsListenDefault},
		RPC:       RPC{Socket: filepath.Join(DefaultSocketDir(), RPCSocketName), SocketMode: SocketModeDefault},
		Reactors:  Reactors{CPUs: []int{cpu}, Poll: PollBusy},
		Bdevs: []Bdev{{
			Name:      "mem0",
			Type:      TypeMalloc,
			Size:      256 << 20,
			BlockSize: BlockSizeDefault,
			Hugepages: HugepagesAuto,
			UUID:      BdevUUID("mem0"),
		}},
		Controllers: []Controller{ctrl},
		source:      "built-in default config",
	}
	if err := c.Validate(); err != nil {
		// Only a socket directory too long for any socket could get here.
		panic(fmt.Sprintf("config: built-in default is invalid: %v", err))
	}
	return c
}

// DefaultSocketDir is the socket_dir used when the file sets none:
// /var/run/vhost-target for root, else $XDG_RUNTIME_DIR/vhost-target when that
// variable holds an absolute path short enough to leave room for any
// controller name within SocketPathMax, else /tmp/vhost-target-<uid>.
func DefaultSocketDir() string {
	uid := os.Getuid()
	if uid == 0 {
		return "/var/run/vhost-target"
	}
	if dir := os.Getenv("XDG_RUNTIME_DIR"); filepath.IsAbs(dir) {
		dir = filepath.Join(dir, "vhost-target")
		if len(dir)+1+NameLengthMax <= SocketPathMax {
			return dir
		}
	}
	return "/tmp/vhost-target-" + strconv.Itoa(uid)
}

// SocketPath is the path of ctrl's vhost-user socket: SocketDir/<name>.
func (c *Config) SocketPath(ctrl *Controller) string {
	return filepath.Join(c.SocketDir, ctrl.Name)
}

// SetSource names where c came from ("rpc", a file name) in the errors
// Validate returns, so runtime changes checked by Validate read like file
// errors with another origin.
func (c *Config) SetSource(source string) { c.source = source }

// Source returns the name set by Parse or SetSource.
func (c *Config) Source() string { return c.source }

// Clone returns a deep copy of c: runtime changes are made to a copy,
// validated whole, and only then become the running configuration.
func (c *Config) Clone() *Config {
	n := *c
	n.Reactors.CPUs = slices.Clone(c.Reactors.CPUs)
	n.Bdevs = slices.Clone(c.Bdevs)
	for i := range n.Bdevs {
		n.Bdevs[i].Inject = slices.Clone(c.Bdevs[i].Inject)
	}
	n.Controllers = slices.Clone(c.Controllers)
	for i := range n.Controllers {
		n.Controllers[i].CPUs = slices.Clone(c.Controllers[i].CPUs)
		n.Controllers[i].LUNs = slices.Clone(c.Controllers[i].LUNs)
	}
	return &n
}

// Controller returns the controller called name, or nil.
func (c *Config) Controller(name string) *Controller {
	for i := range c.Controllers {
		if c.Controllers[i].Name == name {
			return &c.Controllers[i]
		}
	}
	return nil
}

// Bdev returns the bdev called name, or nil.
func (c *Config) Bdev(name string) *Bdev {
	for i := range c.Bdevs {
		if c.Bdevs[i].Name == name {
			return &c.Bdevs[i]
		}
	}
	return nil
}

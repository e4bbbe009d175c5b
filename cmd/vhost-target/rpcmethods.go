package main

// The JSON-RPC methods: SPDK's names and parameters where SPDK has the
// method (doc/jsonrpc.md, python/spdk/rpc/), ours where it has none. Each
// handler decodes its parameters strictly, turns them into a config entry or
// a change, and calls manage.go, which validates with the config package.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/bits"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"vhost-target/config"
	"vhost-target/rpc"
	"vhost-target/vhost"
)

// rpcServer is the running JSON-RPC server, or nil.
type rpcServer = *rpc.Server

// startRPC serves the management API on cfg.RPC.Socket ("" = none).
func (t *target) startRPC(cfg *config.Config) error {
	if cfg.RPC.Socket == "" {
		return nil
	}
	uid, gid, err := cfg.RPC.SocketIDs()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(cfg.RPC.Socket), 0o755); err != nil {
		return fmt.Errorf("rpc.socket: %w", err)
	}
	s := rpc.NewServer(rpc.Options{Logger: t.log})
	for name, h := range t.methods() {
		s.Register(name, h)
	}
	if err := s.Listen(cfg.RPC.Socket, os.FileMode(cfg.RPC.SocketMode), uid, gid); err != nil {
		return fmt.Errorf("rpc.socket: %w", err)
	}
	t.rpc = s
	t.log.Info("JSON-RPC listening", "socket", cfg.RPC.Socket, "methods", len(t.methods()))
	return nil
}

func (t *target) stopRPC() {
	if t.rpc != nil {
		t.rpc.Close()
		t.rpc = nil
	}
}

// handler adapts a management call to rpc.Handler: params are decoded
// strictly into a fresh P, and management errors keep their codes.
func handler[P any](f func(ctx context.Context, p *P) (any, error)) rpc.Handler {
	return func(ctx context.Context, raw json.RawMessage) (any, error) {
		p := new(P)
		if err := rpc.DecodeParams(raw, p); err != nil {
			return nil, err
		}
		res, err := f(ctx, p)
		var me *mgmtError
		if errors.As(err, &me) {
			return nil, &rpc.Error{Code: me.Code, Message: me.Msg}
		}
		return res, err
	}
}

func invalid(format string, a ...any) error {
	return &rpc.Error{Code: codeInvalidParams, Message: fmt.Sprintf(format, a...)}
}

type noParams struct{}

type bdevMallocCreate struct {
	Name      string  `json:"name"`
	NumBlocks *uint64 `json:"num_blocks"`
	BlockSize *uint32 `json:"block_size"`
	UUID      string  `json:"uuid"`
	Hugepages string  `json:"hugepages"` // ours: auto, hugetlb, thp, none
}

// pathBdevParams are what bdev_aio_create and bdev_file_create share.
type pathBdevParams struct {
	Name       string  `json:"name"`
	Filename   string  `json:"filename"`
	BlockSize  *uint32 `json:"block_size"`
	Readonly   bool    `json:"readonly"`
	UUID       string  `json:"uuid"`
	QueueDepth *int    `json:"queue_depth"` // ours, as in the file
}

type bdevAIOCreate struct {
	pathBdevParams
	Engine string `json:"engine"` // ours: auto, uring, libaio, as in the file
}

type bdevFileCreate struct {
	pathBdevParams
	Size    json.RawMessage `json:"size"` // bytes, or a string such as "10GiB"
	Create  bool            `json:"create"`
	Workers *int            `json:"workers"`
}

// bdevRBDCreate are bdev_rbd_create's parameters: SPDK's (name, pool_name,
// rbd_name, block_size, user_id, config, cluster_name, uuid) and ours, as
// in the file. SPDK's config (ceph settings as key/value pairs) and
// cluster_name (a cluster registered with bdev_rbd_register_cluster) are
// refused when given: the settings come from the ceph.conf named by conf.
type bdevRBDCreate struct {
	Name        string         `json:"name"`
	PoolName    string         `json:"pool_name"`
	RBDName     string         `json:"rbd_name"`
	BlockSize   *uint32        `json:"block_size"`
	UserID      string         `json:"user_id"`
	UUID        string         `json:"uuid"`
	Config      map[string]any `json:"config"`
	ClusterName string         `json:"cluster_name"`
	Namespace   string         `json:"namespace"`   // ours
	Conf        string         `json:"conf"`        // ours: ceph.conf path
	Keyring     string         `json:"keyring"`     // ours
	QueueDepth  *int           `json:"queue_depth"` // ours
	Readonly    bool           `json:"readonly"`    // ours
	OpTimeout   string         `json:"op_timeout"`  // ours: a duration, "0s" waits for ever
}

type bdevName struct {
	Name string `json:"name"`
}

type bdevResize struct {
	Name    string  `json:"name"`
	NewSize *uint64 `json:"new_size"` // MiB, as SPDK's bdev_null_resize
}

type getBdevs struct {
	Name    string `json:"name"`
	Timeout int    `json:"timeout"` // SPDK: wait for the bdev; ours answers at once
}

// createController are vhost_create_scsi_controller's parameters, and the
// ones vhost_create_blk_controller shares.
type createController struct {
	Ctrlr       string `json:"ctrlr"`
	Cpumask     string `json:"cpumask"`
	NumQueues   *int   `json:"num_queues"`
	MaxSessions *int   `json:"max_sessions"`
	Migration   *bool  `json:"migration"`
	SocketMode  string `json:"socket_mode"`
	SocketOwner string `json:"socket_owner"`
	SocketGroup string `json:"socket_group"`
}

// createBlkController are vhost_create_blk_controller's parameters: SPDK's
// (ctrlr, dev_name, cpumask, readonly, packed_ring, transport) and ours.
type createBlkController struct {
	createController
	DevName    string `json:"dev_name"`
	Readonly   bool   `json:"readonly"`
	PackedRing bool   `json:"packed_ring"`
	Transport  string `json:"transport"`
}

// blkTransport is SPDK's name of the one virtio-blk transport served here
// (vhost_create_blk_controller's transport, vhost_get_controllers' block.transport).
const blkTransport = "vhost_user_blk"

// targetAddr is the controller and SCSI target the target and LUN methods name.
type targetAddr struct {
	Ctrlr         string `json:"ctrlr"`
	SCSITargetNum *int   `json:"scsi_target_num"`
}

// lunAddr adds the LUN.
type lunAddr struct {
	targetAddr
	LUN *int `json:"lun"`
}

type addTarget struct {
	targetAddr
	BdevName string `json:"bdev_name"`
}

type removeTarget struct {
	targetAddr
}

type addLUN struct {
	lunAddr
	BdevName string `json:"bdev_name"`
}

type removeLUN struct {
	lunAddr
}

type deleteController struct {
	Ctrlr string `json:"ctrlr"`
	Force bool   `json:"force"` // ours: close a controller a VM is connected to
}

type ctrlrName struct {
	Name string `json:"name"`
}

// methods returns every method by name.
func (t *target) methods() map[string]rpc.Handler {
	m := map[string]rpc.Handler{
		"bdev_malloc_create": handler(t.rpcMallocCreate),
		"bdev_malloc_delete": handler(func(_ context.Context, p *bdevName) (any, error) {
			return true, t.deleteBdev(p.Name, config.TypeMalloc)
		}),
		"bdev_aio_create": handler(t.rpcAIOCreate),
		"bdev_aio_delete": handler(func(_ context.Context, p *bdevName) (any, error) {
			return true, t.deleteBdev(p.Name, config.TypeAIO)
		}),
		"bdev_aio_rescan": handler(func(_ context.Context, p *bdevName) (any, error) {
			return true, t.rescanBdev(p.Name, config.TypeAIO)
		}),
		"bdev_file_create": handler(t.rpcFileCreate),
		"bdev_file_delete": handler(func(_ context.Context, p *bdevName) (any, error) {
			return true, t.deleteBdev(p.Name, config.TypeFile)
		}),
		"bdev_file_rescan": handler(func(_ context.Context, p *bdevName) (any, error) {
			return true, t.rescanBdev(p.Name, config.TypeFile)
		}),
		"bdev_rbd_create": handler(t.rpcRBDCreate),
		"bdev_rbd_delete": handler(func(_ context.Context, p *bdevName) (any, error) {
			return true, t.deleteBdev(p.Name, config.TypeRBD)
		}),
		"bdev_rbd_resize": handler(t.rpcRBDResize),
		"bdev_rbd_rescan": handler(func(_ context.Context, p *bdevName) (any, error) {
			return true, t.rescanBdev(p.Name, config.TypeRBD) // ours: the image resized by rbd resize
		}),
		"bdev_resize":                         handler(t.rpcResize),
		"bdev_get_bdevs":                      handler(t.rpcGetBdevs),
		"vhost_create_scsi_controller":        handler(t.rpcCreateController),
		"vhost_create_blk_controller":         handler(t.rpcCreateBlkController),
		"vhost_scsi_controller_add_target":    handler(t.rpcAddTarget),
		"vhost_scsi_controller_remove_target": handler(t.rpcRemoveTarget),
		"vhost_scsi_controller_add_lun":       handler(t.rpcAddLUN),
		"vhost_scsi_controller_remove_lun":    handler(t.rpcRemoveLUN),
		"vhost_delete_controller": handler(func(_ context.Context, p *deleteController) (any, error) {
			if p.Ctrlr == "" {
				return nil, invalid("ctrlr: required")
			}
			return true, t.deleteController(p.Ctrlr, p.Force, "rpc")
		}),
		"vhost_get_controllers": handler(t.rpcGetControllers),
		"save_config": handler(func(_ context.Context, _ *noParams) (any, error) {
			return t.saveConfig()
		}),
		"framework_reload": handler(func(_ context.Context, _ *noParams) (any, error) {
			changes, err := t.reload("framework_reload")
			if changes == nil {
				changes = []string{}
			}
			return map[string]any{"changes": changes}, err
		}),
		"vhost_get_queue_states": handler(func(_ context.Context, p *ctrlrName) (any, error) {
			return t.queueStates(p.Name)
		}),
		"spdk_get_version": handler(func(_ context.Context, _ *noParams) (any, error) {
			return versionInfo(), nil
		}),
	}
	names := make([]string, 0, len(m)+1)
	for name := range m {
		names = append(names, name)
	}
	names = append(names, "rpc_get_methods")
	sort.Strings(names)
	m["rpc_get_methods"] = handler(func(_ context.Context, _ *struct {
		Current bool `json:"current"`
	}) (any, error) {
		return names, nil
	})
	return m
}

// nextName returns prefix followed by the smallest number no bdev has
// (SPDK names unnamed malloc bdevs Malloc0, Malloc1, ...).
func (t *target) nextName(prefix string) string {
	cfg := t.runningConfig()
	for i := 0; ; i++ {
		if n := prefix + strconv.Itoa(i); cfg.Bdev(n) == nil {
			return n
		}
	}
}

// bdevUUID is the UUID given (any case, with or without dashes is up to
// config's parser) or the one derived from the name.
func bdevUUID(name, s string) ([16]byte, error) {
	if s == "" {
		return config.BdevUUID(name), nil
	}
	u, err := config.ParseUUID(s)
	if err != nil {
		return u, invalid("uuid: %v", err)
	}
	return u, nil
}

func (t *target) rpcMallocCreate(_ context.Context, p *bdevMallocCreate) (any, error) {
	if p.NumBlocks == nil {
		return nil, invalid("num_blocks: required")
	}
	if p.BlockSize == nil {
		return nil, invalid("block_size: required")
	}
	if p.Name == "" {
		p.Name = t.nextName("Malloc")
	}
	hi, size := bits.Mul64(*p.NumBlocks, uint64(*p.BlockSize))
	if hi != 0 || size > math.MaxInt64 {
		return nil, invalid("num_blocks × block_size overflows")
	}
	u, err := bdevUUID(p.Name, p.UUID)
	if err != nil {
		return nil, err
	}
	hp := p.Hugepages
	if hp == "" {
		hp = config.HugepagesAuto
	}
	b := config.Bdev{Name: p.Name, Type: config.TypeMalloc, Size: size, BlockSize: *p.BlockSize, Hugepages: hp, UUID: u}
	if size == 0 {
		return nil, invalid("num_blocks: must be greater than 0")
	}
	if err := t.addBdev(b, "rpc"); err != nil {
		return nil, err
	}
	return p.Name, nil
}

// bdev checks the shared parameters and returns a bdev of type typ with
// them and the defaults.
func (p *pathBdevParams) bdev(typ string) (config.Bdev, error) {
	if p.Name == "" {
		return config.Bdev{}, invalid("name: required")
	}
	if p.Filename == "" {
		return config.Bdev{}, invalid("filename: required")
	}
	u, err := bdevUUID(p.Name, p.UUID)
	if err != nil {
		return config.Bdev{}, err
	}
	b := config.Bdev{Name: p.Name, Type: typ, Path: p.Filename, BlockSize: config.BlockSizeDefault,
		ReadOnly: p.Readonly, QueueDepth: config.QueueDepthDefault, UUID: u}
	if p.BlockSize != nil {
		b.BlockSize = *p.BlockSize
	}
	if p.QueueDepth != nil {
		b.QueueDepth = *p.QueueDepth
	}
	return b, nil
}

func (t *target) rpcAIOCreate(_ context.Context, p *bdevAIOCreate) (any, error) {
	if p.BlockSize != nil && *p.BlockSize == 0 { // SPDK: 0 = detect; ours: the default
		p.BlockSize = nil
	}
	b, err := p.bdev(config.TypeAIO)
	if err != nil {
		return nil, err
	}
	b.Engine = config.EngineAuto
	if p.Engine != "" {
		b.Engine = p.Engine
	}
	if err := t.addBdev(b, "rpc"); err != nil {
		return nil, err
	}
	return p.Name, nil
}

func (t *target) rpcFileCreate(_ context.Context, p *bdevFileCreate) (any, error) {
	b, err := p.bdev(config.TypeFile)
	if err != nil {
		return nil, err
	}
	b.Create, b.Workers = p.Create, config.WorkersDefault
	if len(p.Size) > 0 && string(p.Size) != "null" {
		var n uint64
		var s string
		switch {
		case json.Unmarshal(p.Size, &n) == nil:
			b.Size = n
		case json.Unmarshal(p.Size, &s) == nil:
			if b.Size, err = config.ParseSize(s); err != nil {
				return nil, invalid("size: %v", err)
			}
		default:
			return nil, invalid("size: must be a number of bytes or a string such as \"10GiB\"")
		}
	}
	if p.Workers != nil {
		b.Workers = *p.Workers
	}
	if err := t.addBdev(b, "rpc"); err != nil {
		return nil, err
	}
	return p.Name, nil
}

// rpcRBDCreate opens an rbd bdev (SPDK names an unnamed one Ceph0, Ceph1,
// ...). In a binary built without the rbd tag it fails with ENOTSUP after
// the parameters are checked.
func (t *target) rpcRBDCreate(_ context.Context, p *bdevRBDCreate) (any, error) {
	switch {
	case len(p.Config) > 0:
		return nil, invalid("config: ceph settings as key/value pairs are not supported; name a ceph.conf with conf (and keyring, user_id)")
	case p.ClusterName != "":
		return nil, invalid("cluster_name: registered clusters (bdev_rbd_register_cluster) are not supported; name a ceph.conf with conf")
	case p.PoolName == "":
		return nil, invalid("pool_name: required")
	case p.RBDName == "":
		return nil, invalid("rbd_name: required")
	}
	if p.Name == "" {
		p.Name = t.nextName("Ceph")
	}
	u, err := bdevUUID(p.Name, p.UUID)
	if err != nil {
		return nil, err
	}
	b := config.Bdev{Name: p.Name, Type: config.TypeRBD, Pool: p.PoolName, Image: p.RBDName, Namespace: p.Namespace,
		Conf: p.Conf, User: p.UserID, Keyring: p.Keyring, BlockSize: config.BlockSizeDefault, ReadOnly: p.Readonly,
		QueueDepth: config.QueueDepthDefault, OpTimeout: config.OpTimeoutDefault, UUID: u}
	if p.BlockSize != nil && *p.BlockSize != 0 { // 0: the default, as bdev_aio_create
		b.BlockSize = *p.BlockSize
	}
	if p.QueueDepth != nil {
		b.QueueDepth = *p.QueueDepth
	}
	if p.OpTimeout != "" {
		d, err := time.ParseDuration(p.OpTimeout)
		if err != nil {
			return nil, invalid("op_timeout: %q is not a duration such as \"30s\" (\"0s\" waits for ever)", p.OpTimeout)
		}
		b.OpTimeout = d
	}
	if err := t.addBdev(b, "rpc"); err != nil {
		return nil, err
	}
	return p.Name, nil
}

// newSize checks bdev_resize's and bdev_rbd_resize's parameters and returns
// the size in bytes.
func (p *bdevResize) newSize() (uint64, error) {
	if p.Name == "" {
		return 0, invalid("name: required")
	}
	if p.NewSize == nil {
		return 0, invalid("new_size: required (MiB)")
	}
	if *p.NewSize == 0 || *p.NewSize > math.MaxInt64>>20 {
		return 0, invalid("new_size: %d MiB is out of range", *p.NewSize)
	}
	return *p.NewSize << 20, nil
}

func (t *target) rpcResize(_ context.Context, p *bdevResize) (any, error) {
	size, err := p.newSize()
	if err != nil {
		return nil, err
	}
	return true, t.resizeBdev(p.Name, size)
}

// rpcRBDResize is bdev_resize for rbd bdevs only (SPDK's bdev_rbd_resize):
// the image is resized and the guests told, as for any bdev.
func (t *target) rpcRBDResize(_ context.Context, p *bdevResize) (any, error) {
	size, err := p.newSize()
	if err != nil {
		return nil, err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if b := t.cfg.Bdev(p.Name); b == nil || b.Type != config.TypeRBD {
		return nil, errf(codeENODEV, "rbd bdev %q does not exist", p.Name)
	}
	return true, t.resizeBdevLocked(p.Name, size, "rpc")
}

// bdevJSON is one bdev as SPDK's bdev_get_bdevs shows it.
type bdevJSON struct {
	Name             string          `json:"name"`
	Aliases          []string        `json:"aliases"`
	ProductName      string          `json:"product_name"`
	BlockSize        uint32          `json:"block_size"`
	NumBlocks        uint64          `json:"num_blocks"`
	UUID             string          `json:"uuid"`
	Claimed          bool            `json:"claimed"`
	Zoned            bool            `json:"zoned"`
	SupportedIOTypes map[string]bool `json:"supported_io_types"`
	DriverSpecific   map[string]any  `json:"driver_specific"`
}

var productNames = map[string]string{
	config.TypeMalloc: "Malloc disk", config.TypeAIO: "AIO disk", config.TypeFile: "File disk", config.TypeError: "Error disk",
	config.TypeRBD: "Ceph Rbd Disk",
}

func (t *target) rpcGetBdevs(_ context.Context, p *getBdevs) (any, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := []bdevJSON{}
	for i := range t.cfg.Bdevs {
		b := &t.cfg.Bdevs[i]
		if p.Name != "" && b.Name != p.Name {
			continue
		}
		info := t.bdevs[b.Name].Info()
		spec := map[string]any{}
		switch b.Type {
		case config.TypeMalloc:
			spec["hugepages"] = b.Hugepages
		case config.TypeAIO:
			spec["filename"], spec["readonly"], spec["engine"], spec["queue_depth"] = b.Path, b.ReadOnly, b.Engine, b.QueueDepth
		case config.TypeFile:
			spec["filename"], spec["readonly"], spec["workers"], spec["queue_depth"] = b.Path, b.ReadOnly, b.Workers, b.QueueDepth
		case config.TypeError:
			spec["base_bdev"] = b.Base
		case config.TypeRBD:
			// SPDK's keys, and ours where the file has more.
			spec["pool_name"], spec["rbd_name"] = b.Pool, b.Image
			for k, v := range map[string]string{"namespace": b.Namespace, "config_file": b.Conf, "user_id": b.User, "keyring": b.Keyring} {
				if v != "" {
					spec[k] = v
				}
			}
			spec["readonly"], spec["queue_depth"], spec["op_timeout"] = b.ReadOnly, b.QueueDepth, b.OpTimeout.String()
		}
		out = append(out, bdevJSON{
			Name: b.Name, Aliases: []string{}, ProductName: productNames[b.Type],
			BlockSize: info.BlockSize, NumBlocks: info.NumBlocks, UUID: config.FormatUUID(info.UUID),
			Claimed: len(usersOf(t.cfg, b.Name)) > 0,
			SupportedIOTypes: map[string]bool{
				"read": true, "write": !info.ReadOnly, "flush": true, "unmap": info.Unmap,
				"write_zeroes": info.WriteZeroes, "reset": false,
			},
			DriverSpecific: map[string]any{b.Type: spec},
		})
	}
	if p.Name != "" && len(out) == 0 {
		return nil, &rpc.Error{Code: codeENODEV, Message: fmt.Sprintf("bdev %q does not exist", p.Name)}
	}
	return out, nil
}

// parseCPUMask reads SPDK's cpumask forms: a hex mask ("0x3", "3") or a
// list ("[0,2-3]").
func parseCPUMask(s string) ([]int, error) {
	s = strings.TrimSpace(s)
	var cpus []int
	if strings.HasPrefix(s, "[") {
		if !strings.HasSuffix(s, "]") {
			return nil, fmt.Errorf("%q: a list must end with ']'", s)
		}
		for _, part := range strings.Split(s[1:len(s)-1], ",") {
			lo, hi, isRange := strings.Cut(strings.TrimSpace(part), "-")
			a, err1 := strconv.Atoi(lo)
			b := a
			var err2 error
			if isRange {
				b, err2 = strconv.Atoi(hi)
			}
			if err1 != nil || err2 != nil || a < 0 || b < a || b > 1023 {
				return nil, fmt.Errorf("%q: %q is not a CPU or range of CPUs", s, part)
			}
			for c := a; c <= b; c++ {
				if !slices.Contains(cpus, c) {
					cpus = append(cpus, c)
				}
			}
		}
	} else {
		h := strings.TrimPrefix(strings.TrimPrefix(s, "0x"), "0X")
		if h == "" || len(h) > 256 {
			return nil, fmt.Errorf("%q is not a hex CPU mask such as \"0x3\" or a list such as \"[0,2-3]\"", s)
		}
		for i := len(h) - 1; i >= 0; i-- {
			v, err := strconv.ParseUint(h[i:i+1], 16, 8)
			if err != nil {
				return nil, fmt.Errorf("%q is not a hex CPU mask such as \"0x3\" or a list such as \"[0,2-3]\"", s)
			}
			for bit := range 4 {
				if v&(1<<bit) != 0 {
					cpus = append(cpus, (len(h)-1-i)*4+bit)
				}
			}
		}
	}
	if len(cpus) == 0 {
		return nil, fmt.Errorf("%q names no CPU", s)
	}
	sort.Ints(cpus)
	return cpus, nil
}

// formatCPUMask writes cpus as SPDK shows a cpumask: "0x" and hex.
func formatCPUMask(cpus []int) string {
	if len(cpus) == 0 {
		return "0x0"
	}
	digits := make([]byte, slices.Max(cpus)/4+1)
	for _, c := range cpus {
		digits[len(digits)-1-c/4] |= 1 << (c % 4)
	}
	for i, d := range digits {
		digits[i] = "0123456789abcdef"[d]
	}
	return "0x" + string(digits)
}

func (t *target) rpcCreateController(_ context.Context, p *createController) (any, error) {
	cc, err := p.controller(t.runningConfig())
	if err != nil {
		return nil, err
	}
	return true, t.addController(cc, "rpc")
}

// controller checks the parameters every controller type takes and returns
// a scsi controller with them and the defaults.
func (p *createController) controller(cfg *config.Config) (config.Controller, error) {
	if p.Ctrlr == "" {
		return config.Controller{}, invalid("ctrlr: required")
	}
	cc := config.NewController(p.Ctrlr, slices.Clone(cfg.Reactors.CPUs))
	cc.SocketOwner, cc.SocketGroup = p.SocketOwner, p.SocketGroup
	if p.Cpumask != "" {
		cpus, err := parseCPUMask(p.Cpumask)
		if err != nil {
			return config.Controller{}, invalid("cpumask: %v", err)
		}
		cc.CPUs = cpus
	}
	if p.NumQueues != nil {
		cc.NumQueues = *p.NumQueues
	}
	if p.MaxSessions != nil {
		cc.MaxSessions = *p.MaxSessions
	}
	if p.Migration != nil {
		cc.Migration = *p.Migration
	}
	if p.SocketMode != "" {
		m, err := strconv.ParseUint(strings.TrimPrefix(p.SocketMode, "0o"), 8, 32)
		if err != nil || m > 0o777 {
			return config.Controller{}, invalid("socket_mode: %q is not an octal mode such as \"0660\"", p.SocketMode)
		}
		cc.SocketMode = uint32(m)
	}
	return cc, nil
}

// rpcCreateBlkController makes a vhost-user-blk controller serving bdev
// dev_name. SPDK's packed_ring is refused when true (the rings served here
// are split rings), and transport may only name vhost-user-blk.
func (t *target) rpcCreateBlkController(_ context.Context, p *createBlkController) (any, error) {
	cc, err := p.controller(t.runningConfig())
	if err != nil {
		return nil, err
	}
	switch {
	case p.DevName == "":
		return nil, invalid("dev_name: required: the bdev the controller serves")
	case p.PackedRing:
		return nil, errf(codeENOTSUP, "packed_ring: packed virtqueues are not supported; leave packed_ring false (split rings)")
	case p.Transport != "" && p.Transport != blkTransport:
		return nil, invalid("transport: %q is not %q, the only transport served", p.Transport, blkTransport)
	}
	cc.Type, cc.Bdev, cc.ReadOnly = config.ControllerBlk, p.DevName, p.Readonly
	return true, t.addController(cc, "rpc")
}

// check checks ctrlr and scsi_target_num; allowFree lets -1 mean "the
// first free target" (as SPDK's add_target).
func (a *targetAddr) check(allowFree bool) (int, error) {
	p := a.SCSITargetNum
	switch {
	case a.Ctrlr == "":
		return 0, invalid("ctrlr: required")
	case p == nil:
		return 0, invalid("scsi_target_num: required")
	case *p == -1 && allowFree:
		return -1, nil
	case *p < 0 || *p > config.TargetMax:
		return 0, invalid("scsi_target_num: %d is out of range 0..%d", *p, config.TargetMax)
	}
	return *p, nil
}

// check checks ctrlr, scsi_target_num and lun.
func (a *lunAddr) check() (target, lun int, err error) {
	if target, err = a.targetAddr.check(false); err != nil {
		return 0, 0, err
	}
	switch p := a.LUN; {
	case p == nil:
		return 0, 0, invalid("lun: required")
	case *p < 0 || *p > config.LUNMax:
		return 0, 0, invalid("lun: %d is out of range 0..%d", *p, config.LUNMax)
	}
	return target, *a.LUN, nil
}

func (t *target) rpcAddTarget(_ context.Context, p *addTarget) (any, error) {
	n, err := p.check(true)
	if err != nil {
		return nil, err
	}
	if p.BdevName == "" {
		return nil, invalid("bdev_name: required")
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	cc := t.cfg.Controller(p.Ctrlr)
	if cc == nil {
		return nil, errf(codeENODEV, "controller %q does not exist", p.Ctrlr)
	}
	used := map[int]bool{}
	for _, l := range cc.LUNs {
		used[int(l.Target)] = true
	}
	if n < 0 {
		for n = 0; n <= config.TargetMax && used[n]; n++ {
		}
		if n > config.TargetMax {
			return nil, errf(codeEBUSY, "controller %q has no free SCSI target", p.Ctrlr)
		}
	} else if used[n] {
		// SPDK's add_target makes a whole SCSI device; ours adds LUN 0.
		return nil, errf(codeEEXIST, "controller %q: target %d already exists", p.Ctrlr, n)
	}
	if err := t.addLUNLocked(p.Ctrlr, config.LUN{Target: uint8(n), LUN: 0, Bdev: p.BdevName}, "rpc"); err != nil {
		return nil, err
	}
	return n, nil
}

func (t *target) rpcRemoveTarget(_ context.Context, p *removeTarget) (any, error) {
	n, err := p.check(false)
	if err != nil {
		return nil, err
	}
	return true, t.removeLUNs(p.Ctrlr, uint8(n), -1, "rpc")
}

func (t *target) rpcAddLUN(_ context.Context, p *addLUN) (any, error) {
	n, l, err := p.check()
	if err != nil {
		return nil, err
	}
	if p.BdevName == "" {
		return nil, invalid("bdev_name: required")
	}
	return true, t.addLUN(p.Ctrlr, config.LUN{Target: uint8(n), LUN: uint16(l), Bdev: p.BdevName}, "rpc")
}

func (t *target) rpcRemoveLUN(_ context.Context, p *removeLUN) (any, error) {
	n, l, err := p.check()
	if err != nil {
		return nil, err
	}
	return true, t.removeLUNs(p.Ctrlr, uint8(n), l, "rpc")
}

// controllerJSON is one controller as SPDK's vhost_get_controllers shows it,
// with our type, num_queues, max_sessions, migration and sessions added.
// BackendSpecific is SPDK's {"scsi": [scsiDevJSON...]} or {"block": blkJSON}.
type controllerJSON struct {
	Ctrlr           string         `json:"ctrlr"`
	Type            string         `json:"type"`
	Cpumask         string         `json:"cpumask"`
	DelayBaseUs     int            `json:"delay_base_us"`
	IopsThreshold   int            `json:"iops_threshold"`
	Socket          string         `json:"socket"`
	NumQueues       int            `json:"num_queues"`
	MaxSessions     int            `json:"max_sessions"`
	Migration       bool           `json:"migration"`
	Sessions        int            `json:"sessions"`
	BackendSpecific map[string]any `json:"backend_specific"`
}

type scsiDevJSON struct {
	SCSIDevNum int       `json:"scsi_dev_num"`
	ID         int       `json:"id"`
	TargetName string    `json:"target_name"`
	LUNs       []lunJSON `json:"luns"`
}

type lunJSON struct {
	ID       int    `json:"id"`
	BdevName string `json:"bdev_name"`
}

// blkJSON is a blk controller's backend_specific.block, as SPDK writes it.
type blkJSON struct {
	Readonly  bool   `json:"readonly"`
	Bdev      string `json:"bdev"`
	Transport string `json:"transport"`
}

func (t *target) rpcGetControllers(_ context.Context, p *ctrlrName) (any, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := []controllerJSON{}
	for i := range t.cfg.Controllers {
		cc := &t.cfg.Controllers[i]
		if p.Name != "" && cc.Name != p.Name {
			continue
		}
		cj := controllerJSON{
			Ctrlr: cc.Name, Type: cc.Type, Cpumask: formatCPUMask(cc.CPUs), Socket: t.cfg.SocketPath(cc),
			NumQueues: cc.NumQueues, MaxSessions: cc.MaxSessions, Migration: cc.Migration, Sessions: t.ctrls[cc.Name].Sessions(),
		}
		if cc.Type == config.ControllerBlk {
			cj.BackendSpecific = map[string]any{"block": blkJSON{Readonly: cc.ReadOnly, Bdev: cc.Bdev, Transport: blkTransport}}
			out = append(out, cj)
			continue
		}
		byTarget := map[int][]lunJSON{}
		for _, l := range cc.LUNs {
			byTarget[int(l.Target)] = append(byTarget[int(l.Target)], lunJSON{ID: int(l.LUN), BdevName: l.Bdev})
		}
		devs := []scsiDevJSON{}
		for tid := 0; tid <= config.TargetMax; tid++ {
			if luns, ok := byTarget[tid]; ok {
				sort.Slice(luns, func(a, b int) bool { return luns[a].ID < luns[b].ID })
				devs = append(devs, scsiDevJSON{SCSIDevNum: tid, ID: tid, TargetName: "Target " + strconv.Itoa(tid), LUNs: luns})
			}
		}
		cj.BackendSpecific = map[string]any{"scsi": devs}
		out = append(out, cj)
	}
	if p.Name != "" && len(out) == 0 {
		return nil, &rpc.Error{Code: codeENODEV, Message: fmt.Sprintf("controller %q does not exist", p.Name)}
	}
	return out, nil
}

// saveConfig returns the running configuration as the TOML text of a
// configuration file (a JSON string): written to the file given with -c, it
// reproduces the running target.
func (t *target) saveConfig() (any, error) {
	cfg := t.runningConfig()
	data, err := cfg.Encode("vhost-target configuration written by save_config.\nEvery key is described in deploy/README.md.")
	if err != nil {
		return nil, err
	}
	return string(data), nil
}

// versionInfo answers spdk_get_version in SPDK's shape.
func versionInfo() map[string]any {
	v := versionString()
	fields := map[string]any{"major": 0, "minor": 0, "patch": 0, "suffix": ""}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				fields["commit"] = s.Value
			}
		}
	}
	return map[string]any{"version": "vhost-target " + v, "fields": fields}
}

// queueStateJSON is one running request queue (vhost_get_queue_states, ours):
// where a guest's requests are when its I/O stands still.
type queueStateJSON struct {
	Ctrlr string `json:"ctrlr"`
	vhost.QueueState
}

func (t *target) queueStates(name string) (any, error) {
	out := []queueStateJSON{}
	found := false
	for _, c := range t.controllers() {
		if name != "" && c.Name() != name {
			continue
		}
		found = true
		for _, st := range c.QueueStates() {
			out = append(out, queueStateJSON{Ctrlr: c.Name(), QueueState: st})
		}
	}
	if name != "" && !found {
		return nil, &rpc.Error{Code: codeENODEV, Message: fmt.Sprintf("controller %q does not exist", name)}
	}
	return out, nil
}

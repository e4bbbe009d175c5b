package main

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"vhost-target/config"
	"vhost-target/rpc"
	"vhost-target/vhost/frontend"
)

// blkBase is rpcBase with a blk controller b0 serving mb read-only.
const blkBase = rpcBase + `
[[bdev]]
name = "mb"
type = "malloc"
size = "1MiB"
[[controller]]
name = "b0"
type = "blk"
bdev = "mb"
read_only = true
num_queues = 2
`

// TestBlkControllerStart: a blk controller of the file listens, and the
// start line names each controller's type and disk.
func TestBlkControllerStart(t *testing.T) {
	var mu sync.Mutex
	lines := map[string]map[string]string{}
	tg := startTargetWith(t, blkBase, targetOpts{hook: func(msg string, attrs map[string]string) {
		if msg == "controller listening" {
			mu.Lock()
			lines[attrs["controller"]] = attrs
			mu.Unlock()
		}
	}})
	if _, err := os.Stat(filepath.Join(tg.cfg.SocketDir, "b0")); err != nil {
		t.Errorf("blk controller socket: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	b0, c0 := lines["b0"], lines["c0"]
	if b0["type"] != "blk" || b0["bdev"] != "mb" || b0["read_only"] != "true" || b0["num_queues"] != "2" || b0["luns"] != "" {
		t.Errorf("b0's start line: %v", b0)
	}
	if c0["type"] != "scsi" || c0["luns"] != "1" || c0["bdev"] != "" {
		t.Errorf("c0's start line: %v", c0)
	}
	if k := tg.controller("b0").Kind().String(); k != "blk" {
		t.Errorf("b0 is a %s controller", k)
	}
	if d, ro := tg.controller("b0").Disk(); d == nil || d.Info().Name != "mb" || !ro {
		t.Errorf("b0's disk: %v, read-only %v", d, ro)
	}
}

// TestRPCBlkController drives vhost_create_blk_controller, its refusals,
// vhost_get_controllers' view of blk controllers, the SCSI methods refused
// on one, bdev deletion and resize under one, and vhost_delete_controller.
func TestRPCBlkController(t *testing.T) {
	tg, c := rpcTarget(t, blkBase)
	if methods := call[[]string](t, c, "rpc_get_methods", nil); !slices.Contains(methods, "vhost_create_blk_controller") {
		t.Errorf("rpc_get_methods lacks vhost_create_blk_controller: %v", methods)
	}
	call[string](t, c, "bdev_malloc_create", m{"name": "m1", "num_blocks": 2048, "block_size": 512})
	call[string](t, c, "bdev_malloc_create", m{"name": "m2", "num_blocks": 256, "block_size": 4096})
	mask := formatCPUMask(tg.cfg.Reactors.CPUs)
	if !call[bool](t, c, "vhost_create_blk_controller", m{"ctrlr": "b1", "dev_name": "m1", "cpumask": mask, "num_queues": 3}) {
		t.Fatal("vhost_create_blk_controller returned false")
	}
	if _, err := os.Stat(filepath.Join(tg.cfg.SocketDir, "b1")); err != nil {
		t.Errorf("controller socket: %v", err)
	}
	// SPDK's optional parameters at the values served here are accepted.
	call[bool](t, c, "vhost_create_blk_controller", m{"ctrlr": "b2", "dev_name": "m2", "readonly": true,
		"packed_ring": false, "transport": "vhost_user_blk", "max_sessions": 2, "migration": false, "socket_mode": "0660"})

	// refusals
	callErr(t, c, "vhost_create_blk_controller", m{"dev_name": "m1"}, -32602, "ctrlr: required")
	callErr(t, c, "vhost_create_blk_controller", m{"ctrlr": "b3"}, -32602, "dev_name: required")
	callErr(t, c, "vhost_create_blk_controller", m{"ctrlr": "b3", "dev_name": "nope"}, -19, `bdev "nope" does not exist`)
	callErr(t, c, "vhost_create_blk_controller", m{"ctrlr": "b3", "dev_name": "m0"}, -16,
		`bdev "m0" is already used by controller "c0" target 0 lun 0`)
	callErr(t, c, "vhost_create_blk_controller", m{"ctrlr": "b3", "dev_name": "m1"}, -16, `bdev "m1" is already used by blk controller "b1"`)
	callErr(t, c, "vhost_create_blk_controller", m{"ctrlr": "b1", "dev_name": "m2"}, -17, `controller "b1" already exists`)
	callErr(t, c, "vhost_create_blk_controller", m{"ctrlr": "b3", "dev_name": "x", "packed_ring": true}, -95, "packed_ring: packed virtqueues are not supported")
	callErr(t, c, "vhost_create_blk_controller", m{"ctrlr": "b3", "dev_name": "x", "transport": "vfio_user_virtio_blk"}, -32602,
		`transport: "vfio_user_virtio_blk" is not "vhost_user_blk"`)
	call[string](t, c, "bdev_malloc_create", m{"name": "m3", "num_blocks": 64, "block_size": 512})
	callErr(t, c, "vhost_create_blk_controller", m{"ctrlr": "b3", "dev_name": "m3", "num_queues": 65}, -32602,
		`rpc: controller[4] "b3": num_queues: 65 is out of range 1..64`)
	callErr(t, c, "vhost_create_blk_controller", m{"ctrlr": "b3", "dev_name": "m3", "cpumask": "0x8000"}, -32602, `cpus[0]: CPU 15 has no reactor`)
	callErr(t, c, "vhost_create_blk_controller", m{"ctrlr": "b/3", "dev_name": "m3"}, -32602, `name: "b/3" contains '/'`)
	callErr(t, c, "vhost_create_blk_controller", m{"ctrlr": "b3", "dev_name": "m3", "scsi_target_num": 0}, -32602, "scsi_target_num")
	callErr(t, c, "vhost_create_blk_controller", m{"ctrlr": "b3", "dev_name": "m3", "readonly": "yes"}, -32602, "readonly")
	if n := len(call[[]controllerJSON](t, c, "vhost_get_controllers", nil)); n != 4 {
		t.Errorf("%d controllers after the refusals, want 4", n)
	}

	// vhost_get_controllers: SPDK's backend_specific.block, and our type
	all := call[[]controllerJSON](t, c, "vhost_get_controllers", nil)
	var names, types []string
	for _, cj := range all {
		names, types = append(names, cj.Ctrlr), append(types, cj.Type)
	}
	if fmt.Sprint(names, types) != "[c0 b0 b1 b2] [scsi blk blk blk]" {
		t.Errorf("vhost_get_controllers: %v %v", names, types)
	}
	b1 := call[[]controllerJSON](t, c, "vhost_get_controllers", m{"name": "b1"})
	if len(b1) != 1 || b1[0].NumQueues != 3 || b1[0].Cpumask != mask || b1[0].MaxSessions != 1 || !b1[0].Migration ||
		b1[0].Socket != filepath.Join(tg.cfg.SocketDir, "b1") {
		t.Errorf("vhost_get_controllers b1 = %+v", b1)
	} else if len(b1[0].BackendSpecific) != 1 || !jsonEqualValue(t, b1[0].BackendSpecific["block"],
		blkJSON{Readonly: false, Bdev: "m1", Transport: "vhost_user_blk"}) {
		t.Errorf("b1 backend_specific = %v", b1[0].BackendSpecific)
	}
	b2 := call[[]controllerJSON](t, c, "vhost_get_controllers", m{"name": "b2"})
	if !jsonEqualValue(t, b2[0].BackendSpecific["block"], blkJSON{Readonly: true, Bdev: "m2", Transport: "vhost_user_blk"}) ||
		b2[0].MaxSessions != 2 || b2[0].Migration {
		t.Errorf("vhost_get_controllers b2 = %+v", b2)
	}
	if c0 := call[[]controllerJSON](t, c, "vhost_get_controllers", m{"name": "c0"}); c0[0].Type != "scsi" || c0[0].BackendSpecific["scsi"] == nil {
		t.Errorf("vhost_get_controllers c0 = %+v", c0)
	}

	// the SCSI methods on a blk controller
	const notSCSI = `controller "b1" is a blk controller: it serves one bdev ("m1") and has no SCSI targets or LUNs`
	callErr(t, c, "vhost_scsi_controller_add_target", m{"ctrlr": "b1", "scsi_target_num": -1, "bdev_name": "m3"}, -22, notSCSI)
	callErr(t, c, "vhost_scsi_controller_add_target", m{"ctrlr": "b1", "scsi_target_num": 0, "bdev_name": "m3"}, -22, notSCSI)
	callErr(t, c, "vhost_scsi_controller_add_lun", m{"ctrlr": "b1", "scsi_target_num": 0, "lun": 1, "bdev_name": "m3"}, -22, notSCSI)
	callErr(t, c, "vhost_scsi_controller_remove_target", m{"ctrlr": "b1", "scsi_target_num": 0}, -22, notSCSI)
	callErr(t, c, "vhost_scsi_controller_remove_lun", m{"ctrlr": "b1", "scsi_target_num": 0, "lun": 0}, -22, notSCSI)
	// a bdev of a blk controller is not a LUN's too, and is claimed
	callErr(t, c, "vhost_scsi_controller_add_target", m{"ctrlr": "c0", "scsi_target_num": 1, "bdev_name": "m1"}, -16,
		`bdev "m1" is already used by blk controller "b1"`)
	if b := call[[]bdevJSON](t, c, "bdev_get_bdevs", m{"name": "m1"}); !b[0].Claimed {
		t.Errorf("m1 backs a blk controller but is not claimed: %+v", b)
	}
	callErr(t, c, "bdev_malloc_delete", m{"name": "m1"}, -16, `bdev "m1" is in use by blk controller "b1"; remove that first`)

	// save_config writes the blk controllers back
	saved, err := config.Parse([]byte(call[string](t, c, "save_config", nil)), "saved.toml")
	if err != nil {
		t.Fatal(err)
	}
	if cc := saved.Controller("b2"); cc == nil || cc.Type != config.ControllerBlk || cc.Bdev != "m2" || !cc.ReadOnly ||
		cc.MaxSessions != 2 || cc.Migration || cc.SocketMode != 0o660 {
		t.Errorf("saved b2 = %+v", cc)
	}

	// vhost_delete_controller deletes a blk controller; its bdev is free again
	call[bool](t, c, "vhost_delete_controller", m{"ctrlr": "b1"})
	if _, err := os.Stat(filepath.Join(tg.cfg.SocketDir, "b1")); !os.IsNotExist(err) {
		t.Errorf("socket of a deleted controller: %v", err)
	}
	callErr(t, c, "vhost_delete_controller", m{"ctrlr": "b1"}, -19, `controller "b1" does not exist`)
	callErr(t, c, "vhost_scsi_controller_remove_target", m{"ctrlr": "b1", "scsi_target_num": 0}, -19, `controller "b1" does not exist`)
	call[int](t, c, "vhost_scsi_controller_add_target", m{"ctrlr": "c0", "scsi_target_num": 1, "bdev_name": "m1"})
	call[bool](t, c, "vhost_scsi_controller_remove_target", m{"ctrlr": "c0", "scsi_target_num": 1})
	call[bool](t, c, "bdev_malloc_delete", m{"name": "m1"})
}

// TestRPCBlkResize: bdev_resize of a blk controller's disk, or of the base
// of an error bdev a blk controller serves, reaches that controller (its
// CapacityChanged logs at DEBUG) and a connected front-end gets the config
// change notification and the new capacity.
func TestRPCBlkResize(t *testing.T) {
	var mu sync.Mutex
	var changed []string
	tg := startTargetWith(t, "[metrics]\nlisten = \"\"\n"+blkBase+`
[[bdev]]
name = "e0"
type = "error"
base = "m0"
[[bdev.inject]]
op = "read"
lba_start = 7
lba_count = 1
error = "eio"
[[controller]]
name = "b1"
type = "blk"
bdev = "e0"
`, targetOpts{level: slog.LevelDebug, hook: func(msg string, attrs map[string]string) {
		if msg == "LUN capacity changed" {
			mu.Lock()
			changed = append(changed, attrs["controller"]+" "+attrs["bdev"]+" "+attrs["blocks"])
			mu.Unlock()
		}
	}})
	c, err := rpc.Dial(tg.cfg.RPC.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	seen := func() []string {
		mu.Lock()
		defer mu.Unlock()
		s := slices.Clone(changed)
		changed = nil
		slices.Sort(s)
		return s
	}
	// A front-end of b0 with a back-end channel is told, and reads the new
	// capacity from the config space, as QEMU's vhost-user-blk does.
	dev, err := frontend.Dial(filepath.Join(tg.cfg.SocketDir, "b0"), frontend.Options{Blk: true, BackendReq: true})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	if got := dev.BlkConfig().Capacity; got != 1<<20/512 {
		t.Errorf("b0's capacity at connect: %d sectors", got)
	}
	call[bool](t, c, "bdev_resize", m{"name": "mb", "new_size": 2})
	if bc, err := dev.HandleConfigChange(5 * time.Second); err != nil || bc.Capacity != 2<<20/512 {
		t.Errorf("b0's front-end after the resize: capacity %d sectors, %v", bc.Capacity, err)
	}
	if got := seen(); fmt.Sprint(got) != "[b0 mb 4096]" {
		t.Errorf("after resizing mb: capacity changes %q, want b0's", got)
	}
	if d, _ := tg.controller("b0").Disk(); d.Info().NumBlocks != 4096 {
		t.Errorf("b0's disk after bdev_resize: %d blocks", d.Info().NumBlocks)
	}
	call[bool](t, c, "bdev_resize", m{"name": "m0", "new_size": 8})
	if got := seen(); fmt.Sprint(got) != "[b1 e0 16384 c0 m0 16384]" {
		t.Errorf("after resizing m0: capacity changes %q, want c0's (LUN) and b1's (error bdev over it)", got)
	}
}

// jsonEqualValue compares a decoded JSON value with want marshalled.
func jsonEqualValue(t *testing.T, got, want any) bool {
	t.Helper()
	b, err := json.Marshal(got)
	if err != nil {
		t.Fatal(err)
	}
	return jsonEqual(t, b, want)
}

// TestReloadBlk: a reload adds, changes and removes blk controllers, and
// refuses to swap the bdev under one.
func TestReloadBlk(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "t.toml")
	tg, c := rpcTarget(t, blkBase)
	cfg := tg.runningConfig()
	write := func(cfg *config.Config) {
		t.Helper()
		text, err := cfg.Encode("")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(file, text, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(cfg)
	tg.cfgPath = file
	if r := call[m](t, c, "framework_reload", nil); len(r["changes"].([]any)) != 0 {
		t.Errorf("reload of the running config changed %v", r)
	}

	next := cfg.Clone()
	next.Bdevs = append(next.Bdevs, config.Bdev{Name: "m1", Type: config.TypeMalloc, Size: 1 << 20, BlockSize: 512,
		Hugepages: config.HugepagesAuto, UUID: config.BdevUUID("m1")})
	b1 := config.NewController("b1", next.Reactors.CPUs)
	b1.Type, b1.Bdev = config.ControllerBlk, "m1"
	next.Controllers = append(next.Controllers, b1)
	next.Controller("b0").ReadOnly = false
	write(next)
	got := fmt.Sprint(call[m](t, c, "framework_reload", nil)["changes"])
	for _, want := range []string{`bdev "m1" added`, `controller "b1" added`, `controller "b0" changed`} {
		if !strings.Contains(got, want) {
			t.Errorf("changes %s lack %s", got, want)
		}
	}
	if _, ro := tg.controller("b0").Disk(); ro {
		t.Error("b0 still read-only after the reload")
	}

	// m1 changed under b1: refused whole
	swap := next.Clone()
	swap.Bdev("m1").BlockSize = 4096
	write(swap)
	callErr(t, c, "framework_reload", nil, -16, `bdev "m1": settings changed while it is used by blk controller "b1"`)

	// b1 gone, its bdev now a LUN of c0
	last := next.Clone()
	last.Controllers = slices.DeleteFunc(last.Controllers, func(cc config.Controller) bool { return cc.Name == "b1" })
	last.Controller("c0").LUNs = append(last.Controller("c0").LUNs, config.LUN{Target: 1, Bdev: "m1"})
	write(last)
	got = fmt.Sprint(call[m](t, c, "framework_reload", nil)["changes"])
	for _, want := range []string{`controller "b1" deleted`, `controller "c0" target 1 lun 0 added (bdev "m1")`} {
		if !strings.Contains(got, want) {
			t.Errorf("changes %s lack %s", got, want)
		}
	}
	if tg.controller("b1") != nil {
		t.Error("b1 still running")
	}
}

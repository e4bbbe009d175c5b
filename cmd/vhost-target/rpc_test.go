package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"

	"vhost-target/config"
	"vhost-target/rpc"
	"vhost-target/vhost/frontend"
)

// rpcTarget starts an in-process target on text with metrics on a free
// port and returns it with an RPC client.
func rpcTarget(t *testing.T, text string) (*e2eTarget, *rpc.Client) {
	t.Helper()
	tg := startTarget(t, "[metrics]\nlisten = \"127.0.0.1:0\"\n"+text)
	if tg.cfg.RPC.Socket == "" {
		t.Fatal("no RPC socket")
	}
	c, err := rpc.Dial(tg.cfg.RPC.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return tg, c
}

// call runs method and decodes its result into a value of type R.
func call[R any](t *testing.T, c *rpc.Client, method string, params any) R {
	t.Helper()
	var r R
	if err := c.Call(context.Background(), method, params, &r); err != nil {
		t.Fatalf("%s %v: %v", method, params, err)
	}
	return r
}

// callErr runs method, requires a JSON-RPC error with code and a message
// containing want, and returns the message.
func callErr(t *testing.T, c *rpc.Client, method string, params any, code int, want string) string {
	t.Helper()
	var r json.RawMessage
	err := c.Call(context.Background(), method, params, &r)
	var re *rpc.Error
	if !errors.As(err, &re) {
		t.Fatalf("%s %v: got result %s, err %v; want error %d %q", method, params, r, err, code, want)
	}
	if re.Code != code || !strings.Contains(re.Message, want) {
		t.Fatalf("%s %v: error %d %q, want %d containing %q", method, params, re.Code, re.Message, code, want)
	}
	return re.Message
}

type m = map[string]any

const rpcBase = `
[reactors]
poll = "adaptive"
[[bdev]]
name = "m0"
type = "malloc"
size = "4MiB"
[[controller]]
name = "c0"
num_queues = 1
[[controller.lun]]
target = 0
bdev = "m0"
`

// TestRPCMethods drives every method and every refusal through the socket.
func TestRPCMethods(t *testing.T) {
	tg, c := rpcTarget(t, rpcBase)
	dir := t.TempDir()

	methods := call[[]string](t, c, "rpc_get_methods", nil)
	for _, want := range []string{"bdev_malloc_create", "bdev_malloc_delete", "bdev_aio_create", "bdev_aio_delete",
		"bdev_aio_rescan", "bdev_get_bdevs", "vhost_create_scsi_controller", "vhost_scsi_controller_add_target",
		"vhost_scsi_controller_remove_target", "vhost_delete_controller", "vhost_get_controllers", "save_config",
		"spdk_get_version", "bdev_file_create", "bdev_resize", "vhost_scsi_controller_add_lun",
		"vhost_scsi_controller_remove_lun", "framework_reload", "vhost_create_blk_controller",
		"bdev_rbd_create", "bdev_rbd_delete", "bdev_rbd_resize"} {
		if !slices.Contains(methods, want) {
			t.Errorf("rpc_get_methods lacks %s", want)
		}
	}
	if v := call[m](t, c, "spdk_get_version", nil); !strings.HasPrefix(v["version"].(string), "vhost-target ") {
		t.Errorf("spdk_get_version = %v", v)
	}

	// bdevs
	if n := call[string](t, c, "bdev_malloc_create", m{"num_blocks": 2048, "block_size": 512}); n != "Malloc0" {
		t.Errorf("unnamed malloc bdev is %q, want Malloc0 (as SPDK)", n)
	}
	if n := call[string](t, c, "bdev_malloc_create", m{"name": "m1", "num_blocks": 256, "block_size": 4096}); n != "m1" {
		t.Errorf("bdev_malloc_create returned %q", n)
	}
	callErr(t, c, "bdev_malloc_create", m{"name": "m1", "num_blocks": 8, "block_size": 512}, -17, `bdev "m1" already exists`)
	// The API's checks are the config file's, with its messages.
	callErr(t, c, "bdev_malloc_create", m{"name": "bad", "num_blocks": 8, "block_size": 1000}, -32602,
		`rpc: bdev[3] "bad": block_size: 1000 is not 512 or 4096`)
	callErr(t, c, "bdev_malloc_create", m{"name": "a/b", "num_blocks": 8, "block_size": 512}, -32602, `name: "a/b" contains '/'`)
	callErr(t, c, "bdev_malloc_create", m{"name": "x", "num_blocks": 8, "block_size": 512, "hugepages": "maybe"}, -32602, `hugepages: "maybe" is not`)
	callErr(t, c, "bdev_malloc_create", m{"name": "x", "num_blocks": 8, "block_size": 512, "bogus": 1}, -32602, `bogus`)
	callErr(t, c, "bdev_malloc_create", m{"name": "x", "block_size": 512}, -32602, `num_blocks: required`)
	callErr(t, c, "bdev_malloc_create", m{"name": "x", "num_blocks": "8", "block_size": 512}, -32602, `num_blocks`)

	img := filepath.Join(dir, "a.img")
	if err := os.WriteFile(img, make([]byte, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	call[string](t, c, "bdev_aio_create", m{"name": "a0", "filename": img, "block_size": 4096})
	callErr(t, c, "bdev_aio_create", m{"name": "a1", "filename": "relative.img"}, -32602, `path: "relative.img" is not an absolute path`)
	callErr(t, c, "bdev_aio_create", m{"name": "a1", "filename": filepath.Join(dir, "missing.img")}, -2, "missing.img")
	call[string](t, c, "bdev_file_create", m{"name": "f0", "filename": filepath.Join(dir, "f.img"), "create": true, "size": "1MiB"})
	callErr(t, c, "bdev_file_create", m{"name": "f1", "filename": filepath.Join(dir, "g.img"), "create": true}, -32602, `size: required with create = true`)

	bdevs := call[[]bdevJSON](t, c, "bdev_get_bdevs", nil)
	var names []string
	for _, b := range bdevs {
		names = append(names, b.Name)
	}
	if !reflect.DeepEqual(names, []string{"m0", "Malloc0", "m1", "a0", "f0"}) {
		t.Errorf("bdev_get_bdevs names %v", names)
	}
	one := call[[]bdevJSON](t, c, "bdev_get_bdevs", m{"name": "m1"})
	if len(one) != 1 || one[0].NumBlocks != 256 || one[0].BlockSize != 4096 || one[0].ProductName != "Malloc disk" ||
		one[0].UUID != config.FormatUUID(config.BdevUUID("m1")) || one[0].Claimed {
		t.Errorf("bdev_get_bdevs m1 = %+v", one)
	}
	if a := call[[]bdevJSON](t, c, "bdev_get_bdevs", m{"name": "a0"}); a[0].NumBlocks != 1024 || a[0].DriverSpecific["aio"] == nil {
		t.Errorf("bdev_get_bdevs a0 = %+v", a)
	}
	callErr(t, c, "bdev_get_bdevs", m{"name": "nope"}, -19, `bdev "nope" does not exist`)
	if b := call[[]bdevJSON](t, c, "bdev_get_bdevs", m{"name": "m0"}); !b[0].Claimed {
		t.Errorf("m0 backs a LUN but is not claimed: %+v", b)
	}

	// controllers and LUNs
	mask := formatCPUMask(tg.cfg.Reactors.CPUs)
	if !call[bool](t, c, "vhost_create_scsi_controller", m{"ctrlr": "c1", "cpumask": mask, "num_queues": 2}) {
		t.Fatal("vhost_create_scsi_controller returned false")
	}
	if _, err := os.Stat(filepath.Join(tg.cfg.SocketDir, "c1")); err != nil {
		t.Errorf("controller socket: %v", err)
	}
	callErr(t, c, "vhost_create_scsi_controller", m{"ctrlr": "c1"}, -17, `controller "c1" already exists`)
	callErr(t, c, "vhost_create_scsi_controller", m{"ctrlr": "c2", "num_queues": 65}, -32602, `num_queues: 65 is out of range 1..64`)
	callErr(t, c, "vhost_create_scsi_controller", m{"ctrlr": "c2", "cpumask": "0x8000"}, -32602, `cpus[0]: CPU 15 has no reactor`)
	callErr(t, c, "vhost_create_scsi_controller", m{"ctrlr": "c2", "cpumask": "zz"}, -32602, `cpumask: "zz" is not a hex CPU mask`)
	if n := call[int](t, c, "vhost_scsi_controller_add_target", m{"ctrlr": "c1", "scsi_target_num": -1, "bdev_name": "m1"}); n != 0 {
		t.Errorf("first free target = %d", n)
	}
	if n := call[int](t, c, "vhost_scsi_controller_add_target", m{"ctrlr": "c1", "scsi_target_num": 5, "bdev_name": "Malloc0"}); n != 5 {
		t.Errorf("add_target 5 returned %d", n)
	}
	callErr(t, c, "vhost_scsi_controller_add_target", m{"ctrlr": "c1", "scsi_target_num": 5, "bdev_name": "a0"}, -17, "target 5 already exists")
	callErr(t, c, "vhost_scsi_controller_add_target", m{"ctrlr": "c1", "scsi_target_num": 6, "bdev_name": "m0"}, -16, `bdev "m0" is already used by controller "c0" target 0 lun 0`)
	callErr(t, c, "vhost_scsi_controller_add_target", m{"ctrlr": "nope", "scsi_target_num": 6, "bdev_name": "a0"}, -19, `controller "nope" does not exist`)
	callErr(t, c, "vhost_scsi_controller_add_target", m{"ctrlr": "c1", "scsi_target_num": 6, "bdev_name": "nope"}, -19, `bdev "nope" does not exist`)
	callErr(t, c, "vhost_scsi_controller_add_target", m{"ctrlr": "c1", "scsi_target_num": 256, "bdev_name": "a0"}, -32602, "scsi_target_num: 256 is out of range")
	call[bool](t, c, "vhost_scsi_controller_add_lun", m{"ctrlr": "c1", "scsi_target_num": 5, "lun": 3, "bdev_name": "a0"})
	callErr(t, c, "vhost_scsi_controller_add_lun", m{"ctrlr": "c1", "scsi_target_num": 5, "lun": 16384, "bdev_name": "f0"}, -32602, "lun: 16384 is out of range")
	callErr(t, c, "vhost_scsi_controller_add_lun", m{"ctrlr": "c1", "scsi_target_num": 5, "lun": 3, "bdev_name": "f0"}, -17, `target 5 lun 3 is already bdev "a0"`)

	ctrls := call[[]controllerJSON](t, c, "vhost_get_controllers", m{"name": "c1"})
	want := []scsiDevJSON{
		{SCSIDevNum: 0, ID: 0, TargetName: "Target 0", LUNs: []lunJSON{{0, "m1"}}},
		{SCSIDevNum: 5, ID: 5, TargetName: "Target 5", LUNs: []lunJSON{{0, "Malloc0"}, {3, "a0"}}},
	}
	if len(ctrls) != 1 || ctrls[0].Cpumask != mask || ctrls[0].NumQueues != 2 || ctrls[0].Socket != filepath.Join(tg.cfg.SocketDir, "c1") {
		t.Errorf("vhost_get_controllers c1 = %+v", ctrls)
	} else if got, _ := json.Marshal(ctrls[0].BackendSpecific["scsi"]); !jsonEqual(t, got, want) {
		t.Errorf("c1 scsi = %s", got)
	}
	if all := call[[]controllerJSON](t, c, "vhost_get_controllers", nil); len(all) != 2 {
		t.Errorf("vhost_get_controllers = %+v", all)
	}
	callErr(t, c, "vhost_get_controllers", m{"name": "nope"}, -19, `controller "nope" does not exist`)

	// a front-end sees the LUNs added at runtime
	dev, err := frontend.Dial(filepath.Join(tg.cfg.SocketDir, "c1"), frontend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, tl := range [][2]int{{0, 0}, {5, 0}, {5, 3}} {
		r, err := dev.Do(frontend.Command{Target: uint8(tl[0]), LUN: uint16(tl[1]), CDB: []byte{0x25, 9: 0}, DataInLen: 8}) // READ CAPACITY(10)
		if err != nil || r.Status != 0 {
			t.Errorf("READ CAPACITY target %d lun %d: %v %+v", tl[0], tl[1], err, r)
		}
	}

	// the queue of the connected front-end, as vhost_get_queue_states shows it
	qs := call[[]queueStateJSON](t, c, "vhost_get_queue_states", m{"name": "c1"})
	if len(qs) != 1 || qs[0].Vring != 2 || qs[0].InFlight != 0 || qs[0].Ring.LastAvail != qs[0].Ring.AvailIdx ||
		qs[0].Ring.UsedIdx != qs[0].Ring.LastAvail || qs[0].Ring.UsedIdx == 0 {
		t.Errorf("vhost_get_queue_states c1 = %+v", qs)
	}
	callErr(t, c, "vhost_get_queue_states", m{"name": "nope"}, -19, `controller "nope" does not exist`)

	// refusals while in use
	callErr(t, c, "bdev_malloc_delete", m{"name": "m1"}, -16, `bdev "m1" is in use by controller "c1" target 0 lun 0`)
	callErr(t, c, "bdev_malloc_delete", m{"name": "a0"}, -19, `bdev "a0" does not exist`) // not a malloc bdev
	callErr(t, c, "vhost_delete_controller", m{"ctrlr": "c1"}, -16, `controller "c1" has 1 connected front-end(s)`)

	// removal
	call[bool](t, c, "vhost_scsi_controller_remove_lun", m{"ctrlr": "c1", "scsi_target_num": 5, "lun": 3})
	callErr(t, c, "vhost_scsi_controller_remove_lun", m{"ctrlr": "c1", "scsi_target_num": 5, "lun": 3}, -19, "has no target 5 lun 3")
	call[bool](t, c, "vhost_scsi_controller_remove_target", m{"ctrlr": "c1", "scsi_target_num": 0})
	callErr(t, c, "vhost_scsi_controller_remove_target", m{"ctrlr": "c1", "scsi_target_num": 0}, -19, "has no target 0")
	// The target has no LUN left: BAD_TARGET, as for a target never added.
	r, err := dev.Do(frontend.Command{Target: 0, CDB: []byte{0x25, 9: 0}, DataInLen: 8})
	if err != nil || r.Response != 3 {
		t.Errorf("READ CAPACITY of a removed target: %v %+v, want BAD_TARGET", err, r)
	}
	call[bool](t, c, "bdev_malloc_delete", m{"name": "m1"})
	call[bool](t, c, "bdev_aio_delete", m{"name": "a0"})
	callErr(t, c, "bdev_aio_delete", m{"name": "a0"}, -19, `bdev "a0" does not exist`)

	// resize of a file bdev (MiB, as SPDK's bdev_null_resize)
	call[bool](t, c, "bdev_resize", m{"name": "f0", "new_size": 3})
	if b := call[[]bdevJSON](t, c, "bdev_get_bdevs", m{"name": "f0"}); b[0].NumBlocks != 3<<20/512 {
		t.Errorf("after bdev_resize f0: %d blocks", b[0].NumBlocks)
	}
	if fi, err := os.Stat(filepath.Join(dir, "f.img")); err != nil || fi.Size() != 3<<20 {
		t.Errorf("backing file after resize: %v %v", fi, err)
	}
	if err := os.Truncate(filepath.Join(dir, "f.img"), 4<<20); err != nil {
		t.Fatal(err)
	}
	call[bool](t, c, "bdev_file_rescan", m{"name": "f0"})
	if b := call[[]bdevJSON](t, c, "bdev_get_bdevs", m{"name": "f0"}); b[0].NumBlocks != 4<<20/512 {
		t.Errorf("after growing f.img and bdev_file_rescan: %d blocks", b[0].NumBlocks)
	}
	callErr(t, c, "bdev_file_rescan", m{"name": "Malloc0"}, -19, `bdev "Malloc0" does not exist`)
	callErr(t, c, "bdev_resize", m{"name": "nope", "new_size": 3}, -19, `bdev "nope" does not exist`)
	callErr(t, c, "bdev_resize", m{"name": "f0"}, -32602, "new_size: required")

	// force deletes a controller a front-end uses
	call[bool](t, c, "vhost_delete_controller", m{"ctrlr": "c1", "force": true})
	if _, err := os.Stat(filepath.Join(tg.cfg.SocketDir, "c1")); !os.IsNotExist(err) {
		t.Errorf("socket of a deleted controller: %v", err)
	}
	dev.Close()
	callErr(t, c, "vhost_delete_controller", m{"ctrlr": "c1"}, -19, `controller "c1" does not exist`)
	callErr(t, c, "bdev_file_delete", m{"name": "Malloc0"}, -19, `bdev "Malloc0" does not exist`) // not a file bdev
	call[bool](t, c, "bdev_file_delete", m{"name": "f0"})
	call[bool](t, c, "bdev_malloc_delete", m{"name": "Malloc0"})
	if b := call[[]bdevJSON](t, c, "bdev_get_bdevs", nil); len(b) != 1 || b[0].Name != "m0" {
		t.Errorf("bdevs left: %+v", b)
	}
	callErr(t, c, "no_such_method", nil, -32601, "")
}

func jsonEqual(t *testing.T, got []byte, want any) bool {
	w, err := json.Marshal(want)
	if err != nil {
		t.Fatal(err)
	}
	var a, b any
	json.Unmarshal(got, &a)
	json.Unmarshal(w, &b)
	return reflect.DeepEqual(a, b)
}

// TestRPCSaveConfig: save_config's text, given to a new target, reproduces
// the running one (bdevs, scsi and blk controllers, LUNs).
func TestRPCSaveConfig(t *testing.T) {
	_, c := rpcTarget(t, rpcBase)
	call[string](t, c, "bdev_malloc_create", m{"name": "m1", "num_blocks": 512, "block_size": 4096, "uuid": "01234567-89ab-cdef-0123-456789abcdef"})
	call[bool](t, c, "vhost_create_scsi_controller", m{"ctrlr": "c1", "max_sessions": 2})
	call[int](t, c, "vhost_scsi_controller_add_target", m{"ctrlr": "c1", "scsi_target_num": 3, "bdev_name": "m1"})
	call[string](t, c, "bdev_malloc_create", m{"name": "m2", "num_blocks": 64, "block_size": 512})
	call[bool](t, c, "vhost_create_blk_controller", m{"ctrlr": "b1", "dev_name": "m2", "readonly": true, "num_queues": 2})
	text := call[string](t, c, "save_config", nil)
	cfg, err := config.Parse([]byte(text), "saved.toml")
	if err != nil {
		t.Fatalf("save_config output does not parse: %v\n%s", err, text)
	}
	if b := cfg.Bdev("m1"); b == nil || b.BlockSize != 4096 || b.Size != 2<<20 || config.FormatUUID(b.UUID) != "01234567-89ab-cdef-0123-456789abcdef" {
		t.Errorf("saved m1 = %+v", b)
	}
	// A second target from the saved text (in its own socket_dir) answers the same.
	dir := t.TempDir()
	cfg.SocketDir, cfg.RPC.Socket, cfg.Metrics.Listen = dir, filepath.Join(dir, "rpc.sock"), ""
	text2, err := cfg.Encode("")
	if err != nil {
		t.Fatal(err)
	}
	tg2 := startTargetWith(t, strings.Replace(string(text2), fmt.Sprintf("socket_dir = %q", dir), "", 1), targetOpts{dir: dir})
	c2, err := rpc.Dial(tg2.cfg.RPC.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	for _, method := range []string{"bdev_get_bdevs", "vhost_get_controllers"} {
		a := call[json.RawMessage](t, c, method, nil)
		b := call[json.RawMessage](t, c2, method, nil)
		a1 := strings.ReplaceAll(string(a), filepath.Dir(tg2.cfg.RPC.Socket), "DIR")
		b1 := strings.ReplaceAll(string(b), filepath.Dir(tg2.cfg.RPC.Socket), "DIR")
		var x, y any
		json.Unmarshal([]byte(a1), &x)
		json.Unmarshal([]byte(b1), &y)
		if method == "vhost_get_controllers" {
			for _, l := range [][]any{x.([]any), y.([]any)} {
				for _, cc := range l {
					delete(cc.(map[string]any), "socket")
				}
			}
		}
		if !reflect.DeepEqual(x, y) {
			t.Errorf("%s differs:\nrunning %s\nrestored %s", method, a, b)
		}
	}
}

// TestRPCManyClients runs concurrent clients mixing reads and changes; the
// final state is what the changes say.
func TestRPCManyClients(t *testing.T) {
	tg, _ := rpcTarget(t, rpcBase)
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := rpc.Dial(tg.cfg.RPC.Socket)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			name := fmt.Sprintf("b%d", i)
			for j := range 10 {
				var res any
				if err := c.Call(context.Background(), "bdev_malloc_create", m{"name": name, "num_blocks": 64, "block_size": 512}, &res); err != nil {
					errs <- fmt.Errorf("client %d round %d: create: %w", i, j, err)
					return
				}
				if err := c.Call(context.Background(), "bdev_get_bdevs", nil, &res); err != nil {
					errs <- err
					return
				}
				if j < 9 {
					if err := c.Call(context.Background(), "bdev_malloc_delete", m{"name": name}, &res); err != nil {
						errs <- fmt.Errorf("client %d round %d: delete: %w", i, j, err)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	c, _ := rpc.Dial(tg.cfg.RPC.Socket)
	defer c.Close()
	if b := call[[]bdevJSON](t, c, "bdev_get_bdevs", nil); len(b) != 17 {
		t.Errorf("%d bdevs after the clients, want 17", len(b))
	}
}

// TestRPCMetricsFollow: /metrics shows LUNs and controllers created at
// runtime and forgets those deleted.
func TestRPCMetricsFollow(t *testing.T) {
	tg, c := rpcTarget(t, rpcBase)
	call[string](t, c, "bdev_malloc_create", m{"name": "m1", "num_blocks": 64, "block_size": 512})
	call[bool](t, c, "vhost_create_scsi_controller", m{"ctrlr": "c1"})
	call[int](t, c, "vhost_scsi_controller_add_target", m{"ctrlr": "c1", "scsi_target_num": 2, "bdev_name": "m1"})
	lun := `vhost_target_lun_reads_total{bdev="m1",controller="c1",lun="0",target="2"}`
	sessions := `vhost_target_sessions{controller="c1"}`
	mt := scrape(t, tg.metricsAddr)
	if _, ok := mt[lun]; !ok {
		t.Errorf("no %s after add_target", lun)
	}
	if _, ok := mt[sessions]; !ok {
		t.Errorf("no %s after create", sessions)
	}
	call[bool](t, c, "vhost_scsi_controller_remove_target", m{"ctrlr": "c1", "scsi_target_num": 2})
	if _, ok := scrape(t, tg.metricsAddr)[lun]; ok {
		t.Errorf("%s still there after remove_target", lun)
	}
	call[bool](t, c, "vhost_delete_controller", m{"ctrlr": "c1"})
	if _, ok := scrape(t, tg.metricsAddr)[sessions]; ok {
		t.Errorf("%s still there after vhost_delete_controller", sessions)
	}
}

// TestReload: framework_reload applies a file's difference (bdev and LUN
// added, LUN removed, size grown) and refuses a bad file, or one changing
// what needs a restart, whole.
func TestReload(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "t.toml")
	write := func(s string) {
		if err := os.WriteFile(file, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	tg, c := rpcTarget(t, rpcBase)
	cfg := tg.runningConfig()
	text, _ := cfg.Encode("")
	write(string(text))
	tg.cfgPath = file
	if r := call[m](t, c, "framework_reload", nil); len(r["changes"].([]any)) != 0 {
		t.Errorf("reload of the running config changed %v", r)
	}
	dev, err := frontend.Dial(filepath.Join(tg.cfg.SocketDir, "c0"), frontend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()

	// add m1 at target 1, grow a file bdev
	img := filepath.Join(dir, "f.img")
	next := cfg.Clone()
	next.Bdevs = append(next.Bdevs, config.Bdev{Name: "m1", Type: config.TypeMalloc, Size: 1 << 20, BlockSize: 512,
		Hugepages: config.HugepagesAuto, UUID: config.BdevUUID("m1")},
		config.Bdev{Name: "f0", Type: config.TypeFile, Path: img, Create: true, Size: 1 << 20, BlockSize: 512,
			Workers: 1, QueueDepth: 8, UUID: config.BdevUUID("f0")})
	next.Controllers[0].LUNs = append(next.Controllers[0].LUNs, config.LUN{Target: 1, Bdev: "m1"}, config.LUN{Target: 2, Bdev: "f0"})
	text, _ = next.Encode("")
	write(string(text))
	r := call[m](t, c, "framework_reload", nil)
	if got := fmt.Sprint(r["changes"]); !strings.Contains(got, `bdev "m1" added`) || !strings.Contains(got, `controller "c0" target 1 lun 0 added (bdev "m1")`) {
		t.Errorf("changes %s", got)
	}
	if rr, err := dev.Do(frontend.Command{Target: 1, CDB: []byte{0x25, 9: 0}, DataInLen: 8}); err != nil || rr.Status != 0 {
		t.Errorf("new LUN after reload: %v %+v", err, rr)
	}

	// a bad file changes nothing
	before := call[string](t, c, "save_config", nil)
	write(string(text) + "\n[[bdev]]\nname = \"m1\"\ntype = \"malloc\"\nsize = 7\n")
	msg := callErr(t, c, "framework_reload", nil, -32602, `bdev[3] "m1": name: duplicate of bdev[1]`)
	if !strings.Contains(msg, file) || !strings.Contains(msg, "size: 7 bytes is not a multiple of the block size 512") {
		t.Errorf("reload error does not list every problem with the file name: %s", msg)
	}
	restart := next.Clone()
	restart.Reactors.Poll = config.PollBusy
	text2, _ := restart.Encode("")
	write(string(text2))
	callErr(t, c, "framework_reload", nil, -22, "[reactors] changed: that takes a restart; nothing was changed")
	// a changed bdev under a LUN is not swapped under the guest
	swap := next.Clone()
	swap.Bdev("m1").BlockSize = 4096
	text2, _ = swap.Encode("")
	write(string(text2))
	callErr(t, c, "framework_reload", nil, -16, `bdev "m1": settings changed while it is used by controller "c0" target 1 lun 0`)
	if after := call[string](t, c, "save_config", nil); after != before {
		t.Errorf("a refused reload changed the running config:\n%s\n---\n%s", before, after)
	}

	// remove m1's LUN and m1, grow f0
	last := next.Clone()
	last.Bdevs = slices.DeleteFunc(last.Bdevs, func(b config.Bdev) bool { return b.Name == "m1" })
	last.Controllers[0].LUNs = slices.DeleteFunc(last.Controllers[0].LUNs, func(l config.LUN) bool { return l.Bdev == "m1" })
	last.Bdev("f0").Size = 2 << 20
	text, _ = last.Encode("")
	write(string(text))
	r = call[m](t, c, "framework_reload", nil)
	got := fmt.Sprint(r["changes"])
	for _, want := range []string{`controller "c0" target 1 lun 0 removed`, `bdev "m1" deleted`, `bdev "f0" resized to 2097152 bytes`} {
		if !strings.Contains(got, want) {
			t.Errorf("changes %s lack %s", got, want)
		}
	}
	if rr, err := dev.Do(frontend.Command{Target: 1, CDB: []byte{0x25, 9: 0}, DataInLen: 8}); err != nil || rr.Response != 3 {
		t.Errorf("removed LUN after reload: %v %+v, want BAD_TARGET", err, rr)
	}
	if saved := call[string](t, c, "save_config", nil); !strings.Contains(saved, "size = 2097152") || strings.Contains(saved, `"m1"`) {
		t.Errorf("save_config after reload:\n%s", saved)
	}
}

// TestRPCResizeRescan: bdev_aio_rescan picks up a backing file grown by
// someone else, bdev_resize grows one, a shrink of a bdev in use is refused
// (-16), and a connected initiator learns of each change through UNIT
// ATTENTION 2A/09 before READ CAPACITY reports the new size.
func TestRPCResizeRescan(t *testing.T) {
	tg, c := rpcTarget(t, rpcBase)
	img := filepath.Join(t.TempDir(), "r.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	call[string](t, c, "bdev_aio_create", m{"name": "r0", "filename": img})
	call[int](t, c, "vhost_scsi_controller_add_target", m{"ctrlr": "c0", "scsi_target_num": 1, "bdev_name": "r0"})
	dev, err := frontend.Dial(filepath.Join(tg.cfg.SocketDir, "c0"), frontend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	capacity := func() uint64 {
		t.Helper()
		for range 3 { // a unit attention first, then the answer
			r, err := dev.Do(frontend.Command{Target: 1, CDB: []byte{0x25, 9: 0}, DataInLen: 8})
			if err != nil {
				t.Fatal(err)
			}
			if r.Status == 0 {
				d := r.DataIn
				return (uint64(d[0])<<24 | uint64(d[1])<<16 | uint64(d[2])<<8 | uint64(d[3])) + 1
			}
			if len(r.Sense) < 14 || r.Sense[2]&0xf != 6 || r.Sense[12] != 0x2a || r.Sense[13] != 0x09 {
				t.Fatalf("READ CAPACITY: status %#x sense % x, want GOOD or UNIT ATTENTION 2A/09", r.Status, r.Sense)
			}
		}
		t.Fatal("unit attention reported more than once")
		return 0
	}
	if n := capacity(); n != 2048 {
		t.Fatalf("capacity %d blocks, want 2048", n)
	}
	if err := os.Truncate(img, 3<<20); err != nil {
		t.Fatal(err)
	}
	call[bool](t, c, "bdev_aio_rescan", m{"name": "r0"})
	if n := capacity(); n != 6144 {
		t.Errorf("after growing the file and bdev_aio_rescan: %d blocks, want 6144", n)
	}
	call[bool](t, c, "bdev_resize", m{"name": "r0", "new_size": 4})
	if n := capacity(); n != 8192 {
		t.Errorf("after bdev_resize 4 MiB: %d blocks, want 8192", n)
	}
	callErr(t, c, "bdev_resize", m{"name": "r0", "new_size": 1}, -16, `bdev "r0": resize`)
	if n := capacity(); n != 8192 {
		t.Errorf("after a refused shrink: %d blocks", n)
	}
	callErr(t, c, "bdev_aio_rescan", m{"name": "m0"}, -19, `bdev "m0" does not exist`) // not an aio bdev
	// A bdev no LUN uses may shrink.
	call[bool](t, c, "vhost_scsi_controller_remove_target", m{"ctrlr": "c0", "scsi_target_num": 1})
	call[bool](t, c, "bdev_resize", m{"name": "r0", "new_size": 1})
	if b := call[[]bdevJSON](t, c, "bdev_get_bdevs", m{"name": "r0"}); b[0].NumBlocks != 2048 {
		t.Errorf("after shrinking an unused bdev: %d blocks", b[0].NumBlocks)
	}
	// The file keeps its bytes; the running configuration records the
	// served size, so save_config (and a restart from it) serves 1 MiB.
	if cfg := tg.runningConfig(); cfg.Bdev("r0").Size != 1<<20 {
		t.Errorf("running config size after a shrink: %d", cfg.Bdev("r0").Size)
	}
}

//go:build rbd

package main

// The rbd bdev through the runtime API and the configuration file, on a
// one-host Ceph cluster (cephtest): bdev_rbd_create, bdev_get_bdevs,
// bdev_rbd_resize, a LUN written through the Go front-end and read back
// with `rbd export`, bdev_rbd_delete, and a target started on a file.

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"vhost-target/bdev/rbd/cephtest"
	"vhost-target/config"
	"vhost-target/vhost/frontend"
)

// rbdParams are bdev_rbd_create's parameters for image on cluster c.
func rbdParams(c *cephtest.Cluster, name, image string) m {
	return m{"name": name, "pool_name": c.Pool, "rbd_name": image, "user_id": c.User, "conf": c.Conf, "keyring": c.Keyring}
}

func TestRPCRBD(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Ceph cluster")
	}
	cl := cephtest.Start(t)
	cl.CreateImage(t, "vm1", 64<<20)
	cl.CreateImage(t, "vm2", 8<<20)
	tg, c := rpcTarget(t, rpcBase)
	if logs := tg.logs.String(); !strings.Contains(logs, "bdev_types=malloc,file,aio,error,rbd\n") {
		t.Errorf("ready line lacks bdev_types=malloc,file,aio,error,rbd:\n%s", logs)
	}

	// Create, and see it as SPDK shows an rbd bdev.
	p := rbdParams(cl, "ceph0", "vm1")
	p["block_size"] = 4096
	if n := call[string](t, c, "bdev_rbd_create", p); n != "ceph0" {
		t.Fatalf("bdev_rbd_create returned %q", n)
	}
	b := call[[]bdevJSON](t, c, "bdev_get_bdevs", m{"name": "ceph0"})
	if len(b) != 1 || b[0].NumBlocks != 64<<20/4096 || b[0].BlockSize != 4096 || b[0].ProductName != "Ceph Rbd Disk" ||
		b[0].UUID != config.FormatUUID(config.BdevUUID("ceph0")) || b[0].Claimed || !b[0].SupportedIOTypes["write"] {
		t.Errorf("bdev_get_bdevs ceph0 = %+v", b)
	}
	spec, _ := b[0].DriverSpecific["rbd"].(map[string]any)
	want := map[string]any{"pool_name": cl.Pool, "rbd_name": "vm1", "config_file": cl.Conf, "user_id": cl.User,
		"keyring": cl.Keyring, "readonly": false, "queue_depth": float64(128), "op_timeout": "30s"}
	if fmt.Sprint(spec) != fmt.Sprint(want) {
		t.Errorf("driver_specific.rbd = %v\nwant %v", spec, want)
	}
	callErr(t, c, "bdev_rbd_create", rbdParams(cl, "ceph0", "vm2"), -17, `bdev "ceph0" already exists`)

	// Unnamed: SPDK's Ceph0; read-only and op_timeout "0s" are kept.
	p = rbdParams(cl, "", "vm2")
	delete(p, "name")
	p["readonly"], p["op_timeout"], p["queue_depth"] = true, "0s", 16
	if n := call[string](t, c, "bdev_rbd_create", p); n != "Ceph0" {
		t.Errorf("unnamed rbd bdev is %q, want Ceph0 (as SPDK)", n)
	}
	b = call[[]bdevJSON](t, c, "bdev_get_bdevs", m{"name": "Ceph0"})
	if spec, _ := b[0].DriverSpecific["rbd"].(map[string]any); b[0].SupportedIOTypes["write"] ||
		spec["readonly"] != true || spec["op_timeout"] != "0s" || spec["queue_depth"] != float64(16) {
		t.Errorf("bdev_get_bdevs Ceph0 = %+v", b)
	}
	call[bool](t, c, "bdev_rbd_delete", m{"name": "Ceph0"})

	// A missing image: ENOENT, and the error names the bdev and the image.
	if msg := callErr(t, c, "bdev_rbd_create", rbdParams(cl, "ceph9", "nosuch"), -2, `bdev "ceph9"`); !strings.Contains(msg, "nosuch") || strings.Count(msg, `bdev "ceph9"`) != 1 {
		t.Errorf("missing image: %s", msg)
	}
	p = rbdParams(cl, "ceph9", "vm1")
	p["pool_name"] = "nopool"
	msg := callErr(t, c, "bdev_rbd_create", p, -2, `bdev "ceph9"`)
	if !strings.Contains(msg, "nopool") {
		t.Errorf("missing pool: %s", msg)
	}

	// A LUN on it: data written through the front-end is in the image.
	call[bool](t, c, "vhost_create_scsi_controller", m{"ctrlr": "rc0"})
	call[int](t, c, "vhost_scsi_controller_add_target", m{"ctrlr": "rc0", "scsi_target_num": 0, "bdev_name": "ceph0"})
	dev, err := frontend.Dial(filepath.Join(tg.cfg.SocketDir, "rc0"), frontend.Options{NumQueues: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	data := make([]byte, 256<<10)
	rand.Read(data)
	const lba = 100 // 4 KiB blocks
	r, err := dev.Do(frontend.Command{CDB: rw16(0x8a, lba, uint32(len(data)/4096)), DataOut: data, Segments: 3})
	if err != nil || r.Response != 0 || r.Status != 0 {
		t.Fatalf("write: %v %+v", err, r)
	}
	r, err = dev.Do(frontend.Command{CDB: []byte{0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0}}) // SYNCHRONIZE CACHE(10)
	if err != nil || r.Response != 0 || r.Status != 0 {
		t.Fatalf("synchronize cache: %v %+v", err, r)
	}
	img := cl.Export(t, "vm1")
	if len(img) != 64<<20 || !bytes.Equal(img[lba*4096:lba*4096+len(data)], data) {
		t.Errorf("rbd export: %d bytes; written data not found at LBA %d", len(img), lba)
	}
	if b := call[[]bdevJSON](t, c, "bdev_get_bdevs", m{"name": "ceph0"}); !b[0].Claimed {
		t.Errorf("ceph0 serving a LUN is not claimed")
	}
	callErr(t, c, "bdev_rbd_delete", m{"name": "ceph0"}, -16, `bdev "ceph0" is in use by controller "rc0" target 0 lun 0`)

	// Grow it under the LUN: the image grows, bdev_get_bdevs and the
	// initiator (after its UNIT ATTENTION) see the new size, and the
	// configuration records no size (the image's size is served).
	call[bool](t, c, "bdev_rbd_resize", m{"name": "ceph0", "new_size": 128})
	if b := call[[]bdevJSON](t, c, "bdev_get_bdevs", m{"name": "ceph0"}); b[0].NumBlocks != 128<<20/4096 {
		t.Errorf("after bdev_rbd_resize to 128 MiB: num_blocks %d, want %d", b[0].NumBlocks, 128<<20/4096)
	}
	if info := cl.RBD(t, "info", cl.Pool+"/vm1"); !regexp.MustCompile(`size 128 MiB in 32 objects`).MatchString(info) {
		t.Errorf("rbd info after resize:\n%s", info)
	}
	var capacity uint64
	for range 3 {
		r, err = dev.Do(frontend.Command{CDB: []byte{0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0}, DataInLen: 32})
		if err != nil {
			t.Fatal(err)
		}
		if r.Status == 0 {
			capacity = (beUint64(r.DataIn[0:8]) + 1) * 4096
			break
		}
		if !r.IsUnitAttention() {
			t.Fatalf("READ CAPACITY(16) after resize: %+v", r)
		}
	}
	if capacity != 128<<20 {
		t.Errorf("initiator sees %d bytes after resize, want %d", capacity, 128<<20)
	}
	saved := call[string](t, c, "save_config", nil)
	for _, w := range []string{`type = "rbd"`, `pool = "` + cl.Pool + `"`, `image = "vm1"`, `conf = "` + cl.Conf + `"`,
		`keyring = "` + cl.Keyring + `"`, `user = "admin"`, `op_timeout = "30s"`} {
		if !strings.Contains(saved, w) {
			t.Errorf("save_config lacks %s:\n%s", w, saved)
		}
	}
	if _, err := config.Parse([]byte(saved), "saved.toml"); err != nil {
		t.Errorf("save_config after an rbd resize does not parse: %v\n%s", err, saved)
	}
	callErr(t, c, "bdev_rbd_resize", m{"name": "nosuch", "new_size": 8}, -19, `rbd bdev "nosuch" does not exist`)
	callErr(t, c, "bdev_rbd_resize", m{"name": "ceph0", "new_size": 64}, -16, `bdev "ceph0": resize: `)
	// Grown behind the target's back: bdev_rbd_rescan (ours) serves it.
	cl.RBD(t, "resize", "--size", "160M", cl.Pool+"/vm1")
	call[bool](t, c, "bdev_rbd_rescan", m{"name": "ceph0"})
	if b := call[[]bdevJSON](t, c, "bdev_get_bdevs", m{"name": "ceph0"}); b[0].NumBlocks != 160<<20/4096 {
		t.Errorf("after rbd resize and bdev_rbd_rescan: num_blocks %d, want %d", b[0].NumBlocks, 160<<20/4096)
	}
	callErr(t, c, "bdev_rbd_rescan", m{"name": "m0"}, -19, `bdev "m0" does not exist`)
	// Grown behind the target's back with nothing called: librbd's update
	// watch makes the target rescan by itself.
	cl.RBD(t, "resize", "--size", "176M", cl.Pool+"/vm1")
	if !waitFor(30*time.Second, func() bool {
		return call[[]bdevJSON](t, c, "bdev_get_bdevs", m{"name": "ceph0"})[0].NumBlocks == 176<<20/4096
	}) {
		t.Errorf("rbd resize to 176 MiB not noticed within 30 s: num_blocks %d",
			call[[]bdevJSON](t, c, "bdev_get_bdevs", m{"name": "ceph0"})[0].NumBlocks)
	}
	// bdev_resize (any type) takes the same path.
	call[bool](t, c, "bdev_resize", m{"name": "ceph0", "new_size": 192})
	if info := cl.RBD(t, "info", cl.Pool+"/vm1"); !strings.Contains(info, "size 192 MiB") {
		t.Errorf("rbd info after bdev_resize:\n%s", info)
	}
	dev.Close()

	// Take it apart.
	call[bool](t, c, "vhost_scsi_controller_remove_target", m{"ctrlr": "rc0", "scsi_target_num": 0})
	call[bool](t, c, "vhost_delete_controller", m{"ctrlr": "rc0", "force": true})
	call[bool](t, c, "bdev_rbd_delete", m{"name": "ceph0"})
	callErr(t, c, "bdev_get_bdevs", m{"name": "ceph0"}, -19, `bdev "ceph0" does not exist`)
	callErr(t, c, "bdev_rbd_delete", m{"name": "ceph0"}, -19, `bdev "ceph0" does not exist`)
	// The image is whole and can be opened again.
	call[string](t, c, "bdev_rbd_create", rbdParams(cl, "ceph0", "vm1"))
	if b := call[[]bdevJSON](t, c, "bdev_get_bdevs", m{"name": "ceph0"}); b[0].NumBlocks != 192<<20/512 {
		t.Errorf("reopened: %+v", b)
	}
	if err := verifyIO(tg.sock("c0"), 1, 512, 8); err != nil {
		t.Errorf("malloc LUN beside the rbd bdev: %v", err)
	}
}

func beUint64(b []byte) uint64 {
	var v uint64
	for _, x := range b[:8] {
		v = v<<8 | uint64(x)
	}
	return v
}

// TestRBDConfigFile starts a target on a file with an rbd bdev (conf,
// keyring, user, pool, image) behind a scsi LUN and a blk controller, and
// verifies I/O through both.
func TestRBDConfigFile(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Ceph cluster")
	}
	cl := cephtest.Start(t)
	cl.CreateImage(t, "disk0", 32<<20)
	cl.CreateImage(t, "disk1", 32<<20)
	text := fmt.Sprintf(`
[metrics]
listen = "127.0.0.1:0"
[reactors]
poll = "adaptive"
[[bdev]]
name = "ceph0"
type = "rbd"
pool = %[1]q
image = "disk0"
conf = %[2]q
keyring = %[3]q
user = %[4]q
[[bdev]]
name = "ceph1"
type = "rbd"
pool = %[1]q
image = "disk1"
conf = %[2]q
keyring = %[3]q
user = %[4]q
block_size = 4096
queue_depth = 8
op_timeout = "10s"
[[controller]]
name = "s0"
num_queues = 2
[[controller.lun]]
target = 0
bdev = "ceph0"
[[controller]]
name = "b0"
type = "blk"
bdev = "ceph1"
`, cl.Pool, cl.Conf, cl.Keyring, cl.User)
	tg := startTarget(t, text)
	logs := tg.logs.String()
	for _, w := range []string{`msg="rbd bdev opened" bdev=ceph0 pool=rbd namespace="" image=disk0 size=33554432`,
		`msg="rbd bdev opened" bdev=ceph1`} {
		if !strings.Contains(logs, w) {
			t.Errorf("log lacks %s:\n%s", w, logs)
		}
	}
	if err := verifyIO(tg.sock("s0"), 2, 512, 64); err != nil {
		t.Error(err)
	}
	dev, err := frontend.Dial(tg.sock("b0"), frontend.Options{NumQueues: 1, Blk: true})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	data := make([]byte, 64<<10)
	rand.Read(data)
	if r, err := dev.DoBlk(frontend.BlkCommand{Type: frontend.BlkTOut, Sector: 64, DataOut: data}); err != nil || r.Status != 0 {
		t.Fatalf("blk write: %v %+v", err, r)
	}
	if r, err := dev.DoBlk(frontend.BlkCommand{Type: frontend.BlkTFlush}); err != nil || r.Status != 0 {
		t.Fatalf("blk flush: %v %+v", err, r)
	}
	if img := cl.Export(t, "disk1"); !bytes.Equal(img[64*512:64*512+len(data)], data) {
		t.Errorf("rbd export of disk1: written data not found")
	}

	// Reload: a resize is not recorded, so the same file changes nothing;
	// another image is another bdev (replaced when unused, refused when
	// it backs a LUN).
	if err := tg.resizeBdev("ceph0", 48<<20); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "t.toml")
	cur := tg.runningConfig()
	cl.CreateImage(t, "disk2", 8<<20)
	cl.CreateImage(t, "disk3", 8<<20)
	extra := cur.Bdevs[0]
	extra.Name, extra.Image, extra.UUID = "ceph2", "disk2", config.BdevUUID("ceph2")
	cur.Bdevs = append(cur.Bdevs, extra)
	write := func(c *config.Config) {
		text, err := c.Encode("")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(file, text, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(cur)
	tg.cfgPath = file
	if changes, err := tg.reload("test"); err != nil || fmt.Sprint(changes) != `[bdev "ceph2" added]` {
		t.Fatalf("reload adding ceph2: %v, %v", changes, err)
	}
	if changes, err := tg.reload("test"); err != nil || len(changes) != 0 {
		t.Errorf("reload of the running file after a resize: %v, %v", changes, err)
	}
	cur.Bdevs[2].Image = "disk3"
	write(cur)
	if changes, err := tg.reload("test"); err != nil || fmt.Sprint(changes) != `[bdev "ceph2" changed]` {
		t.Errorf("reload with ceph2 on another image: %v, %v", changes, err)
	}
	cur.Bdevs[0].Image = "disk3"
	write(cur)
	if _, err := tg.reload("test"); err == nil || !strings.Contains(err.Error(), `bdev "ceph0": settings changed while it is used by controller "s0" target 0 lun 0`) {
		t.Errorf("reload with ceph0 (a LUN) on another image: %v", err)
	}
}

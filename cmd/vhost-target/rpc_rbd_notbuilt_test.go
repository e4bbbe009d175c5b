//go:build !rbd

package main

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vhost-target/config"
)

const notBuilt = "this binary was built without the rbd bdev (build tag rbd, needs librbd-dev)"

// TestRBDNotBuilt: in a binary without the rbd bdev, a file with an rbd
// bdev is refused at start-up (and by --check) naming the bdev, and
// bdev_rbd_create is refused with ENOTSUP, after the parameters are checked.
func TestRBDNotBuilt(t *testing.T) {
	text := "[[bdev]]\nname = \"ceph0\"\ntype = \"rbd\"\npool = \"rbd\"\nimage = \"vm1\"\n"
	dir := shortTempDir(t, "vt-rbd-")
	cfg, err := config.Parse([]byte(fmt.Sprintf("socket_dir = %q\n[metrics]\nlisten = \"\"\n", dir)+text), "t.toml")
	if err != nil {
		t.Fatalf("the config package accepts rbd in every build: %v", err)
	}
	tg, err := start(cfg, slog.New(slog.NewTextHandler(testWriter{t}, nil)))
	if err == nil {
		tg.stop()
		t.Fatal("started with an rbd bdev")
	}
	if want := `bdev "ceph0": ` + notBuilt; err.Error() != want {
		t.Errorf("start: %v\nwant %s", err, want)
	}
	err = checkBuilt(cfg, "t.toml")
	if want := `t.toml: bdev[0] "ceph0": ` + notBuilt; err == nil || err.Error() != want {
		t.Errorf("checkBuilt: %v\nwant %s", err, want)
	}
	file := filepath.Join(dir, "t.toml")
	if err := os.WriteFile(file, []byte(fmt.Sprintf("socket_dir = %q\n[reactors]\ncpus = [%d]\n", dir, cfg.Reactors.CPUs[0])+text), 0o644); err != nil {
		t.Fatal(err)
	}
	if status := run([]string{"-c", file, "--check"}); status != 1 {
		t.Errorf("--check on an rbd bdev: exit %d, want 1", status)
	}

	tgt, c := rpcTarget(t, rpcBase)
	if logs := tgt.logs.String(); !strings.Contains(logs, "bdev_types=malloc,file,aio,error\n") {
		t.Errorf("ready line lacks bdev_types=malloc,file,aio,error:\n%s", logs)
	}
	callErr(t, c, "bdev_rbd_create", m{"name": "ceph0", "pool_name": "rbd", "rbd_name": "vm1"}, -95,
		`bdev "ceph0": `+notBuilt)
	callErr(t, c, "bdev_rbd_create", m{"pool_name": "rbd", "rbd_name": "vm1"}, -95, `bdev "Ceph0": `+notBuilt)
	if b := call[[]bdevJSON](t, c, "bdev_get_bdevs", nil); len(b) != 1 {
		t.Errorf("a refused bdev_rbd_create left bdevs: %+v", b)
	}
}

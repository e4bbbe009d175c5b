package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"vhost-target/cmd/vhost-target/guest"
	"vhost-target/config"
)

// guestImage builds (or reuses) the guest image; real-guest tests skip in -short mode.
func guestImage(t *testing.T) *guest.Image {
	t.Helper()
	if testing.Short() {
		t.Skip("real-guest test: skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	img, err := guest.Build(ctx, t.Logf)
	if errors.Is(err, guest.ErrNeedRoot) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// startTarget runs the target in-process on cfg text (socket_dir is filled in).
func startTarget(t *testing.T, text string) (*target, *config.Config, *strings.Builder) {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "vt-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg, err := config.Parse([]byte(fmt.Sprintf("socket_dir = %q\n", dir)+text), t.Name())
	if err != nil {
		t.Fatal(err)
	}
	logs := &strings.Builder{}
	log := slog.New(slog.NewTextHandler(io.MultiWriter(logs, testWriter{t}), &slog.HandlerOptions{Level: slog.LevelInfo}))
	tg, err := start(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tg.stop)
	return tg, cfg, logs
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// runGuest boots a guest with the controllers' sockets and fails the test on
// a non-zero script status, printing the console.
func runGuest(t *testing.T, img *guest.Image, o guest.Options) *guest.Result {
	t.Helper()
	o.Image = img
	if o.Timeout == 0 {
		o.Timeout = 4 * time.Minute
	}
	res, err := guest.Run(context.Background(), o)
	if err != nil {
		t.Fatalf("guest: %v", err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("guest script exited %d; console:\n%s", res.ExitCode, res.Console)
	}
	t.Logf("guest ran in %v", res.Duration.Round(time.Millisecond))
	return res
}

func sock(cfg *config.Config, name string) string {
	for i := range cfg.Controllers {
		if cfg.Controllers[i].Name == name {
			return cfg.SocketPath(&cfg.Controllers[i])
		}
	}
	panic("no controller " + name)
}

const twoLUNs = `
[metrics]
listen = ""
[reactors]
cpus = [0]
poll = "adaptive"
[[bdev]]
name = "m512"
type = "malloc"
size = "64MiB"
block_size = 512
[[bdev]]
name = "m4k"
type = "malloc"
size = "128MiB"
block_size = 4096
[[controller]]
name = "c0"
num_queues = 1
[[controller.lun]]
target = 0
lun = 0
bdev = "m512"
[[controller.lun]]
target = 1
lun = 0
bdev = "m4k"
`

func TestGuestSmoke(t *testing.T) {
	img := guestImage(t)
	_, cfg, _ := startTarget(t, twoLUNs)
	res := runGuest(t, img, guest.Options{
		Controllers: []guest.Controller{{Socket: sock(cfg, "c0"), NumQueues: 1}},
		Script: `set -e
lsblk -b -o NAME,SIZE,LOG-SEC,PHY-SEC,MODEL,SERIAL
sg_inq /dev/sda
sg_readcap -l /dev/sda
sg_readcap -l /dev/sdb
fio --name=v --filename=/dev/sda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size=8m --verify=crc32c --do_verify=1 --output-format=terse >/dev/null
fio --name=v --filename=/dev/sdb --ioengine=io_uring --direct=1 --rw=randwrite --bs=16k --iodepth=8 --size=8m --verify=crc32c --do_verify=1 --output-format=terse >/dev/null
echo fio-ok
`,
	})
	t.Log(res.Console)
}

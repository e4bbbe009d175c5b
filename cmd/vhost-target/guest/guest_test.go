package guest

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// testImage builds (or fetches the cached) guest image, skipping in -short
// mode and for non-root users without a cache.
func testImage(t *testing.T) *Image {
	t.Helper()
	if testing.Short() {
		t.Skip("real-guest test: boots QEMU (and builds the image on first use); skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	img, err := Build(ctx, t.Logf)
	if errors.Is(err, ErrNeedRoot) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// TestGuestQMP: a guest with Options.QMP answers QMP commands while it runs
// (the migration tests drive QEMU through it).
func TestGuestQMP(t *testing.T) {
	img := testImage(t)
	sock := filepath.Join(t.TempDir(), "qmp")
	done := make(chan struct{})
	var res *Result
	var err error
	go func() {
		defer close(done)
		res, err = Run(context.Background(), Options{Image: img, QMP: sock, Timeout: 2 * time.Minute,
			Script: "while [ ! -e /tmp/stop ]; do sleep 0.1; [ $(cut -d. -f1 /proc/uptime) -gt 60 ] && exit 3; done; exit 0"})
	}()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	q, qerr := DialQMP(ctx, sock)
	if qerr != nil {
		t.Fatal(qerr)
	}
	defer q.Close()
	ret, qerr := q.Execute("query-status", nil)
	if qerr != nil {
		t.Fatal(qerr)
	}
	var st struct {
		Status string `json:"status"`
	}
	if json.Unmarshal(ret, &st) != nil || st.Status != "running" {
		t.Fatalf("query-status: %s", ret)
	}
	if _, qerr := q.Execute("no-such-command", nil); qerr == nil || !strings.Contains(qerr.Error(), "CommandNotFound") {
		t.Fatalf("an unknown command: %v", qerr)
	}
	// End the guest: quit through QMP.
	if _, qerr := q.Execute("quit", nil); qerr != nil && !strings.Contains(qerr.Error(), "EOF") {
		t.Fatal(qerr)
	}
	<-done
	// QEMU quit before the script could answer: Run reports exactly that.
	if err == nil || !strings.Contains(err.Error(), "exited") || !strings.Contains(err.Error(), "without a result") {
		t.Fatalf("after quit: %v (exit code %d)", err, res.ExitCode)
	}
}

func TestGuestBoots(t *testing.T) {
	img := testImage(t)
	res, err := Run(context.Background(), Options{
		Image:   img,
		Script:  "uname -r; ls /dev; fio --enghelp; sg_inq --version; lsblk --version; cat /data/hello; echo boot=$BOOT; exit 7",
		Files:   map[string][]byte{"/data/hello": []byte("hello from the host\n")},
		Timeout: 2 * time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest ran in %v", res.Duration.Round(time.Millisecond))
	if res.ExitCode != 7 {
		t.Fatalf("exit code %d, want 7\n%s", res.ExitCode, res.Console)
	}
	kver, err := os.ReadFile(filepath.Join(filepath.Dir(img.Kernel), "kernel-version"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"\n" + strings.TrimSpace(string(kver)) + "\r\n", // uname -r
		"ttyS0",                                     // ls /dev
		"\tlibaio", "\tio_uring", "\tsg", "\tpsync", // fio engines
		"Version string: ", // sg_inq --version
		"lsblk from util-linux",
		"hello from the host",
		"boot=1",
	} {
		if !strings.Contains(res.Console, want) {
			t.Errorf("console lacks %q", want)
		}
	}
	if res.Boots != 1 {
		t.Errorf("Boots = %d, want 1", res.Boots)
	}
	if t.Failed() {
		t.Logf("console:\n%s", res.Console)
	}
}

func TestGuestTimeoutKills(t *testing.T) {
	img := testImage(t)
	start := time.Now()
	res, err := Run(context.Background(), Options{
		Image:   img,
		Script:  "echo about-to-hang; while :; do sleep 1; done",
		Timeout: 15 * time.Second,
		// Also checks that -kernel boot works with strict boot order.
		SkipFirmwareScan: true,
	})
	if err == nil {
		t.Fatalf("hanging guest returned no error: %+v", res)
	}
	if el := time.Since(start); el > 30*time.Second {
		t.Errorf("Run took %v for a 15s timeout", el)
	}
	if res == nil || !strings.Contains(res.Console, "about-to-hang") {
		t.Fatalf("console not returned: %v", res)
	}
	if res.ExitCode != -1 {
		t.Errorf("ExitCode %d, want -1", res.ExitCode)
	}
	if !strings.Contains(err.Error(), "timed out") || !strings.Contains(err.Error(), "about-to-hang") {
		t.Errorf("error lacks timeout or console tail: %v", err)
	}
}

// TestControllerConnects checks the vhost-user-scsi-pci command line up to
// the device's realize: QEMU connects to the socket and sends the first
// vhost-user request (GET_FEATURES) only after accepting every property.
func TestControllerConnects(t *testing.T) {
	img := testImage(t)
	sock := filepath.Join(t.TempDir(), "vhost.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make(chan []byte, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- nil
			return
		}
		hdr := make([]byte, 12)
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		_, err = io.ReadFull(c, hdr)
		if err != nil {
			hdr = nil
		}
		got <- hdr
		c.Close() // QEMU fails the device and exits
	}()
	res, err := Run(context.Background(), Options{
		Image:       img,
		Controllers: []Controller{{Socket: sock, NumQueues: 2, Extra: "virtqueue_size=128"}},
		Script:      "exit 0",
		Timeout:     30 * time.Second,
	})
	if err == nil {
		t.Fatalf("guest ran without a backend: %+v", res)
	}
	hdr := <-got
	if hdr == nil {
		t.Fatalf("no vhost-user message received; run error: %v", err)
	}
	// Header: u32 request, u32 flags (version 1), u32 size. GET_FEATURES = 1.
	if req, flags := binary.LittleEndian.Uint32(hdr), binary.LittleEndian.Uint32(hdr[4:]); req != 1 || flags&3 != 1 {
		t.Fatalf("first message request %d flags %#x, want GET_FEATURES (1), version 1", req, flags)
	}
	t.Logf("expected failure: %v", err)
	if !strings.Contains(err.Error(), "QEMU exited") {
		t.Errorf("err = %v", err)
	}
}

func TestGuestContextCancel(t *testing.T) {
	img := testImage(t)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(3*time.Second, cancel)
	res, err := Run(ctx, Options{Image: img, Script: "sleep 600", Timeout: time.Minute})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if res == nil || res.Duration > 20*time.Second {
		t.Fatalf("result %+v", res)
	}
}

func TestGuestReboot(t *testing.T) {
	img := testImage(t)
	res, err := Run(context.Background(), Options{
		Image:   img,
		Boots:   2,
		Script:  `echo "seen boot $BOOT"; if [ "$BOOT" = 1 ]; then reboot -f; fi; exit 4`,
		Timeout: 2 * time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 4 || res.Boots != 2 {
		t.Fatalf("ExitCode %d Boots %d, want 4 and 2\n%s", res.ExitCode, res.Boots, res.Console)
	}
	if !regexp.MustCompile(`(?s)seen boot 1.*seen boot 2`).MatchString(res.Console) {
		t.Fatalf("console lacks both boots:\n%s", res.Console)
	}

	// A guest that keeps rebooting is stopped after Boots boots.
	res, err = Run(context.Background(), Options{Image: img, Boots: 2, Script: "reboot -f", Timeout: 2 * time.Minute})
	if err == nil || !strings.Contains(err.Error(), "booted more than 2 times") {
		t.Fatalf("reboot loop: err = %v", err)
	}
	if res.Boots != 3 {
		t.Errorf("Boots = %d, want 3", res.Boots)
	}
}

func TestQEMUArgs(t *testing.T) {
	t.Setenv("VHOST_TARGET_GUEST_ACCEL", "tcg")
	o := Options{
		Image: &Image{Kernel: "/k", Initramfs: "/i"},
		Controllers: []Controller{{Socket: "/run/a.sock", NumQueues: 4}, {Socket: "/run/b.sock", Extra: "virtqueue_size=256"},
			{Socket: "/run/c.sock", Blk: true, NumQueues: 2}},
		MemoryMiB: 1024, CPUs: 2, Boots: 1, SkipFirmwareScan: true,
	}
	got := strings.Join(qemuArgs(o, "/tmp/initrd", "tok"), " ")
	for _, want := range []string{
		"-m 1024M -object memory-backend-memfd,id=mem,size=1024M,share=on -machine pc,memory-backend=mem -smp 2",
		"-accel tcg,thread=multi -cpu max -no-reboot -boot strict=on",
		"-chardev socket,id=vhost0,path=/run/a.sock -device vhost-user-scsi-pci,id=scsi0,chardev=vhost0,num_queues=4",
		"-chardev socket,id=vhost1,path=/run/b.sock -device vhost-user-scsi-pci,id=scsi1,chardev=vhost1,virtqueue_size=256",
		"-chardev socket,id=vhost2,path=/run/c.sock -device vhost-user-blk-pci,id=blk2,chardev=vhost2,num-queues=2",
		"-kernel /k -initrd /tmp/initrd -append console=ttyS0 quiet panic=-1 scsi_mod.scan=sync vt_token=tok",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("args lack %q:\n%s", want, got)
		}
	}
	o.BIOS, o.Boots = true, 3
	got = strings.Join(qemuArgs(o, "/tmp/initrd", "tok"), " ")
	if strings.Contains(got, "-kernel") || strings.Contains(got, "-no-reboot") || !strings.Contains(got, "num_queues=4,bootindex=1") {
		t.Errorf("BIOS args wrong: %s", got)
	}
}

// TestQEMUArgsOtherQEMU: a QEMU with data dirs gets -L for each, before
// the devices; Reconnect becomes reconnect-ms on that controller only.
func TestQEMUArgsOtherQEMU(t *testing.T) {
	t.Setenv("VHOST_TARGET_GUEST_ACCEL", "tcg")
	o := Options{
		Image: &Image{Kernel: "/k", Initramfs: "/i"},
		QEMU:  &QEMU{Binary: "/q/bin/qemu-system-x86_64", DataDirs: []string{"/q/share/qemu", "/q/share/seabios"}},
		Controllers: []Controller{{Socket: "/run/a.sock", Reconnect: 250 * time.Millisecond},
			{Socket: "/run/b.sock", Reconnect: time.Microsecond}, {Socket: "/run/c.sock"}},
		Boots: 1,
	}
	got := strings.Join(qemuArgs(o, "/tmp/initrd", "tok"), " ")
	for _, want := range []string{
		"-L /q/share/qemu -L /q/share/seabios -accel",
		"-chardev socket,id=vhost0,path=/run/a.sock,reconnect-ms=250 -device",
		"-chardev socket,id=vhost1,path=/run/b.sock,reconnect-ms=1 -device",
		"-chardev socket,id=vhost2,path=/run/c.sock -device",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("args lack %q:\n%s", want, got)
		}
	}
	if o.QEMU.binary() != "/q/bin/qemu-system-x86_64" || (*QEMU)(nil).binary() != qemuBinary {
		t.Errorf("binary: %q, nil: %q", o.QEMU.binary(), (*QEMU)(nil).binary())
	}
	o.QEMU = nil
	if got := strings.Join(qemuArgs(o, "/tmp/initrd", "tok"), " "); strings.Contains(got, " -L ") {
		t.Errorf("system QEMU got -L: %s", got)
	}
}

func TestCacheDir(t *testing.T) {
	t.Setenv("VHOST_TARGET_GUEST_CACHE", "/some/where")
	if d := CacheDir(); d != "/some/where" {
		t.Fatalf("CacheDir = %q", d)
	}
	dir := t.TempDir()
	t.Setenv("VHOST_TARGET_GUEST_CACHE", dir)
	if cached(dir) {
		t.Fatal("empty dir reported as cached")
	}
	for _, f := range []string{"vmlinux", "initramfs.cpio.gz"} {
		os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o644)
	}
	os.WriteFile(filepath.Join(dir, "stamp"), []byte("stale\n"), 0o644)
	if cached(dir) {
		t.Fatal("stale stamp reported as cached")
	}
	os.WriteFile(filepath.Join(dir, "stamp"), []byte(ScriptHash()+"\n"), 0o644)
	if _, err := os.Stat("/usr/bin/" + qemuBinary); err == nil && !cached(dir) {
		t.Fatal("current stamp not reported as cached")
	}
}

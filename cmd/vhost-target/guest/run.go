package guest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const qemuBinary = "qemu-system-x86_64"

// Controller is one vhost-user-scsi-pci (or, with Blk, vhost-user-blk-pci)
// device backed by a target socket.
type Controller struct {
	Socket    string
	Blk       bool   // vhost-user-blk-pci: the guest sees /dev/vdX
	NumQueues int    // request queues; 0 leaves QEMU's default (1)
	Extra     string // extra -device properties, e.g. "virtqueue_size=256,bootindex=1"
	// Reconnect > 0 adds reconnect-ms to the socket chardev (QEMU 9.2 and
	// later; QEMU 7.2 refuses the option): QEMU is then a client that
	// retries the socket every Reconnect while it is down. At start QEMU
	// waits for the socket instead of exiting (it prints "Failed to connect"
	// once and retries until Options.Timeout), and from QEMU 8.2 a
	// vhost-user-scsi device whose back-end closes the socket is stopped and
	// started again on the next connection.
	Reconnect time.Duration
}

// Options describe one guest run.
type Options struct {
	Image *Image
	// QEMU to run; nil is the system's qemu-system-x86_64 (Debian 12: 7.2).
	// QEMU10 returns the one from bookworm-backports.
	QEMU        *QEMU
	Controllers []Controller
	MemoryMiB   int // default 512
	CPUs        int // default 1
	// Script is run by /init as /test.sh (busybox sh); its exit status is the
	// Result's ExitCode. $BOOT holds the boot number (1, 2, ...).
	Script string
	// Files are extra guest files (mode 0755), e.g. "/data/pattern".
	Files   map[string][]byte
	Timeout time.Duration // default 3 minutes
	// BIOS boots through the firmware from controller 0's disk instead of
	// -kernel (the disk must hold a bootloader; Script is not used and a run
	// only ends when QEMU exits or times out). With BIOS false the guest is
	// booted with -kernel, but SeaBIOS still runs first and scans the
	// controllers unless SkipFirmwareScan is set (A.0 in the notes).
	BIOS bool
	// SkipFirmwareScan passes -boot strict=on so SeaBIOS (1.16) skips
	// initialising controllers that are not in the boot order: Linux is then
	// the first driver the target sees.
	SkipFirmwareScan bool
	// Boots > 1 lets the script reboot the guest (`reboot -f`) in the same
	// QEMU up to Boots times; each boot reruns /test.sh with BOOT=n. A boot
	// beyond Boots is an error. 0 or 1: -no-reboot, a reboot ends QEMU.
	Boots      int
	KernelArgs string   // appended to the kernel command line
	QEMUArgs   []string // appended to QEMU's command line (e.g. -trace)
	// QMP, when set, is a unix socket path QEMU serves its monitor protocol
	// on (DialQMP).
	QMP string
	// Incoming, when set, starts QEMU as the destination of a live
	// migration listening on this unix socket (-incoming unix:PATH): the
	// guest does not boot but arrives from a source run's QMP Migrate.
	// Give it the source's Options (controllers aside) and its Token.
	Incoming string
	// Token tags the guest's result and boot lines on the console; "" draws
	// a random one. A migration's runs share one (NewToken), so the
	// destination recognises the result of the guest the source booted.
	Token   string
	Console io.Writer // optional live copy of the serial console
}

// Result of a guest run. Console is filled even when Run returns an error.
type Result struct {
	ExitCode int // the script's exit status; -1 when none was reported
	Console  string
	Duration time.Duration
	Boots    int // boots seen (BOOT value of the last boot)
}

// consoleCap bounds the console kept in memory; beyond it the oldest half
// is dropped (fio with verbose output can print a lot).
const consoleCap = 32 << 20

// Run boots one QEMU for o, waits for the script's GUEST-RESULT line and
// returns its status. QEMU is killed when o.Timeout passes or ctx ends; the
// error then carries the last lines of the console. A script that exits
// non-zero is not an error: check Result.ExitCode.
func Run(ctx context.Context, o Options) (*Result, error) {
	start := time.Now()
	if o.Image == nil {
		return nil, errors.New("guest: Options.Image is nil (call Build)")
	}
	if o.BIOS && len(o.Controllers) == 0 {
		return nil, errors.New("guest: BIOS boot needs a controller to boot from")
	}
	if o.MemoryMiB <= 0 {
		o.MemoryMiB = 512
	}
	if o.CPUs <= 0 {
		o.CPUs = 1
	}
	if o.Timeout <= 0 {
		o.Timeout = 3 * time.Minute
	}
	if o.Boots <= 0 {
		o.Boots = 1
	}
	token := o.Token
	if token == "" {
		var err error
		if token, err = NewToken(); err != nil {
			return nil, err
		}
	}
	tmp, err := os.MkdirTemp("", "vhost-target-guest-run-")
	if err != nil {
		return nil, fmt.Errorf("guest: temp dir: %w", err)
	}
	defer os.RemoveAll(tmp)
	initrd := filepath.Join(tmp, "initrd")
	if !o.BIOS {
		if err := writeInitrd(initrd, o); err != nil {
			return nil, err
		}
	}
	args := qemuArgs(o, initrd, token)

	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	cmd := exec.Command(o.QEMU.binary(), args...)
	if o.QEMU != nil && len(o.QEMU.Env) > 0 {
		cmd.Env = append(os.Environ(), o.QEMU.Env...)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("guest: console pipe: %w", err)
	}
	defer outR.Close()
	inR, inW, err := os.Pipe()
	if err != nil {
		outW.Close()
		return nil, fmt.Errorf("guest: stdin pipe: %w", err)
	}
	defer inW.Close()
	cmd.Stdout, cmd.Stderr, cmd.Stdin = outW, outW, inR
	err = cmd.Start()
	outW.Close()
	inR.Close()
	if err != nil {
		return nil, fmt.Errorf("guest: starting %s: %w", o.QEMU.binary(), err)
	}

	con := &console{token: token, maxBoots: o.Boots, live: o.Console, stdin: inW,
		result: make(chan int, 1), tooMany: make(chan struct{}, 1)}
	readDone := make(chan struct{})
	go func() { con.read(outR); close(readDone) }()
	waitDone := make(chan error, 1)
	go func() { waitDone <- cmd.Wait() }()

	var runErr error
	exited := false
	select {
	case <-con.result:
		// The guest powers off right after reporting; give it a moment.
		select {
		case <-waitDone:
			exited = true
		case <-time.After(10 * time.Second):
		}
	case werr := <-waitDone:
		exited = true
		<-readDone // QEMU is gone: drain what it printed before judging
		if !con.hasResult() {
			runErr = fmt.Errorf("guest: QEMU exited (%v) without a result", werr)
		}
	case <-con.tooMany:
		runErr = fmt.Errorf("guest: booted more than %d times", o.Boots)
	case <-ctx.Done():
		if con.hasResult() {
			break
		}
		if ctx.Err() == context.DeadlineExceeded {
			runErr = fmt.Errorf("guest: timed out after %v", o.Timeout)
		} else {
			runErr = fmt.Errorf("guest: %w", ctx.Err())
		}
	}
	if !exited {
		cmd.Process.Kill()
		<-waitDone
	}
	<-readDone
	res := &Result{ExitCode: -1, Console: con.String(), Duration: time.Since(start), Boots: con.bootsSeen()}
	if rc, ok := con.exitCode(); ok && runErr == nil {
		res.ExitCode = rc
		return res, nil
	}
	if runErr == nil {
		runErr = errors.New("guest: no result")
	}
	return res, fmt.Errorf("%w\n%s %s\n--- last console lines ---\n%s", runErr,
		o.QEMU.binary(), strings.Join(args, " "), con.tail.String())
}

// qemuArgs builds QEMU's command line. Guest RAM is a shared memfd because
// vhost-user maps it in the target; -nodefaults drops the NIC and VGA so
// SeaBIOS has no option ROMs to run besides linuxboot.
func qemuArgs(o Options, initrd, token string) []string {
	mem := strconv.Itoa(o.MemoryMiB) + "M"
	a := []string{
		"-nodefaults", "-no-user-config", "-display", "none",
		"-chardev", "stdio,id=con0,signal=off", "-serial", "chardev:con0",
		"-m", mem,
		"-object", "memory-backend-memfd,id=mem,size=" + mem + ",share=on",
		"-machine", "pc,memory-backend=mem",
		"-smp", strconv.Itoa(o.CPUs),
	}
	if o.QEMU != nil {
		for _, d := range o.QEMU.DataDirs {
			a = append(a, "-L", d)
		}
	}
	if realKVM() {
		a = append(a, "-accel", "kvm", "-cpu", "max")
	} else {
		a = append(a, "-accel", "tcg,thread=multi", "-cpu", "max")
	}
	if o.Boots <= 1 {
		a = append(a, "-no-reboot")
	}
	if o.SkipFirmwareScan && !o.BIOS {
		a = append(a, "-boot", "strict=on")
	}
	for i, c := range o.Controllers {
		chr := fmt.Sprintf("socket,id=vhost%d,path=%s", i, c.Socket)
		if c.Reconnect > 0 {
			chr += fmt.Sprintf(",reconnect-ms=%d", max(c.Reconnect.Milliseconds(), 1))
		}
		a = append(a, "-chardev", chr)
		dev := fmt.Sprintf("vhost-user-scsi-pci,id=scsi%d,chardev=vhost%d", i, i)
		if c.Blk {
			dev = fmt.Sprintf("vhost-user-blk-pci,id=blk%d,chardev=vhost%d", i, i)
		}
		if c.NumQueues > 0 {
			if c.Blk {
				dev += ",num-queues=" + strconv.Itoa(c.NumQueues)
			} else {
				dev += ",num_queues=" + strconv.Itoa(c.NumQueues)
			}
		}
		if o.BIOS && i == 0 && !strings.Contains(c.Extra, "bootindex") {
			dev += ",bootindex=1"
		}
		if c.Extra != "" {
			dev += "," + c.Extra
		}
		a = append(a, "-device", dev)
	}
	if !o.BIOS {
		cmdline := "console=ttyS0 quiet panic=-1 scsi_mod.scan=sync vt_token=" + token
		if o.Boots > 1 {
			cmdline += " vt_boots=" + strconv.Itoa(o.Boots)
		}
		if o.KernelArgs != "" {
			cmdline += " " + o.KernelArgs
		}
		a = append(a, "-kernel", o.Image.Kernel, "-initrd", initrd, "-append", cmdline)
	}
	if o.QMP != "" {
		a = append(a, "-qmp", "unix:"+o.QMP+",server=on,wait=off")
	}
	if o.Incoming != "" {
		a = append(a, "-incoming", "unix:"+o.Incoming)
	}
	return append(a, o.QEMUArgs...)
}

// writeInitrd concatenates the base initramfs with a per-run archive that
// holds /test.sh and o.Files; the kernel unpacks both, later entries win.
func writeInitrd(dst string, o Options) error {
	base, err := os.ReadFile(o.Image.Initramfs)
	if err != nil {
		return fmt.Errorf("guest: reading base initramfs: %w", err)
	}
	files := map[string]File{"test.sh": {Data: []byte(o.Script), Mode: 0o755}}
	for n, d := range o.Files {
		files[n] = File{Data: d, Mode: 0o755}
	}
	var buf bytes.Buffer
	buf.Write(base)
	for buf.Len()%4 != 0 { // keep the next archive 4-byte aligned
		buf.WriteByte(0)
	}
	if err := WriteInitramfs(&buf, files); err != nil {
		return err
	}
	if err := os.WriteFile(dst, buf.Bytes(), 0o600); err != nil {
		return fmt.Errorf("guest: writing initrd: %w", err)
	}
	return nil
}

// NewToken draws a console token (Options.Token).
func NewToken() (string, error) {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("guest: token: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

// realKVM reports whether hardware KVM is usable. The /dev/kvm on this
// project's build machines is paravirtual (kvm_pvm, no vmx/svm) and an
// unmodified kernel crawls under it, so KVM needs kvm_intel or kvm_amd
// loaded, no kvm_pvm, vmx/svm in cpuinfo and a working KVM_GET_API_VERSION.
// VHOST_TARGET_GUEST_ACCEL=tcg|kvm overrides the detection.
func realKVM() bool {
	switch os.Getenv("VHOST_TARGET_GUEST_ACCEL") {
	case "tcg":
		return false
	case "kvm":
		return true
	}
	if runtime.GOARCH != "amd64" {
		return false
	}
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		return false
	}
	_, errI := os.Stat("/sys/module/kvm_intel")
	_, errA := os.Stat("/sys/module/kvm_amd")
	if errI != nil && errA != nil {
		return false
	}
	cpuinfo, err := os.ReadFile("/proc/cpuinfo")
	if err != nil || !regexp.MustCompile(`(?m)^flags\s*:.*\b(vmx|svm)\b`).Match(cpuinfo) {
		return false
	}
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	const kvmGetAPIVersion = 0xAE00
	v, err := unix.IoctlRetInt(fd, kvmGetAPIVersion)
	return err == nil && v == 12
}

// console collects QEMU's output, mirrors it to the live writer, answers the
// guest's boot-number prompts and spots the GUEST-RESULT line.
type console struct {
	token    string
	maxBoots int
	live     io.Writer
	stdin    io.Writer
	result   chan int
	tooMany  chan struct{}
	tail     lineTail

	mu      sync.Mutex
	buf     bytes.Buffer
	dropped bool
	rc      int
	haveRC  bool
	boots   int
}

func (c *console) read(r io.Reader) {
	chunk := make([]byte, 32<<10)
	var line []byte
	for {
		n, err := r.Read(chunk)
		if n > 0 {
			data := chunk[:n]
			if c.live != nil {
				c.live.Write(data)
			}
			c.mu.Lock()
			if c.buf.Len()+n > consoleCap {
				keep := c.buf.Bytes()[c.buf.Len()/2:]
				c.buf = *bytes.NewBuffer(append([]byte(nil), keep...))
				c.dropped = true
			}
			c.buf.Write(data)
			c.mu.Unlock()
			for _, b := range data {
				if b == '\n' {
					c.line(string(bytes.TrimRight(line, "\r")))
					line = line[:0]
				} else if len(line) < 64<<10 {
					line = append(line, b)
				}
			}
		}
		if err != nil {
			if len(line) > 0 {
				c.line(string(line))
			}
			return
		}
	}
}

func (c *console) line(l string) {
	c.tail.add(l)
	if i := strings.Index(l, "GUEST-BOOT? "+c.token); i >= 0 {
		c.mu.Lock()
		c.boots++
		n := c.boots
		c.mu.Unlock()
		if n > c.maxBoots {
			select {
			case c.tooMany <- struct{}{}:
			default:
			}
			return
		}
		fmt.Fprintf(c.stdin, "%d\n", n)
		return
	}
	if i := strings.Index(l, "GUEST-RESULT "+c.token+" "); i >= 0 {
		rc, err := strconv.Atoi(strings.TrimSpace(l[i+len("GUEST-RESULT "+c.token+" "):]))
		if err != nil {
			return
		}
		c.mu.Lock()
		if c.haveRC {
			c.mu.Unlock()
			return
		}
		c.rc, c.haveRC = rc, true
		if c.boots == 0 {
			c.boots = 1
		}
		c.mu.Unlock()
		c.result <- rc
	}
}

func (c *console) hasResult() bool { _, ok := c.exitCode(); return ok }

func (c *console) exitCode() (int, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rc, c.haveRC
}

func (c *console) bootsSeen() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.boots
}

func (c *console) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dropped {
		return "[... earlier console output dropped ...]\n" + c.buf.String()
	}
	return c.buf.String()
}

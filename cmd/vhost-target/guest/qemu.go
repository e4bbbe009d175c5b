package guest

import (
	"bufio"
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

//go:embed get-qemu10.sh
var qemu10Script []byte

// QEMU is the QEMU a guest runs under. A nil *QEMU in Options is the host's
// qemu-system-x86_64 from PATH: Debian 12's 7.2, which build-image.sh
// installs.
type QEMU struct {
	Binary string
	// DataDirs are passed as -L, searched before the binary's built-in
	// firmware path, so BIOS and option ROMs come from the same packages.
	DataDirs []string
	// Env is added to QEMU's environment (QEMU_MODULE_DIR for an unpacked
	// QEMU, so it does not load the system QEMU's modules).
	Env     []string
	Version string // package version, for logs
}

func (q *QEMU) binary() string {
	if q == nil || q.Binary == "" {
		return qemuBinary
	}
	return q.Binary
}

// String names the QEMU for logs.
func (q *QEMU) String() string {
	if q == nil {
		return "system " + qemuBinary
	}
	return q.Binary + " (" + q.Version + ")"
}

// QEMU10Dir is where QEMU10 keeps the unpacked QEMU 10: qemu10 under CacheDir.
func QEMU10Dir() string { return filepath.Join(CacheDir(), "qemu10") }

// QEMU10 returns Debian's QEMU 10 from bookworm-backports, unpacked (not
// installed) beside the system's QEMU 7.2 by the embedded get-qemu10.sh into
// QEMU10Dir the first time (a few seconds and ~14 MB of downloads) and reused
// after that. It is current when QEMU10Dir/stamp holds the script's sha256.
// Not being root is no error as long as the libraries QEMU 10 needs are
// installed (QEMU 7.2 brings them); logf receives the script's output.
func QEMU10(ctx context.Context, logf func(string, ...any)) (*QEMU, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	dir := QEMU10Dir()
	root := filepath.Join(dir, "root")
	q := &QEMU{
		Binary:   filepath.Join(root, "usr/bin/qemu-system-x86_64"),
		DataDirs: []string{filepath.Join(root, "usr/share/qemu"), filepath.Join(root, "usr/share/seabios")},
		Env:      []string{"QEMU_MODULE_DIR=" + filepath.Join(root, "usr/lib/x86_64-linux-gnu/qemu")},
	}
	hash := sha256.Sum256(qemu10Script)
	current := func() bool {
		stamp, err := os.ReadFile(filepath.Join(dir, "stamp"))
		if err != nil || strings.TrimSpace(string(stamp)) != hex.EncodeToString(hash[:]) {
			return false
		}
		st, err := os.Stat(q.Binary)
		return err == nil && st.Mode().IsRegular()
	}
	if !current() {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("guest: creating %s: %w", dir, err)
		}
		unlock, err := lockDir(ctx, dir, logf)
		if err != nil {
			return nil, err
		}
		defer unlock()
		if !current() {
			if err := runScript(ctx, dir, "get-qemu10.sh", qemu10Script, logf); err != nil {
				return nil, err
			}
			if !current() {
				return nil, fmt.Errorf("guest: get-qemu10.sh finished but %s holds no current QEMU", dir)
			}
		}
	}
	v, err := os.ReadFile(filepath.Join(dir, "version"))
	if err != nil {
		return nil, fmt.Errorf("guest: %w", err)
	}
	q.Version = strings.TrimSpace(string(v))
	return q, nil
}

// runScript writes script into dir under name and runs it with dir as its
// argument, passing each output line to logf.
func runScript(ctx context.Context, dir, name string, script []byte, logf func(string, ...any)) error {
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, script, 0o755); err != nil {
		return fmt.Errorf("guest: writing %s: %w", name, err)
	}
	start := time.Now()
	cmd := exec.CommandContext(ctx, "bash", path, dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return fmt.Errorf("guest: %s pipe: %w", name, err)
	}
	cmd.Stderr = cmd.Stdout.(io.Writer)
	var tail lineTail
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("guest: starting %s: %w", name, err)
	}
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		logf("%s", sc.Text())
		tail.add(sc.Text())
	}
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("guest: %s %s: %w\n%s", name, dir, err, tail.String())
	}
	logf("guest: %s took %s", name, time.Since(start).Round(time.Second))
	return nil
}

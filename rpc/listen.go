package rpc

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// socketPathMax is the longest path a unix socket address holds
// (sizeof(sun_path) - 1 on Linux).
const socketPathMax = 107

// listenUnix creates the socket path and gives it mode, uid and gid (-1:
// unchanged). The checks are those vhost.Controller.Listen makes, for the
// same reason: whoever can connect can create and delete disks.
//
// The directory must not be writable by everyone unless it has the sticky
// bit (as /tmp does), or another user could swap the socket for their own.
// An existing path is never followed (Lstat sees a symlink as what it is)
// and is removed only when it is a socket nobody listens on (connect says
// ECONNREFUSED); a live socket or anything that is not a socket is left
// alone and Listen fails.
func listenUnix(path string, mode os.FileMode, uid, gid int) (*net.UnixListener, error) {
	if len(path) > socketPathMax {
		return nil, fmt.Errorf("rpc: socket path %s is %d bytes, longer than the %d a unix socket takes", path, len(path), socketPathMax)
	}
	dir := filepath.Dir(path)
	di, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("rpc: socket directory: %w", err)
	}
	if !di.IsDir() {
		return nil, fmt.Errorf("rpc: socket directory %s is not a directory", dir)
	}
	if di.Mode().Perm()&0o002 != 0 && di.Mode()&os.ModeSticky == 0 {
		return nil, fmt.Errorf("rpc: socket directory %s is world-writable without the sticky bit (mode %v): any user could replace the socket", dir, di.Mode())
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("rpc: %s exists and is not a socket (%v); not touching it", path, fi.Mode().Type())
		}
		conn, err := net.DialTimeout("unix", path, time.Second)
		switch {
		case err == nil:
			conn.Close()
			return nil, fmt.Errorf("rpc: %s is in use by another process", path)
		case errors.Is(err, syscall.ECONNREFUSED):
			// A socket left by a process that is gone.
			if err := os.Remove(path); err != nil {
				return nil, fmt.Errorf("rpc: remove stale socket: %w", err)
			}
		default:
			return nil, fmt.Errorf("rpc: cannot tell whether %s is in use (%v); not touching it", path, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("rpc: socket: %w", err)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("rpc: listen: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	if err := os.Chmod(path, mode.Perm()); err != nil {
		ln.Close()
		return nil, fmt.Errorf("rpc: chmod %s: %w", path, err)
	}
	if uid >= 0 || gid >= 0 {
		if err := os.Lchown(path, uid, gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("rpc: chown %s: %w", path, err)
		}
	}
	return ln, nil
}

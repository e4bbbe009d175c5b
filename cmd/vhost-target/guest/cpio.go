package guest

import (
	"bufio"
	"compress/gzip"
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
)

// CPIO mode bits (newc stores the full st_mode).
const (
	cpioModeDir  = 0o040000
	cpioModeFile = 0o100000
)

// File is one regular file for an appended initramfs archive.
type File struct {
	Data []byte
	Mode uint32 // permission bits; 0 means 0644
}

// WriteInitramfs writes files as a gzip-compressed newc cpio archive, the
// format the kernel unpacks when it is concatenated after the base
// initramfs. Parent directories are created as entries of their own (mode
// 0755) because the kernel does not create missing parents. Names are
// relative to the guest's root ("/test.sh" and "test.sh" are the same file).
// Entries are written in sorted order so the archive is reproducible.
func WriteInitramfs(w io.Writer, files map[string]File) error {
	zw, err := gzip.NewWriterLevel(w, gzip.BestSpeed)
	if err != nil {
		return fmt.Errorf("guest: gzip writer: %w", err)
	}
	if err := writeNewc(zw, files); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("guest: closing gzip stream: %w", err)
	}
	return nil
}

// writeNewc writes the uncompressed newc archive (see WriteInitramfs).
func writeNewc(w io.Writer, files map[string]File) error {
	bw := bufio.NewWriter(w)
	names := make([]string, 0, len(files))
	clean := make(map[string]File, len(files))
	dirs := map[string]bool{}
	for name, f := range files {
		c := strings.TrimPrefix(path.Clean("/"+name), "/")
		if c == "" || c == "." {
			return fmt.Errorf("guest: cpio: invalid file name %q", name)
		}
		if _, dup := clean[c]; dup {
			return fmt.Errorf("guest: cpio: %q given twice", c)
		}
		clean[c] = f
		names = append(names, c)
		for d := path.Dir(c); d != "."; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	for d := range dirs {
		if _, isFile := clean[d]; isFile {
			return fmt.Errorf("guest: cpio: %q is both a file and a directory", d)
		}
		names = append(names, d)
	}
	// Sorting puts every directory before its contents ("a" < "a/b").
	sort.Strings(names)
	ino := uint32(1)
	for _, n := range names {
		var err error
		if f, ok := clean[n]; ok {
			mode := f.Mode & 0o7777
			if mode == 0 {
				mode = 0o644
			}
			err = writeNewcEntry(bw, ino, cpioModeFile|mode, n, f.Data)
		} else {
			err = writeNewcEntry(bw, ino, cpioModeDir|0o755, n, nil)
		}
		if err != nil {
			return err
		}
		ino++
	}
	if err := writeNewcEntry(bw, 0, 0, "TRAILER!!!", nil); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("guest: cpio: %w", err)
	}
	return nil
}

// writeNewcEntry writes one header, name and body, each padded to 4 bytes
// as the newc format requires (the 110-byte header plus name, then data).
func writeNewcEntry(w *bufio.Writer, ino, mode uint32, name string, data []byte) error {
	if uint64(len(data)) > 0xffffffff {
		return fmt.Errorf("guest: cpio: %q is too large for newc", name)
	}
	nlink := 1
	if mode&cpioModeDir != 0 {
		nlink = 2
	}
	// magic ino mode uid gid nlink mtime filesize devmaj devmin rdevmaj rdevmin namesize check
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	w.WriteString(hdr)
	w.WriteString(name)
	w.WriteByte(0)
	pad(w, len(hdr)+len(name)+1)
	w.Write(data)
	_, err := w.Write(make([]byte, (4-len(data)%4)%4))
	if err != nil {
		return fmt.Errorf("guest: cpio: writing %q: %w", name, err)
	}
	return nil
}

func pad(w *bufio.Writer, n int) {
	for ; n%4 != 0; n++ {
		w.WriteByte(0)
	}
}

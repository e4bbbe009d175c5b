package guest

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"testing"
)

type cpioEntry struct {
	name string
	mode uint32
	data []byte
}

// readNewc parses a newc archive strictly (magic, alignment, trailer) so the
// writer is checked independently of any system cpio.
func readNewc(t *testing.T, b []byte) []cpioEntry {
	t.Helper()
	var out []cpioEntry
	off := 0
	for {
		if off%4 != 0 {
			t.Fatalf("header at unaligned offset %d", off)
		}
		if len(b)-off < 110 {
			t.Fatalf("truncated header at %d", off)
		}
		h := string(b[off : off+110])
		if h[:6] != "070701" {
			t.Fatalf("bad magic %q at %d", h[:6], off)
		}
		field := func(i int) uint32 {
			v, err := strconv.ParseUint(h[6+8*i:14+8*i], 16, 32)
			if err != nil {
				t.Fatalf("bad field %d in %q: %v", i, h, err)
			}
			return uint32(v)
		}
		mode, size, namesize := field(1), int(field(6)), int(field(11))
		off += 110
		name := string(b[off : off+namesize])
		if !strings.HasSuffix(name, "\x00") {
			t.Fatalf("name %q not NUL-terminated", name)
		}
		name = strings.TrimSuffix(name, "\x00")
		off += namesize
		off = (off + 3) &^ 3
		if name == "TRAILER!!!" {
			if rest := b[off:]; len(bytes.Trim(rest, "\x00")) != 0 {
				t.Fatalf("garbage after trailer: %q", rest)
			}
			return out
		}
		data := b[off : off+size]
		off += size
		off = (off + 3) &^ 3
		out = append(out, cpioEntry{name, mode, append([]byte(nil), data...)})
	}
}

func TestWriteInitramfsRoundTrip(t *testing.T) {
	files := map[string]File{
		"/test.sh":          {Data: []byte("#!/bin/sh\nexit 3\n"), Mode: 0o755},
		"data/a/b/pattern":  {Data: bytes.Repeat([]byte{0xa5}, 4097)},
		"etc/empty":         {},
		"odd-length-name.x": {Data: []byte("x")},
	}
	var gz bytes.Buffer
	if err := WriteInitramfs(&gz, files); err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(&gz)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	got := readNewc(t, raw)
	var names []string
	byName := map[string]cpioEntry{}
	for _, e := range got {
		names = append(names, e.name)
		byName[e.name] = e
	}
	want := []string{"data", "data/a", "data/a/b", "data/a/b/pattern", "etc", "etc/empty", "odd-length-name.x", "test.sh"}
	if fmt.Sprint(names) != fmt.Sprint(want) {
		t.Fatalf("entries %v, want %v", names, want)
	}
	for _, d := range []string{"data", "data/a", "data/a/b", "etc"} {
		if byName[d].mode != cpioModeDir|0o755 {
			t.Errorf("%s mode %o, want dir 0755", d, byName[d].mode)
		}
	}
	if e := byName["test.sh"]; e.mode != cpioModeFile|0o755 || string(e.data) != "#!/bin/sh\nexit 3\n" {
		t.Errorf("test.sh = mode %o %q", e.mode, e.data)
	}
	if e := byName["data/a/b/pattern"]; e.mode != cpioModeFile|0o644 || !bytes.Equal(e.data, files["data/a/b/pattern"].Data) {
		t.Errorf("pattern: mode %o, %d bytes", e.mode, len(e.data))
	}
	if e := byName["etc/empty"]; len(e.data) != 0 {
		t.Errorf("etc/empty has %d bytes", len(e.data))
	}

	// The system cpio must agree when it is installed.
	if _, err := exec.LookPath("cpio"); err == nil {
		cmd := exec.Command("cpio", "-t", "--quiet")
		cmd.Stdin = bytes.NewReader(raw)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("cpio -t: %v\n%s", err, out)
		}
		listed := strings.Fields(string(out))
		sort.Strings(listed)
		if fmt.Sprint(listed) != fmt.Sprint(want) {
			t.Errorf("cpio -t lists %v, want %v", listed, want)
		}
	}
}

func TestWriteInitramfsRejectsConflicts(t *testing.T) {
	for name, files := range map[string]map[string]File{
		"file and dir": {"a": {}, "a/b": {}},
		"duplicate":    {"/x": {}, "x": {}},
		"root":         {"/": {}},
	} {
		if err := WriteInitramfs(io.Discard, files); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

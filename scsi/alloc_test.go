package scsi

import (
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"vhost-target/bdev"
)

// Goal: the per-command path never allocates, and the package stays pure.
// Method: testing.AllocsPerRun over representative commands; parse the
// package's imports.

func TestExecuteDoesNotAllocate(t *testing.T) {
	l := newTestLUN(512)
	tg, err := NewTarget(0, []*LUN{l})
	if err != nil {
		t.Fatal(err)
	}
	read := newCmd(DirIn, 8*512, 0)
	write := newCmd(DirOut, 8*512, 0)
	inq := newCmd(DirIn, 255, 0)
	bad := newCmd(DirIn, 512, 0)
	ws := newCmd(DirOut, 512, 0)
	ws.Data[0][7] = 1
	unmap := newCmd(DirOut, 0, 0)
	setData(unmap, unmapList(desc{0, 8}, desc{100, 8}), 0)
	cases := []struct {
		name string
		c    *Cmd
		cdb  []byte
		io   bool
	}{
		{"READ(10)", read, cdb10(opRead10, 0, 8, 8), true},
		{"WRITE(16)", write, cdb16(opWrite16, 0, 8, 8), true},
		{"INQUIRY", inq, inquiryCDB(false, 0, 255), false},
		{"INQUIRY VPD 0x83", inq, inquiryCDB(true, 0x83, 255), false},
		{"CHECK CONDITION", bad, cdb10(opRead10, 0, 999, 8), false},
		{"invalid opcode", bad, []byte{0xFF}, false},
		{"WRITE SAME(16)", ws, cdb16(opWriteSame16, 0, 0, 8), true},
		{"UNMAP", unmap, []byte{opUnmap, 0, 0, 0, 0, 0, 0, 0, 40, 0}, true},
		{"READ CAPACITY(16)", inq, rc16CDB(32), false},
		{"MODE SENSE(10)", inq, modeSense10(0x3F, 0, false, false, 255), false},
		{"REPORT LUNS", inq, reportLUNsCDB(0, 255), false},
	}
	for _, tc := range cases {
		setCDB(tc.c, tc.cdb...)
		n := testing.AllocsPerRun(200, func() {
			a := tg.Execute(0, tc.c)
			if (a == ActionIO) != tc.io {
				panic(tc.name + ": unexpected action")
			}
			if a == ActionIO {
				tc.c.IO.Err = nil
				if tc.name == "READ(10)" {
					tc.c.IO.Err = bdev.ErrIO // the error path must not allocate either
				}
				tc.c.CompleteIO()
			}
		})
		if n != 0 {
			t.Errorf("%s: %v allocations per command", tc.name, n)
		}
	}
}

func BenchmarkExecuteRead10(b *testing.B) {
	l := newTestLUN(512)
	c := newCmd(DirIn, 8*512, 0)
	setCDB(c, cdb10(opRead10, 0, 8, 8)...)
	b.ReportAllocs()
	for b.Loop() {
		if l.Execute(c) != ActionIO {
			b.Fatal("no IO")
		}
		c.CompleteIO()
	}
}

func TestPureImports(t *testing.T) {
	allowed := map[string]bool{
		"bytes": true, "encoding/binary": true, "encoding/hex": true, "errors": true, "fmt": true,
		"math": true, "math/bits": true, "slices": true, "vhost-target/bdev": true,
	}
	files, _ := filepath.Glob("*.go")
	fset := token.NewFileSet()
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		src, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		f, err := parser.ParseFile(fset, name, src, parser.ImportsOnly)
		if err != nil {
			t.Fatal(err)
		}
		for _, imp := range f.Imports {
			path, _ := strconv.Unquote(imp.Path.Value)
			if !allowed[path] {
				t.Errorf("%s imports %q: scsi is a pure core (no os, syscall, sync, time, unsafe)", name, path)
			}
		}
	}
}

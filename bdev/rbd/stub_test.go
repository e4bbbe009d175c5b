//go:build !rbd

package rbd

import (
	"errors"
	"strings"
	"testing"
)

// TestNotBuilt: a binary without the rbd bdev refuses an rbd config with an
// error that names the bdev and says how to get it.
func TestNotBuilt(t *testing.T) {
	if Available() {
		t.Fatal("Available in a build without the rbd tag")
	}
	_, err := Open(Config{Name: "r0", Pool: "rbd", Image: "img"})
	if !errors.Is(err, ErrNotBuilt) || !strings.Contains(err.Error(), `bdev "r0"`) || !strings.Contains(err.Error(), "librbd-dev") {
		t.Fatalf("err = %v", err)
	}
}

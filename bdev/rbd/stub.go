//go:build !rbd

package rbd

import (
	"fmt"

	"vhost-target/bdev"
)

// Available reports whether this binary has the rbd bdev.
func Available() bool { return false }

// Disk is an rbd bdev; in this build none can be opened.
type Disk struct{}

// Open fails: this binary was built without librbd.
func Open(c Config) (*Disk, error) {
	return nil, fmt.Errorf("bdev %q: %w", c.Name, ErrNotBuilt)
}

// Info is never called: no Disk exists in this build.
func (d *Disk) Info() *bdev.Info { return nil }

// Open is never called: no Disk exists in this build.
func (d *Disk) Open() (bdev.Channel, error) { return nil, ErrNotBuilt }

// Close is never called: no Disk exists in this build.
func (d *Disk) Close() error { return nil }

var _ bdev.Bdev = (*Disk)(nil)

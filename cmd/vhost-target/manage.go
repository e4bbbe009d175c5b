package main

// Runtime management: every change to the running target (an RPC method, a
// SIGHUP reload) is made the same way. The running configuration is cloned,
// the change is made to the clone, the clone is checked whole by
// config.Validate (so the API refuses exactly what a file would, with the
// same messages), and only then are the objects changed and the clone
// becomes the running configuration, which save_config writes out.
// Changes are serialised by target.mu; the data path never takes it.

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"vhost-target/bdev"
	"vhost-target/bdev/rbd"
	"vhost-target/config"
	"vhost-target/vhost"
)

// Error codes of management errors, as SPDK's RPC server uses them (a
// negative errno), so that orchestration written for SPDK can tell "already
// exists" from "no such device" from "busy".
const (
	codeInvalidParams = -32602
	codeENOENT        = -int(unix.ENOENT)
	codeEIO           = -int(unix.EIO)
	codeEEXIST        = -int(unix.EEXIST)
	codeENODEV        = -int(unix.ENODEV)
	codeEBUSY         = -int(unix.EBUSY)
	codeEINVAL        = -int(unix.EINVAL)
	codeENOTSUP       = -int(unix.EOPNOTSUPP)
)

// mgmtError is a refused or failed management change: Code for the RPC
// reply (see above), Msg for people.
type mgmtError struct {
	Code int
	Msg  string
}

func (e *mgmtError) Error() string { return e.Msg }

func errf(code int, format string, a ...any) error {
	return &mgmtError{Code: code, Msg: fmt.Sprintf(format, a...)}
}

// errnoCode maps an error from opening or changing a bdev to an errno code.
func errnoCode(err error) int {
	if errors.Is(err, rbd.ErrNotBuilt) {
		return codeENOTSUP
	}
	var en unix.Errno
	if errors.As(err, &en) {
		return -int(en)
	}
	if errors.Is(err, os.ErrNotExist) {
		return codeENOENT
	}
	return codeEIO
}

// validate checks a changed clone of the running configuration. The error
// lists every problem, each naming the key as a file error would, with
// "rpc" (or the reloaded file) as the source.
func validate(c *config.Config, source string) error {
	c.SetSource(source)
	if err := c.Validate(); err != nil {
		return &mgmtError{Code: codeInvalidParams, Msg: err.Error()}
	}
	return nil
}

// usersOf names what uses bdev name in c: LUNs, blk controllers and error
// bdevs built on it.
func usersOf(c *config.Config, name string) []string {
	var users []string
	for i := range c.Controllers {
		ctrl := &c.Controllers[i]
		if ctrl.Type == config.ControllerBlk && ctrl.Bdev == name {
			users = append(users, fmt.Sprintf("blk controller %q", ctrl.Name))
		}
		for _, l := range ctrl.LUNs {
			if l.Bdev == name {
				users = append(users, fmt.Sprintf("controller %q target %d lun %d", ctrl.Name, l.Target, l.LUN))
			}
		}
	}
	for i := range c.Bdevs {
		if c.Bdevs[i].Type == config.TypeError && c.Bdevs[i].Base == name {
			users = append(users, fmt.Sprintf("error bdev %q", c.Bdevs[i].Name))
		}
	}
	return users
}

// addBdev validates and opens a new bdev and makes it part of the running
// configuration.
func (t *target) addBdev(b config.Bdev, source string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.addBdevLocked(b, source)
}

func (t *target) addBdevLocked(b config.Bdev, source string) error {
	if t.cfg.Bdev(b.Name) != nil {
		return errf(codeEEXIST, "bdev %q already exists", b.Name)
	}
	next := t.cfg.Clone()
	next.Bdevs = append(next.Bdevs, b)
	if err := validate(next, source); err != nil {
		return err
	}
	d, err := openBdev(&next.Bdevs[len(next.Bdevs)-1], t.bdevs, t.log)
	if err != nil {
		msg, prefix := err.Error(), fmt.Sprintf("bdev %q: ", b.Name)
		if !strings.HasPrefix(msg, prefix) { // most bdev packages name the bdev themselves
			msg = prefix + msg
		}
		return errf(errnoCode(err), "%s", msg)
	}
	t.bdevs[b.Name] = d
	t.cfg = next
	t.log.Info("bdev created", "bdev", b.Name, "type", b.Type, "size", d.Info().NumBlocks*uint64(d.Info().BlockSize),
		"block_size", d.Info().BlockSize, "source", source)
	if w, ok := d.(bdev.CapacityWatcher); ok {
		name := b.Name
		if err := w.WatchCapacity(func() { t.capacityNotified(name, d) }); err != nil {
			t.log.Warn("the bdev's size changes will not be noticed: rescan it by hand", "bdev", name, "err", err)
		}
	}
	return nil
}

// capacityNotified rescans bdev name after its backing store said its size
// changed (bdev.CapacityWatcher: `rbd resize` by another client), so the
// guests learn of it as after bdev_rbd_rescan. d is the bdev the watch was
// set on: a notice that arrives after it was deleted (or replaced under its
// name) is dropped.
func (t *target) capacityNotified(name string, d bdev.Bdev) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.bdevs[name] != d {
		return
	}
	if err := t.rescanBdevLocked(name, ""); err != nil {
		t.log.Warn("bdev size change noticed but not applied", "bdev", name, "err", err)
	}
}

// deleteBdev closes a bdev nothing uses. typ, if not "", must be its type
// (bdev_malloc_delete does not delete an aio bdev).
func (t *target) deleteBdev(name, typ string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	b := t.cfg.Bdev(name)
	if b == nil || typ != "" && b.Type != typ {
		return errf(codeENODEV, "bdev %q does not exist", name)
	}
	if users := usersOf(t.cfg, name); len(users) > 0 {
		return errf(codeEBUSY, "bdev %q is in use by %s; remove that first", name, strings.Join(users, ", "))
	}
	return t.deleteBdevLocked(name, "rpc")
}

func (t *target) deleteBdevLocked(name, source string) error {
	next := t.cfg.Clone()
	next.Bdevs = slices.DeleteFunc(next.Bdevs, func(b config.Bdev) bool { return b.Name == name })
	if err := validate(next, source); err != nil {
		return err
	}
	d := t.bdevs[name]
	delete(t.bdevs, name)
	t.cfg = next
	if err := d.Close(); err != nil {
		t.log.Warn("closing bdev", "bdev", name, "err", err)
	}
	t.log.Info("bdev deleted", "bdev", name, "source", source)
	return nil
}

// resizeBdev sets a bdev's size in bytes (bdev_resize), then tells every
// controller serving it, which raises UNIT ATTENTION 2A/09 and the virtio
// PARAM_CHANGE event for the guests of a scsi controller, and a config
// change notification for those of a blk controller.
func (t *target) resizeBdev(name string, size uint64) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.resizeBdevLocked(name, size, "rpc")
}

func (t *target) resizeBdevLocked(name string, size uint64, source string) error {
	b := t.cfg.Bdev(name)
	if b == nil {
		return errf(codeENODEV, "bdev %q does not exist", name)
	}
	d := t.bdevs[name]
	r, ok := d.(bdev.Resizer)
	if !ok {
		return errf(codeENOTSUP, "bdev %q (type %s) cannot be resized", name, b.Type)
	}
	next := t.cfg.Clone()
	nb := next.Bdev(name)
	old := d.Info().NumBlocks * uint64(d.Info().BlockSize)
	// A size given in the configuration follows the resize; "the backing
	// file's size" (0) stays so after a grow (the file grew), but a shrink
	// leaves the file as it was, so the served size must be recorded.
	// An rbd bdev has no size key: it serves its image, whatever the size.
	if b.Type != config.TypeRBD && (nb.Size != 0 || b.Type == config.TypeMalloc || size < old) {
		nb.Size = size
	}
	if err := validate(next, source); err != nil {
		return err
	}
	if size%uint64(d.Info().BlockSize) != 0 {
		return errf(codeInvalidParams, "bdev %q: new size %d is not a multiple of the block size %d", name, size, d.Info().BlockSize)
	}
	if err := r.Resize(size); err != nil {
		code := errnoCode(err)
		if errors.Is(err, bdev.ErrInUse) {
			code = codeEBUSY // a shrink is refused while the bdev is open
		}
		return errf(code, "bdev %q: resize: %v", name, err)
	}
	t.cfg = next
	t.log.Info("bdev resized", "bdev", name, "old_size", old, "new_size", size, "source", source)
	return t.capacityChangedLocked(name)
}

// rescanBdev re-reads a file-backed bdev's size (bdev_aio_rescan).
func (t *target) rescanBdev(name, typ string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.rescanBdevLocked(name, typ)
}

func (t *target) rescanBdevLocked(name, typ string) error {
	b := t.cfg.Bdev(name)
	if b == nil || typ != "" && b.Type != typ {
		return errf(codeENODEV, "bdev %q does not exist", name)
	}
	r, ok := t.bdevs[name].(bdev.Rescanner)
	if !ok {
		return errf(codeENOTSUP, "bdev %q (type %s) cannot be rescanned", name, b.Type)
	}
	old := t.bdevs[name].Info().NumBlocks
	changed, err := r.Rescan()
	if err != nil {
		return errf(errnoCode(err), "bdev %q: rescan: %v", name, err)
	}
	if !changed {
		return nil
	}
	info := t.bdevs[name].Info()
	t.log.Info("bdev size changed on rescan", "bdev", name, "old_blocks", old, "new_blocks", info.NumBlocks)
	if b.Size != 0 {
		// A size given in the file or at creation follows the backing store.
		next := t.cfg.Clone()
		next.Bdev(name).Size = info.NumBlocks * uint64(info.BlockSize)
		t.cfg = next
	}
	return t.capacityChangedLocked(name)
}

// capacityChangedLocked tells every controller serving bdev name, or an
// error bdev built over it (by a LUN or as a blk controller's disk), that
// its capacity changed.
func (t *target) capacityChangedLocked(name string) error {
	names := []string{name}
	for i := range t.cfg.Bdevs {
		if t.cfg.Bdevs[i].Type == config.TypeError && t.cfg.Bdevs[i].Base == name {
			names = append(names, t.cfg.Bdevs[i].Name)
		}
	}
	var errs []error
	for i := range t.cfg.Controllers {
		ctrl := &t.cfg.Controllers[i]
		if ctrl.Type == config.ControllerBlk && slices.Contains(names, ctrl.Bdev) {
			if err := t.ctrls[ctrl.Name].CapacityChanged(t.bdevs[ctrl.Bdev]); err != nil {
				errs = append(errs, fmt.Errorf("controller %q: %w", ctrl.Name, err))
			}
		}
		for _, l := range ctrl.LUNs {
			if slices.Contains(names, l.Bdev) {
				if err := t.ctrls[ctrl.Name].CapacityChanged(t.bdevs[l.Bdev]); err != nil {
					errs = append(errs, fmt.Errorf("controller %q: %w", ctrl.Name, err))
				}
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return errf(codeEIO, "%v", err)
	}
	return nil
}

// addController validates, creates and starts listening on a new controller
// (its LUNs, if any, are added too; a blk controller opens its disk).
func (t *target) addController(cc config.Controller, source string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.addControllerLocked(cc, source)
}

func (t *target) addControllerLocked(cc config.Controller, source string) error {
	if t.cfg.Controller(cc.Name) != nil {
		return errf(codeEEXIST, "controller %q already exists", cc.Name)
	}
	if cc.Type == config.ControllerBlk && cc.Bdev != "" {
		// As for a LUN added at runtime (addLUNLocked): the codes say "no
		// such bdev" and "in use" rather than "invalid parameters".
		if t.cfg.Bdev(cc.Bdev) == nil {
			return errf(codeENODEV, "bdev %q does not exist", cc.Bdev)
		}
		if users := usersOf(t.cfg, cc.Bdev); len(users) > 0 {
			return errf(codeEBUSY, "bdev %q is already used by %s", cc.Bdev, strings.Join(users, ", "))
		}
	}
	next := t.cfg.Clone()
	next.Controllers = append(next.Controllers, cc)
	if err := validate(next, source); err != nil {
		return err
	}
	c, err := t.newController(next, &next.Controllers[len(next.Controllers)-1])
	if err != nil {
		return errf(errnoCode(err), "%v", err)
	}
	t.ctrls[cc.Name] = c
	t.cfg = next
	t.publishControllers()
	return nil
}

// deleteController closes a controller. One with a connected front-end is
// refused unless force is set (SPDK refuses too): closing it takes the disks
// away from a running VM.
func (t *target) deleteController(name string, force bool, source string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	c := t.ctrls[name]
	if c == nil {
		return errf(codeENODEV, "controller %q does not exist", name)
	}
	if n := c.Sessions(); n > 0 && !force {
		return errf(codeEBUSY, "controller %q has %d connected front-end(s); stop the VM first or pass force=true", name, n)
	}
	return t.deleteControllerLocked(name, source)
}

func (t *target) deleteControllerLocked(name, source string) error {
	c := t.ctrls[name]
	next := t.cfg.Clone()
	next.Controllers = slices.DeleteFunc(next.Controllers, func(cc config.Controller) bool { return cc.Name == name })
	if err := validate(next, source); err != nil {
		return err
	}
	n := c.Sessions()
	// Close drains every session's in-flight I/O before it returns.
	if err := c.Close(); err != nil {
		t.log.Warn("closing controller", "controller", name, "err", err)
	}
	delete(t.ctrls, name)
	t.cfg = next
	t.publishControllers()
	t.log.Info("controller deleted", "controller", name, "sessions_closed", n, "source", source)
	return nil
}

// addLUN places bdev at (target, lun) of a controller; a connected guest
// is told (RESCAN event).
func (t *target) addLUN(ctrl string, l config.LUN, source string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.addLUNLocked(ctrl, l, source)
}

// scsiControllerLocked returns the running scsi controller called name; a
// blk controller has no targets or LUNs to change.
func (t *target) scsiControllerLocked(name string) (*vhost.Controller, error) {
	c := t.ctrls[name]
	if c == nil {
		return nil, errf(codeENODEV, "controller %q does not exist", name)
	}
	if cc := t.cfg.Controller(name); cc.Type != config.ControllerSCSI {
		return nil, errf(codeEINVAL, "controller %q is a %s controller: it serves one bdev (%q) and has no SCSI targets or LUNs",
			name, cc.Type, cc.Bdev)
	}
	return c, nil
}

func (t *target) addLUNLocked(ctrl string, l config.LUN, source string) error {
	c, err := t.scsiControllerLocked(ctrl)
	if err != nil {
		return err
	}
	if t.cfg.Bdev(l.Bdev) == nil {
		return errf(codeENODEV, "bdev %q does not exist", l.Bdev)
	}
	next := t.cfg.Clone()
	cc := next.Controller(ctrl)
	for _, o := range cc.LUNs {
		if o.Target == l.Target && o.LUN == l.LUN {
			return errf(codeEEXIST, "controller %q: target %d lun %d is already bdev %q", ctrl, l.Target, l.LUN, o.Bdev)
		}
	}
	if users := usersOf(next, l.Bdev); len(users) > 0 {
		return errf(codeEBUSY, "bdev %q is already used by %s", l.Bdev, strings.Join(users, ", "))
	}
	cc.LUNs = append(cc.LUNs, l)
	if err := validate(next, source); err != nil {
		return err
	}
	if err := c.AddLUN(vhost.LUNSpec{Target: l.Target, LUN: l.LUN, Bdev: t.bdevs[l.Bdev]}); err != nil {
		return errf(codeEIO, "controller %q: %v", ctrl, err)
	}
	t.cfg = next // the controller logs the addition
	return nil
}

// removeLUNs removes the LUNs of a controller's target that match lun (all
// of the target's when lun < 0). It returns once their in-flight I/O has
// completed; the guests get REMOVED events.
func (t *target) removeLUNs(ctrl string, target uint8, lun int, source string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.removeLUNsLocked(ctrl, target, lun, source)
}

func (t *target) removeLUNsLocked(ctrl string, target uint8, lun int, source string) error {
	c, err := t.scsiControllerLocked(ctrl)
	if err != nil {
		return err
	}
	cc := t.cfg.Controller(ctrl)
	var gone []config.LUN
	for _, l := range cc.LUNs {
		if l.Target == target && (lun < 0 || int(l.LUN) == lun) {
			gone = append(gone, l)
		}
	}
	if len(gone) == 0 {
		if lun < 0 {
			return errf(codeENODEV, "controller %q has no target %d", ctrl, target)
		}
		return errf(codeENODEV, "controller %q has no target %d lun %d", ctrl, target, lun)
	}
	for _, l := range gone {
		if err := c.RemoveLUN(l.Target, l.LUN); err != nil {
			return errf(codeEIO, "controller %q: %v", ctrl, err)
		}
		next := t.cfg.Clone()
		ncc := next.Controller(ctrl)
		ncc.LUNs = slices.DeleteFunc(ncc.LUNs, func(o config.LUN) bool { return o == l })
		t.cfg = next // the controller logs the removal
	}
	return nil
}

// publishControllers makes the current controllers visible to /metrics
// without the management lock (a scrape must not wait for a drain).
func (t *target) publishControllers() {
	list := make([]*vhost.Controller, 0, len(t.ctrls))
	for i := range t.cfg.Controllers {
		if c := t.ctrls[t.cfg.Controllers[i].Name]; c != nil {
			list = append(list, c)
		}
	}
	t.view.Store(&list)
}

// controllers returns the running controllers in configuration order.
func (t *target) controllers() []*vhost.Controller {
	if p := t.view.Load(); p != nil {
		return *p
	}
	return nil
}

// controller returns the named running controller, or nil.
func (t *target) controller(name string) *vhost.Controller {
	for _, c := range t.controllers() {
		if c.Name() == name {
			return c
		}
	}
	return nil
}

// bdev returns the named open bdev, or nil.
func (t *target) bdev(name string) bdev.Bdev {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.bdevs[name]
}

// runningConfig returns a copy of the running configuration.
func (t *target) runningConfig() *config.Config {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.cfg.Clone()
}

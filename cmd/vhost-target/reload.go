package main

import (
	"fmt"
	"reflect"
	"slices"
	"strings"

	"vhost-target/bdev"
	"vhost-target/config"
)

// reload re-reads the configuration file and applies the difference to the
// running target through the same steps as the runtime API (SIGHUP and the
// framework_reload method). It returns the changes made, one line each.
//
// A file that does not validate, or that changes what only a restart can
// change (socket_dir, [reactors], [metrics], [rpc]), or that would have to
// recreate a controller a front-end is connected to, is refused whole:
// nothing changes and the target keeps serving. New bdevs are opened before
// anything is removed, so the usual runtime failure (a missing file) also
// refuses the file whole; a failure after that point (rare: reopening a
// changed bdev) stops the reload there, and the error says what was applied.
func (t *target) reload(why string) ([]string, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.cfgPath == "" {
		return nil, errf(codeEINVAL, "the target was started on the built-in default (no -c): there is no file to reload")
	}
	next, err := config.Load(t.cfgPath)
	if err != nil {
		return nil, &mgmtError{Code: codeInvalidParams, Msg: err.Error()}
	}
	src := t.cfgPath
	cur := t.cfg
	var fixed []string
	if next.SocketDir != cur.SocketDir {
		fixed = append(fixed, "socket_dir")
	}
	if !reflect.DeepEqual(next.Reactors, cur.Reactors) {
		fixed = append(fixed, "[reactors]")
	}
	if next.Metrics != cur.Metrics {
		fixed = append(fixed, "[metrics]")
	}
	if next.RPC != cur.RPC {
		fixed = append(fixed, "[rpc]")
	}
	if len(fixed) > 0 {
		return nil, errf(codeEINVAL, "%s: %s changed: that takes a restart; nothing was changed", src, strings.Join(fixed, ", "))
	}

	// Bdevs: kept when equal; resized when only the size changed and the
	// bdev can be resized; otherwise replaced (closed and opened again),
	// which is refused while the bdev backs a LUN: that would swap a disk
	// under a running guest. Error bdevs over a replaced base are replaced
	// with it: they wrap the old object.
	replaced := map[string]bool{}
	resize := map[string]uint64{}
	for _, nb := range next.Bdevs {
		ob := cur.Bdev(nb.Name)
		if ob == nil || reflect.DeepEqual(*ob, nb) {
			continue
		}
		sized := *ob
		sized.Size = nb.Size
		if _, ok := t.bdevs[nb.Name].(bdev.Resizer); ok && reflect.DeepEqual(sized, nb) && nb.Size != 0 {
			resize[nb.Name] = nb.Size
			continue
		}
		if users := usersOf(cur, nb.Name); len(users) > 0 {
			return nil, errf(codeEBUSY, "%s: bdev %q: settings changed while it is used by %s: remove those first (nothing was changed)",
				src, nb.Name, strings.Join(users, ", "))
		}
		replaced[nb.Name] = true
	}
	for changed := true; changed; {
		changed = false
		for _, nb := range next.Bdevs {
			if nb.Type == config.TypeError && replaced[nb.Base] && cur.Bdev(nb.Name) != nil && !replaced[nb.Name] {
				replaced[nb.Name], changed = true, true
			}
		}
	}
	removedBdev := func(name string) bool { return next.Bdev(name) == nil || replaced[name] }

	// Controllers: kept (LUNs diffed), or replaced when a setting other than
	// the LUNs changed, which needs it closed: refused while a VM uses it.
	replacedCtrl := map[string]bool{}
	for i := range next.Controllers {
		nc := next.Controllers[i]
		oc := cur.Controller(nc.Name)
		if oc == nil {
			continue
		}
		a, b := *oc, nc
		a.LUNs, b.LUNs = nil, nil
		if !reflect.DeepEqual(a, b) {
			if n := t.ctrls[nc.Name].Sessions(); n > 0 {
				return nil, errf(codeEBUSY, "%s: controller %q: settings changed while %d front-end(s) are connected: that needs the controller closed; stop the VM first (nothing was changed)", src, nc.Name, n)
			}
			replacedCtrl[nc.Name] = true
		}
	}
	for i := range cur.Controllers {
		name := cur.Controllers[i].Name
		if next.Controller(name) == nil {
			if n := t.ctrls[name].Sessions(); n > 0 {
				return nil, errf(codeEBUSY, "%s: controller %q is gone from the file but %d front-end(s) are connected: stop the VM first (nothing was changed)", src, name, n)
			}
		}
	}
	var done []string
	fail := func(err error) ([]string, error) {
		if len(done) == 0 {
			return nil, err
		}
		return done, errf(codeEIO, "%s: reload stopped after %d change(s) (%s): %v; save_config shows the running configuration",
			src, len(done), strings.Join(done, "; "), err)
	}

	// 1. New bdevs that depend on nothing being replaced: a failure here
	// undoes them and refuses the file whole.
	var early []string
	for _, nb := range next.Bdevs {
		if cur.Bdev(nb.Name) != nil || nb.Type == config.TypeError && (replaced[nb.Base] || t.cfg.Bdev(nb.Base) == nil) {
			continue
		}
		if err := t.addBdevLocked(nb, src); err != nil {
			for i := len(early) - 1; i >= 0; i-- {
				t.deleteBdevLocked(early[i], src)
			}
			return nil, err
		}
		early = append(early, nb.Name)
	}
	for _, n := range early {
		done = append(done, fmt.Sprintf("bdev %q added", n))
	}

	// 2. LUNs of kept controllers that go away or whose bdev is replaced.
	for i := range cur.Controllers {
		oc := cur.Controllers[i]
		nc := next.Controller(oc.Name)
		if nc == nil || replacedCtrl[oc.Name] {
			continue
		}
		for _, l := range oc.LUNs {
			if slices.Contains(nc.LUNs, l) && !removedBdev(l.Bdev) {
				continue
			}
			if err := t.removeLUNsLocked(oc.Name, l.Target, int(l.LUN), src); err != nil {
				return fail(err)
			}
			done = append(done, fmt.Sprintf("controller %q target %d lun %d removed", oc.Name, l.Target, l.LUN))
		}
	}
	// 3. Controllers removed or replaced (refused above if connected).
	for i := len(cur.Controllers) - 1; i >= 0; i-- {
		name := cur.Controllers[i].Name
		if next.Controller(name) == nil || replacedCtrl[name] {
			if err := t.deleteControllerLocked(name, src); err != nil {
				return fail(err)
			}
			done = append(done, fmt.Sprintf("controller %q deleted", name))
		}
	}
	// 4. Bdevs removed or replaced, error bdevs before their bases.
	for i := len(cur.Bdevs) - 1; i >= 0; i-- {
		name := cur.Bdevs[i].Name
		if removedBdev(name) {
			if err := t.deleteBdevLocked(name, src); err != nil {
				return fail(err)
			}
			if !replaced[name] {
				done = append(done, fmt.Sprintf("bdev %q deleted", name))
			}
		}
	}
	// 5. Replaced bdevs and the remaining new ones, in file order.
	for _, nb := range next.Bdevs {
		if t.cfg.Bdev(nb.Name) != nil {
			continue
		}
		if err := t.addBdevLocked(nb, src); err != nil {
			return fail(err)
		}
		if replaced[nb.Name] {
			done = append(done, fmt.Sprintf("bdev %q changed", nb.Name))
		} else {
			done = append(done, fmt.Sprintf("bdev %q added", nb.Name))
		}
	}
	// 6. New and replaced controllers, with their LUNs.
	for _, nc := range next.Controllers {
		if t.cfg.Controller(nc.Name) != nil {
			continue
		}
		if err := t.addControllerLocked(nc, src); err != nil {
			return fail(err)
		}
		if replacedCtrl[nc.Name] {
			done = append(done, fmt.Sprintf("controller %q changed", nc.Name))
		} else {
			done = append(done, fmt.Sprintf("controller %q added", nc.Name))
		}
	}
	// 7. New LUNs of kept controllers (the guests see RESCAN events).
	for _, nc := range next.Controllers {
		rc := t.cfg.Controller(nc.Name)
		for _, l := range nc.LUNs {
			if slices.Contains(rc.LUNs, l) {
				continue
			}
			if err := t.addLUNLocked(nc.Name, l, src); err != nil {
				return fail(err)
			}
			done = append(done, fmt.Sprintf("controller %q target %d lun %d added (bdev %q)", nc.Name, l.Target, l.LUN, l.Bdev))
		}
	}
	// 8. Size changes.
	for _, nb := range next.Bdevs {
		if size, ok := resize[nb.Name]; ok {
			if err := t.resizeBdevLocked(nb.Name, size, src); err != nil {
				return fail(err)
			}
			done = append(done, fmt.Sprintf("bdev %q resized to %d bytes", nb.Name, size))
		}
	}
	// The running configuration now equals the file, entry order aside;
	// take the file's order so save_config writes what the user wrote.
	next.SetSource(t.cfg.Source())
	t.cfg = next
	t.publishControllers()
	if len(done) == 0 {
		t.log.Info("configuration reloaded: no changes", "file", src, "trigger", why)
	} else {
		t.log.Info("configuration reloaded", "file", src, "trigger", why, "changes", strings.Join(done, "; "))
	}
	return done, nil
}

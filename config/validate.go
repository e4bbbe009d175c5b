package config

import (
	"fmt"
	"net"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Validate checks c and returns every problem found, one per line, each
// naming the key path and entry. It does not fill defaults (Parse did that);
// a Config built by hand must set every field, starting from Default() is
// easiest. It looks up socket owners and groups and reads the process's CPU
// affinity, so its result depends on the machine it runs on.
func (c *Config) Validate() error {
	source := c.source
	if source == "" {
		source = "config"
	}
	errs := newErrorList(source)
	c.validate(errs)
	return errs.err()
}

func (c *Config) validate(errs *errorList) {
	if !filepath.IsAbs(c.SocketDir) {
		errs.addf("socket_dir", "%q is not an absolute path", c.SocketDir)
	} else if strings.IndexByte(c.SocketDir, 0) >= 0 {
		errs.addf("socket_dir", "contains a NUL byte")
	}
	if c.Metrics.Listen != "" {
		if err := checkListen(c.Metrics.Listen); err != nil {
			errs.addf("metrics.listen", "%v", err)
		}
	}
	c.validateRPC(errs)
	allowed := allowedCPUs()
	if len(c.Reactors.CPUs) == 0 {
		errs.addf("reactors.cpus", "must list at least one CPU")
	}
	for i, cpu := range c.Reactors.CPUs {
		key := "reactors.cpus[" + strconv.Itoa(i) + "]"
		if !slices.Contains(allowed, cpu) {
			errs.addf(key, "CPU %d is not one this process may run on (allowed: %s)", cpu, formatCPUs(allowed))
		} else if j := slices.Index(c.Reactors.CPUs, cpu); j < i {
			errs.addf(key, "CPU %d is listed twice", cpu)
		}
	}
	switch c.Reactors.Poll {
	case PollBusy, PollAdaptive:
	default:
		errs.addf("reactors.poll", "%q is not %q or %q", c.Reactors.Poll, PollBusy, PollAdaptive)
	}
	for i := range c.Bdevs {
		b := &c.Bdevs[i]
		e := errs.entry("bdev", i, b.Name)
		b.validate(e)
		for j := range i {
			if c.Bdevs[j].Name == b.Name && b.Name != "" {
				e.addf("name", "duplicate of bdev[%d]", j)
				break
			}
		}
		if b.Type == TypeError && b.Base != "" {
			switch j := slices.IndexFunc(c.Bdevs, func(o Bdev) bool { return o.Name == b.Base }); {
			case j < 0:
				e.addf("base", "bdev %q is not defined", b.Base)
			case j >= i:
				e.addf("base", "bdev %q must be defined before this entry", b.Base)
			}
		}
		for j := range i {
			// Equal names already give equal derived UUIDs; say it once.
			if c.Bdevs[j].UUID == b.UUID && b.UUID != ([16]byte{}) && c.Bdevs[j].Name != b.Name {
				e.addf("uuid", "%s is also the UUID of bdev[%d] %q", FormatUUID(b.UUID), j, c.Bdevs[j].Name)
				break
			}
		}
	}
	// usedBy maps a bdev name to the first controller serving it, by a LUN or
	// as a blk controller's disk; one bdev behind two would let two guests
	// (or one guest through two paths) corrupt it.
	type diskRef struct{ ctrl, lun int } // lun -1: a blk controller's bdev
	usedBy := map[string]diskRef{}
	claim := func(e *errorList, key, name string, ref diskRef) {
		prev, ok := usedBy[name]
		if !ok {
			usedBy[name] = ref
			return
		}
		by := fmt.Sprintf("controller[%d] %q", prev.ctrl, c.Controllers[prev.ctrl].Name)
		if prev.lun >= 0 {
			by += " lun[" + strconv.Itoa(prev.lun) + "]"
		}
		e.addf(key, "bdev %q is already used by %s", name, by)
	}
	for i := range c.Controllers {
		ctrl := &c.Controllers[i]
		e := errs.entry("controller", i, ctrl.Name)
		c.validateController(ctrl, e)
		for j := range i {
			if c.Controllers[j].Name == ctrl.Name && ctrl.Name != "" {
				e.addf("name", "duplicate of controller[%d]", j)
				break
			}
		}
		if ctrl.Type == ControllerBlk {
			switch {
			case ctrl.Bdev == "":
				e.addf("bdev", "required for type %q: the name of the bdev it serves", ctrl.Type)
			case c.Bdev(ctrl.Bdev) == nil:
				e.addf("bdev", "bdev %q is not defined", ctrl.Bdev)
			default:
				claim(e, "bdev", ctrl.Bdev, diskRef{i, -1})
			}
			continue // LUNs are reported by validateController
		}
		for j, l := range ctrl.LUNs {
			key := "lun[" + strconv.Itoa(j) + "]"
			switch {
			case l.Bdev == "":
				e.addf(key+".bdev", "required")
			case c.Bdev(l.Bdev) == nil:
				e.addf(key+".bdev", "bdev %q is not defined", l.Bdev)
			default:
				claim(e, key+".bdev", l.Bdev, diskRef{i, j})
			}
		}
	}
}

func (b *Bdev) validate(e *errorList) {
	checkName(e, b.Name)
	fileBacked := b.Type == TypeFile || b.Type == TypeAIO
	switch b.Type {
	case "":
		e.addf("type", "required: %q, %q, %q, %q or %q", TypeMalloc, TypeFile, TypeAIO, TypeError, TypeRBD)
	case TypeMalloc, TypeFile, TypeAIO, TypeError, TypeRBD:
	default:
		e.addf("type", "%q is not %q, %q, %q, %q or %q", b.Type, TypeMalloc, TypeFile, TypeAIO, TypeError, TypeRBD)
	}
	if b.Type == TypeRBD {
		notFor(e, "size", b.Size != 0, b.Type) // the image's size is served
	}
	if b.Type == TypeError {
		notFor(e, "size", b.Size != 0, b.Type)
		notFor(e, "block_size", b.BlockSize != 0, b.Type)
	} else if b.BlockSize != 512 && b.BlockSize != 4096 {
		e.addf("block_size", "%d is not 512 or 4096", b.BlockSize)
	} else if b.Size%uint64(b.BlockSize) != 0 {
		e.addf("size", "%d bytes is not a multiple of the block size %d", b.Size, b.BlockSize)
	}
	switch {
	case b.Size != 0:
	case b.Type == TypeMalloc:
		e.addf("size", "required for type %q", b.Type)
	case fileBacked && b.Create:
		e.addf("size", "required with create = true")
	}
	if fileBacked {
		if b.Path == "" {
			e.addf("path", "required for type %q", b.Type)
		} else if !filepath.IsAbs(b.Path) {
			e.addf("path", "%q is not an absolute path", b.Path)
		}
		if b.Create && b.ReadOnly {
			e.addf("create", "create = true with read_only = true would serve an empty disk")
		}
		if b.QueueDepth < 1 || b.QueueDepth > QueueDepthMax {
			e.addf("queue_depth", "%d is out of range 1..%d", b.QueueDepth, QueueDepthMax)
		}
	} else if b.Type == TypeMalloc || b.Type == TypeError {
		notFor(e, "path", b.Path != "", b.Type)
		notFor(e, "create", b.Create, b.Type)
		notFor(e, "read_only", b.ReadOnly, b.Type)
		notFor(e, "queue_depth", b.QueueDepth != 0, b.Type)
	}
	if b.Type == TypeRBD {
		b.validateRBD(e)
	} else {
		notFor(e, "pool", b.Pool != "", b.Type)
		notFor(e, "image", b.Image != "", b.Type)
		notFor(e, "namespace", b.Namespace != "", b.Type)
		notFor(e, "conf", b.Conf != "", b.Type)
		notFor(e, "user", b.User != "", b.Type)
		notFor(e, "keyring", b.Keyring != "", b.Type)
		notFor(e, "op_timeout", b.OpTimeout != 0, b.Type)
	}
	if b.Type == TypeFile {
		if b.Workers < 1 || b.Workers > WorkersMax {
			e.addf("workers", "%d is out of range 1..%d", b.Workers, WorkersMax)
		}
	} else {
		notFor(e, "workers", b.Workers != 0, b.Type)
	}
	if b.Type == TypeAIO {
		switch b.Engine {
		case EngineAuto, EngineURing, EngineLibaio:
		default:
			e.addf("engine", "%q is not %q, %q or %q", b.Engine, EngineAuto, EngineURing, EngineLibaio)
		}
	} else {
		notFor(e, "engine", b.Engine != "", b.Type)
	}
	if b.Type == TypeMalloc {
		switch b.Hugepages {
		case HugepagesAuto, HugepagesHugeTLB, HugepagesTHP, HugepagesNone:
		default:
			e.addf("hugepages", "%q is not %q, %q, %q or %q", b.Hugepages,
				HugepagesAuto, HugepagesHugeTLB, HugepagesTHP, HugepagesNone)
		}
	} else {
		notFor(e, "hugepages", b.Hugepages != "", b.Type)
	}
	if b.Type == TypeError {
		if b.Base == "" {
			e.addf("base", "required for type %q", b.Type)
		}
		for j := range b.Inject {
			b.Inject[j].validate(e, "inject["+strconv.Itoa(j)+"]")
		}
	} else {
		notFor(e, "base", b.Base != "", b.Type)
		notFor(e, "inject", len(b.Inject) != 0, b.Type)
	}
	if b.UUID == ([16]byte{}) {
		e.addf("uuid", "must not be all zeros")
	}
}

// validateRBD checks the keys of an rbd bdev. Whether the pool, image,
// files and user exist is known only when the bdev is opened.
func (b *Bdev) validateRBD(e *errorList) {
	notFor(e, "path", b.Path != "", b.Type)
	notFor(e, "create", b.Create, b.Type)
	// Every string reaches librados or librbd as a C string.
	for _, kv := range [][2]string{{"pool", b.Pool}, {"image", b.Image}, {"namespace", b.Namespace},
		{"conf", b.Conf}, {"user", b.User}, {"keyring", b.Keyring}} {
		if strings.IndexByte(kv[1], 0) >= 0 {
			e.addf(kv[0], "contains a NUL byte")
		}
	}
	if b.Pool == "" {
		e.addf("pool", "required for type %q: the Ceph pool holding the image", b.Type)
	}
	if b.Image == "" {
		e.addf("image", "required for type %q: the RBD image's name", b.Type)
	} else if strings.ContainsAny(b.Image, "/@") {
		e.addf("image", "%q contains '/' or '@': give the image's name alone (the pool and namespace are keys of their own; snapshots are not served)", b.Image)
	}
	if strings.Contains(b.Namespace, "/") {
		e.addf("namespace", "%q contains '/'", b.Namespace)
	}
	if b.Conf != "" && !filepath.IsAbs(b.Conf) {
		e.addf("conf", "%q is not an absolute path", b.Conf)
	}
	if b.Keyring != "" && !filepath.IsAbs(b.Keyring) {
		e.addf("keyring", "%q is not an absolute path", b.Keyring)
	}
	if strings.HasPrefix(b.User, "client.") {
		e.addf("user", "%q: give the client id without \"client.\" (%q)", b.User, strings.TrimPrefix(b.User, "client."))
	}
	if b.QueueDepth < 1 || b.QueueDepth > QueueDepthMax {
		e.addf("queue_depth", "%d is out of range 1..%d", b.QueueDepth, QueueDepthMax)
	}
	if b.OpTimeout < 0 {
		e.addf("op_timeout", "%v is negative; \"0s\" waits for ever", b.OpTimeout)
	}
}

func (in *Inject) validate(e *errorList, key string) {
	if !slices.Contains(InjectOps, in.Op) {
		e.addf(key+".op", "%q is not one of %s", in.Op, strings.Join(InjectOps, ", "))
	}
	if in.LBAStart+in.LBACount < in.LBAStart {
		e.addf(key+".lba_count", "lba_start + lba_count overflows")
	}
	if in.Error != "" && in.Error != InjectEIO {
		e.addf(key+".error", "%q is not %q", in.Error, InjectEIO)
	}
	if in.Delay < 0 || in.Delay > InjectDelayMax {
		e.addf(key+".delay", "%v is out of range 0..%v", in.Delay, InjectDelayMax)
	}
	if in.Error == "" && in.Delay == 0 {
		e.addf(key, "injects nothing: set error, delay or both")
	}
}

// notFor reports a key given to a bdev type that does not use it: silently
// ignoring it would hide a mistyped type.
func notFor(e *errorList, key string, set bool, typ string) {
	if set && typ != "" {
		e.addf(key, "not used by type %q", typ)
	}
}

func (c *Config) validateController(ctrl *Controller, e *errorList) {
	if checkName(e, ctrl.Name) && filepath.IsAbs(c.SocketDir) {
		if p := c.SocketPath(ctrl); len(p) > SocketPathMax {
			e.addf("name", "socket path %q is %d bytes, more than the %d a unix socket allows; shorten socket_dir or the name",
				p, len(p), SocketPathMax)
		}
	}
	if len(ctrl.CPUs) == 0 && len(c.Reactors.CPUs) > 0 {
		e.addf("cpus", "must list at least one CPU")
	}
	for i, cpu := range ctrl.CPUs {
		key := "cpus[" + strconv.Itoa(i) + "]"
		if !slices.Contains(c.Reactors.CPUs, cpu) {
			e.addf(key, "CPU %d has no reactor (reactors.cpus is %s)", cpu, formatCPUs(c.Reactors.CPUs))
		} else if j := slices.Index(ctrl.CPUs, cpu); j < i {
			e.addf(key, "CPU %d is listed twice", cpu)
		}
	}
	if ctrl.NumQueues < 1 || ctrl.NumQueues > NumQueuesMax {
		e.addf("num_queues", "%d is out of range 1..%d", ctrl.NumQueues, NumQueuesMax)
	}
	if ctrl.MaxSessions < 1 || ctrl.MaxSessions > MaxSessionsMax {
		e.addf("max_sessions", "%d is out of range 1..%d", ctrl.MaxSessions, MaxSessionsMax)
	}
	if ctrl.SocketMode > 0o777 {
		e.addf("socket_mode", "%#o has bits above 0777", ctrl.SocketMode)
	}
	if _, err := lookupID(ctrl.SocketOwner, false); err != nil {
		e.addf("socket_owner", "%v", err)
	}
	if _, err := lookupID(ctrl.SocketGroup, true); err != nil {
		e.addf("socket_group", "%v", err)
	}
	switch ctrl.Type {
	case ControllerSCSI:
		if ctrl.Bdev != "" {
			e.addf("bdev", "not used by type %q: its bdevs are [[controller.lun]] entries (type = %q serves one bdev)",
				ctrl.Type, ControllerBlk)
		}
		if ctrl.ReadOnly {
			e.addf("read_only", "not used by type %q: a LUN is read-only when its bdev is", ctrl.Type)
		}
	case ControllerBlk:
		if len(ctrl.LUNs) > 0 {
			e.addf("lun", "not used by type %q: a blk controller serves one bdev, named by key bdev", ctrl.Type)
		}
		return
	default:
		e.addf("type", "%q is not %q or %q", ctrl.Type, ControllerSCSI, ControllerBlk)
	}
	// A scsi controller without LUNs is valid, as in SPDK (vhost_create_scsi_controller
	// then vhost_scsi_controller_add_target): its guest sees an empty HBA
	// until LUNs are added at runtime.
	for j, l := range ctrl.LUNs {
		key := "lun[" + strconv.Itoa(j) + "]"
		if l.LUN > LUNMax {
			e.addf(key+".lun", "%d is out of range 0..%d", l.LUN, LUNMax)
		}
		if e.has(key+".target") || e.has(key+".lun") {
			continue // its address was not understood; comparing it would mislead
		}
		for k := range j {
			other := "lun[" + strconv.Itoa(k) + "]"
			if e.has(other+".target") || e.has(other+".lun") {
				continue
			}
			if ctrl.LUNs[k].Target == l.Target && ctrl.LUNs[k].LUN == l.LUN {
				e.addf(key, "target %d lun %d is also lun[%d]", l.Target, l.LUN, k)
				break
			}
		}
	}
}

func (c *Config) validateRPC(errs *errorList) {
	r := &c.RPC
	if r.Socket != "" {
		switch {
		case !filepath.IsAbs(r.Socket):
			errs.addf("rpc.socket", "%q is not an absolute path", r.Socket)
		case strings.IndexByte(r.Socket, 0) >= 0:
			errs.addf("rpc.socket", "contains a NUL byte")
		case len(r.Socket) > SocketPathMax:
			errs.addf("rpc.socket", "%q is %d bytes, more than the %d a unix socket allows", r.Socket, len(r.Socket), SocketPathMax)
		}
		for i := range c.Controllers {
			if filepath.IsAbs(c.SocketDir) && c.Controllers[i].Name != "" && filepath.Clean(r.Socket) == c.SocketPath(&c.Controllers[i]) {
				errs.addf("rpc.socket", "%q is also the socket of controller[%d] %q", r.Socket, i, c.Controllers[i].Name)
			}
		}
	}
	if r.SocketMode > 0o777 {
		errs.addf("rpc.socket_mode", "%#o has bits above 0777", r.SocketMode)
	}
	if _, err := lookupID(r.SocketOwner, false); err != nil {
		errs.addf("rpc.socket_owner", "%v", err)
	}
	if _, err := lookupID(r.SocketGroup, true); err != nil {
		errs.addf("rpc.socket_group", "%v", err)
	}
}

// SocketIDs resolves the RPC socket's owner and group as Controller.SocketIDs does.
func (r *RPC) SocketIDs() (uid, gid int, err error) {
	if uid, err = lookupID(r.SocketOwner, false); err != nil {
		return -1, -1, fmt.Errorf("config: rpc.socket_owner: %w", err)
	}
	if gid, err = lookupID(r.SocketGroup, true); err != nil {
		return -1, -1, fmt.Errorf("config: rpc.socket_group: %w", err)
	}
	return uid, gid, nil
}

// SocketIDs resolves SocketOwner and SocketGroup (names or numeric ids) to
// the uid and gid to give the socket file; -1 means "leave unchanged", as
// os.Chown takes it.
func (ctrl *Controller) SocketIDs() (uid, gid int, err error) {
	if uid, err = lookupID(ctrl.SocketOwner, false); err != nil {
		return -1, -1, fmt.Errorf("config: controller %q: socket_owner: %w", ctrl.Name, err)
	}
	if gid, err = lookupID(ctrl.SocketGroup, true); err != nil {
		return -1, -1, fmt.Errorf("config: controller %q: socket_group: %w", ctrl.Name, err)
	}
	return uid, gid, nil
}

// lookupID resolves a user or group given by name or numeric id; "" is -1.
// A numeric id need not exist in the user database.
func lookupID(s string, group bool) (int, error) {
	if s == "" {
		return -1, nil
	}
	if id, err := strconv.ParseUint(s, 10, 31); err == nil {
		return int(id), nil
	}
	var idText string
	if group {
		g, err := user.LookupGroup(s)
		if err != nil {
			return -1, fmt.Errorf("unknown group %q", s)
		}
		idText = g.Gid
	} else {
		u, err := user.Lookup(s)
		if err != nil {
			return -1, fmt.Errorf("unknown user %q", s)
		}
		idText = u.Uid
	}
	id, err := strconv.Atoi(idText)
	if err != nil {
		return -1, fmt.Errorf("%q has non-numeric id %q", s, idText)
	}
	return id, nil
}

// checkName reports whether name is usable as a bdev or controller name: it
// becomes a file name (the controller's socket) and a metric label, so it is
// 1..NameLengthMax bytes of letters, digits, '.', '_' and '-', and not "." or "..".
func checkName(e *errorList, name string) bool {
	switch {
	case name == "":
		e.addf("name", "required")
		return false
	case name == "." || name == "..":
		e.addf("name", "%q is not a usable file name", name)
		return false
	case len(name) > NameLengthMax:
		e.addf("name", "is %d bytes, more than %d", len(name), NameLengthMax)
		return false
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			e.addf("name", "%q contains %q; use letters, digits, '.', '_' and '-'", name, r)
			return false
		}
	}
	return true
}

// checkListen accepts host:port with a numeric port; the host may be empty
// (all addresses), a name or an IP literal ("[::1]:9478").
func checkListen(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port: %v", addr, err)
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return fmt.Errorf("%q: port %q is not a number 0..65535", addr, port)
	}
	if strings.ContainsAny(host, " /") {
		return fmt.Errorf("%q: host %q is not a host name or IP address", addr, host)
	}
	return nil
}

func formatCPUs(cpus []int) string {
	parts := make([]string, len(cpus))
	for i, cpu := range cpus {
		parts[i] = strconv.Itoa(cpu)
	}
	return "[" + strings.Join(parts, ", ") + "]"
}

package config

import (
	"bytes"
	"fmt"
	"strconv"

	"github.com/BurntSushi/toml"
)

// The out structs mirror the file for Encode. Every key the running target
// depends on is written explicitly (defaults included), so a file written
// today means the same thing after a default changes.
type outConfig struct {
	SocketDir   string          `toml:"socket_dir"`
	Metrics     outMetrics      `toml:"metrics"`
	RPC         outRPC          `toml:"rpc"`
	Reactors    outReactors     `toml:"reactors"`
	Bdevs       []outBdev       `toml:"bdev,omitempty"`
	Controllers []outController `toml:"controller,omitempty"`
}

type outMetrics struct {
	Listen string `toml:"listen"`
}

type outRPC struct {
	Socket      string `toml:"socket"`
	SocketMode  string `toml:"socket_mode"`
	SocketOwner string `toml:"socket_owner,omitempty"`
	SocketGroup string `toml:"socket_group,omitempty"`
}

type outReactors struct {
	CPUs []int  `toml:"cpus"`
	Poll string `toml:"poll"`
}

type outBdev struct {
	Name       string      `toml:"name"`
	Type       string      `toml:"type"`
	Size       *uint64     `toml:"size,omitempty"`
	BlockSize  *uint32     `toml:"block_size,omitempty"`
	Path       string      `toml:"path,omitempty"`
	Create     bool        `toml:"create,omitempty"`
	ReadOnly   bool        `toml:"read_only,omitempty"`
	Workers    *int        `toml:"workers,omitempty"`
	Engine     string      `toml:"engine,omitempty"`
	Hugepages  string      `toml:"hugepages,omitempty"`
	QueueDepth *int        `toml:"queue_depth,omitempty"`
	Base       string      `toml:"base,omitempty"`
	Pool       string      `toml:"pool,omitempty"`
	Image      string      `toml:"image,omitempty"`
	Namespace  string      `toml:"namespace,omitempty"`
	Conf       string      `toml:"conf,omitempty"`
	User       string      `toml:"user,omitempty"`
	Keyring    string      `toml:"keyring,omitempty"`
	OpTimeout  string      `toml:"op_timeout,omitempty"`
	UUID       string      `toml:"uuid"`
	Inject     []outInject `toml:"inject,omitempty"`
}

type outInject struct {
	Op       string `toml:"op"`
	LBAStart uint64 `toml:"lba_start"`
	LBACount uint64 `toml:"lba_count"`
	Error    string `toml:"error,omitempty"`
	Delay    string `toml:"delay,omitempty"`
	Count    uint64 `toml:"count,omitempty"`
}

type outController struct {
	Name        string   `toml:"name"`
	Type        string   `toml:"type"`
	Bdev        string   `toml:"bdev,omitempty"`
	ReadOnly    *bool    `toml:"read_only,omitempty"` // blk only
	CPUs        []int    `toml:"cpus"`
	NumQueues   int      `toml:"num_queues"`
	MaxSessions int      `toml:"max_sessions"`
	Migration   bool     `toml:"migration"`
	SocketMode  string   `toml:"socket_mode"`
	SocketOwner string   `toml:"socket_owner,omitempty"`
	SocketGroup string   `toml:"socket_group,omitempty"`
	LUNs        []outLUN `toml:"lun,omitempty"`
}

type outLUN struct {
	Target uint8  `toml:"target"`
	LUN    uint16 `toml:"lun"`
	Bdev   string `toml:"bdev"`
}

// Encode writes c as a TOML file that Parse reads back into an equal
// Config (the runtime API's save_config). header, if not empty, is written
// first as comment lines.
func (c *Config) Encode(header string) ([]byte, error) {
	o := outConfig{
		SocketDir: c.SocketDir,
		Metrics:   outMetrics{Listen: c.Metrics.Listen},
		RPC: outRPC{Socket: c.RPC.Socket, SocketMode: fmtMode(c.RPC.SocketMode),
			SocketOwner: c.RPC.SocketOwner, SocketGroup: c.RPC.SocketGroup},
		Reactors: outReactors{CPUs: c.Reactors.CPUs, Poll: c.Reactors.Poll},
	}
	for i := range c.Bdevs {
		b := &c.Bdevs[i]
		ob := outBdev{Name: b.Name, Type: b.Type, Path: b.Path, Create: b.Create, ReadOnly: b.ReadOnly,
			Engine: b.Engine, Hugepages: b.Hugepages, Base: b.Base, UUID: FormatUUID(b.UUID)}
		if b.Size != 0 {
			ob.Size = &b.Size
		}
		if b.Type != TypeError {
			ob.BlockSize = &b.BlockSize
		}
		if b.Type == TypeFile {
			ob.Workers = &b.Workers
		}
		if b.Type == TypeFile || b.Type == TypeAIO || b.Type == TypeRBD {
			ob.QueueDepth = &b.QueueDepth
		}
		if b.Type == TypeRBD {
			ob.Pool, ob.Image, ob.Namespace = b.Pool, b.Image, b.Namespace
			ob.Conf, ob.User, ob.Keyring = b.Conf, b.User, b.Keyring
			ob.OpTimeout = b.OpTimeout.String() // "0s" (wait for ever) included
		}
		for _, in := range b.Inject {
			oi := outInject{Op: in.Op, LBAStart: in.LBAStart, LBACount: in.LBACount, Error: in.Error, Count: in.Count}
			if in.Delay != 0 {
				oi.Delay = in.Delay.String()
			}
			ob.Inject = append(ob.Inject, oi)
		}
		o.Bdevs = append(o.Bdevs, ob)
	}
	for i := range c.Controllers {
		ctrl := &c.Controllers[i]
		oc := outController{Name: ctrl.Name, Type: ctrl.Type, Bdev: ctrl.Bdev, CPUs: ctrl.CPUs, NumQueues: ctrl.NumQueues,
			MaxSessions: ctrl.MaxSessions, Migration: ctrl.Migration, SocketMode: fmtMode(ctrl.SocketMode),
			SocketOwner: ctrl.SocketOwner, SocketGroup: ctrl.SocketGroup}
		if ctrl.Type == ControllerBlk {
			oc.ReadOnly = &ctrl.ReadOnly
		}
		for _, l := range ctrl.LUNs {
			oc.LUNs = append(oc.LUNs, outLUN(l))
		}
		o.Controllers = append(o.Controllers, oc)
	}
	var buf bytes.Buffer
	if header != "" {
		for _, line := range bytes.Split([]byte(header), []byte("\n")) {
			buf.WriteString("# ")
			buf.Write(line)
			buf.WriteByte('\n')
		}
		buf.WriteByte('\n')
	}
	enc := toml.NewEncoder(&buf)
	enc.Indent = ""
	if err := enc.Encode(o); err != nil {
		return nil, fmt.Errorf("config: encode: %w", err)
	}
	return buf.Bytes(), nil
}

func fmtMode(m uint32) string { return "0" + strconv.FormatUint(uint64(m), 8) }

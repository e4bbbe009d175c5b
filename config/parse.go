package config

import (
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
)

// The raw structs mirror the file. Pointers tell an absent key from a zero
// value, so that "block_size = 0" is an error rather than "use the default";
// size and socket_mode are decoded as any so that their type errors get our
// key paths instead of stopping the decoder. Integers are int64 so that range
// errors are ours too.
type rawConfig struct {
	SocketDir   *string         `toml:"socket_dir"`
	Metrics     rawMetrics      `toml:"metrics"`
	RPC         rawRPC          `toml:"rpc"`
	Reactors    rawReactors     `toml:"reactors"`
	Bdevs       []rawBdev       `toml:"bdev"`
	Controllers []rawController `toml:"controller"`
}

type rawMetrics struct {
	Listen *string `toml:"listen"`
}

type rawRPC struct {
	Socket      *string `toml:"socket"`
	SocketMode  any     `toml:"socket_mode"`
	SocketOwner string  `toml:"socket_owner"`
	SocketGroup string  `toml:"socket_group"`
}

type rawReactors struct {
	CPUs *[]int64 `toml:"cpus"`
	Poll *string  `toml:"poll"`
}

type rawBdev struct {
	Name       string      `toml:"name"`
	Type       string      `toml:"type"`
	Size       any         `toml:"size"`
	BlockSize  *int64      `toml:"block_size"`
	Path       string      `toml:"path"`
	Create     bool        `toml:"create"`
	ReadOnly   bool        `toml:"read_only"`
	Workers    *int64      `toml:"workers"`
	Engine     string      `toml:"engine"`
	Hugepages  *string     `toml:"hugepages"`
	QueueDepth *int64      `toml:"queue_depth"`
	UUID       string      `toml:"uuid"`
	Base       string      `toml:"base"`
	Inject     []rawInject `toml:"inject"`
	Pool       string      `toml:"pool"`
	Image      string      `toml:"image"`
	Namespace  string      `toml:"namespace"`
	Conf       string      `toml:"conf"`
	User       string      `toml:"user"`
	Keyring    string      `toml:"keyring"`
	OpTimeout  *string     `toml:"op_timeout"`
}

type rawInject struct {
	Op       string `toml:"op"`
	LBAStart *int64 `toml:"lba_start"`
	LBACount *int64 `toml:"lba_count"`
	Error    string `toml:"error"`
	Delay    string `toml:"delay"`
	Count    *int64 `toml:"count"`
}

type rawController struct {
	Name        string   `toml:"name"`
	Type        *string  `toml:"type"`
	Bdev        string   `toml:"bdev"`
	ReadOnly    bool     `toml:"read_only"`
	CPUs        *[]int64 `toml:"cpus"`
	NumQueues   *int64   `toml:"num_queues"`
	MaxSessions *int64   `toml:"max_sessions"`
	Migration   *bool    `toml:"migration"`
	SocketMode  any      `toml:"socket_mode"`
	SocketOwner string   `toml:"socket_owner"`
	SocketGroup string   `toml:"socket_group"`
	LUNs        []rawLUN `toml:"lun"`
}

type rawLUN struct {
	Target *int64 `toml:"target"`
	LUN    *int64 `toml:"lun"`
	Bdev   string `toml:"bdev"`
}

// Parse decodes and validates a configuration. source names the data (usually
// its file name) in every error message. On error the *Config is nil and the
// error lists every problem found, one per line.
func Parse(data []byte, source string) (*Config, error) {
	if source == "" {
		source = "config"
	}
	var raw rawConfig
	md, err := toml.Decode(string(data), &raw)
	if err != nil {
		// Syntax and type errors stop the decoder; they carry the line.
		// The decoder may quote input verbatim; keep one error per line.
		oneLine := strings.NewReplacer("\n", `\n`, "\r", `\r`)
		var pe toml.ParseError
		if errors.As(err, &pe) {
			if pe.LastKey != "" {
				return nil, fmt.Errorf("%s: line %d: key %s: %s", source, pe.Position.Line,
					oneLine.Replace(pe.LastKey), oneLine.Replace(pe.Message))
			}
			return nil, fmt.Errorf("%s: line %d: %s", source, pe.Position.Line, oneLine.Replace(pe.Message))
		}
		return nil, fmt.Errorf("%s: %s", source, oneLine.Replace(strings.TrimPrefix(err.Error(), "toml: ")))
	}
	errs := newErrorList(source)
	reportUnknownKeys(data, md.Undecoded(), errs)
	c := fromRaw(&raw, errs)
	c.source = source
	c.validate(errs)
	if err := errs.err(); err != nil {
		return nil, err
	}
	return c, nil
}

// reportUnknownKeys reports every key the decoder did not use (a typo
// silently ignored is a disk silently misconfigured). The decoder names keys
// without array indices ("bdev.sizee"), so the data is decoded once more,
// untyped, to find which entries hold each key.
func reportUnknownKeys(data []byte, keys []toml.Key, errs *errorList) {
	if len(keys) == 0 {
		return
	}
	unknown := map[string]bool{}
	for _, key := range keys {
		unknown[key.String()] = true
	}
	var tree map[string]any
	if _, err := toml.Decode(string(data), &tree); err != nil {
		tree = nil // cannot happen: the same data decoded once already
	}
	for _, key := range keys {
		// Keys inside an unknown table are noise once the table is named.
		if len(key) > 1 && unknown[key[:len(key)-1].String()] {
			continue
		}
		if !findUnknownKey(tree, key, "", errs) {
			errs.addf("", "unknown key %q", key.String())
		}
	}
}

// findUnknownKey reports key wherever it occurs below node and says whether
// it found it. prefix is the key path from the entry errs names to node.
// Top-level arrays of tables (bdev, controller) become entries, so the
// error names the entry as validation errors do.
func findUnknownKey(node map[string]any, key toml.Key, prefix string, errs *errorList) bool {
	if node == nil || len(key) == 0 {
		return false
	}
	v, ok := node[key[0]]
	if !ok {
		return false
	}
	if len(key) == 1 {
		errs.addf("", "unknown key %q", prefix+key[0])
		return true
	}
	found := false
	switch x := v.(type) {
	case map[string]any:
		found = findUnknownKey(x, key[1:], prefix+key[0]+".", errs)
	case []any: // an inline array of tables: bdev = [{...}, {...}]
		tables := make([]map[string]any, len(x))
		for i, elem := range x {
			tables[i], _ = elem.(map[string]any)
		}
		found = findInTables(tables, key, prefix, errs)
	case []map[string]any:
		found = findInTables(x, key, prefix, errs)
	}
	return found
}

// findInTables runs findUnknownKey on each table of the array named key[0].
func findInTables(tables []map[string]any, key toml.Key, prefix string, errs *errorList) bool {
	found := false
	for i, elem := range tables {
		if prefix == "" && errs.prefix == "" {
			name, _ := elem["name"].(string)
			found = findUnknownKey(elem, key[1:], "", errs.entry(key[0], i, name)) || found
		} else {
			found = findUnknownKey(elem, key[1:], prefix+key[0]+"["+strconv.Itoa(i)+"].", errs) || found
		}
	}
	return found
}

// fromRaw converts the raw file into a Config and fills in every default;
// this is the only place defaults are chosen. Values that the typed Config
// cannot hold (a size string, a target id of 300) are reported to errs; every
// other check is left to Validate so that hand-built configs get it too.
func fromRaw(raw *rawConfig, errs *errorList) *Config {
	c := &Config{SocketDir: DefaultSocketDir()}
	if raw.SocketDir != nil {
		c.SocketDir = *raw.SocketDir
	}
	c.Metrics.Listen = MetricsListenDefault
	if raw.Metrics.Listen != nil {
		c.Metrics.Listen = *raw.Metrics.Listen
	}
	c.RPC = RPC{Socket: filepath.Join(c.SocketDir, RPCSocketName), SocketMode: SocketModeDefault,
		SocketOwner: raw.RPC.SocketOwner, SocketGroup: raw.RPC.SocketGroup}
	if raw.RPC.Socket != nil {
		c.RPC.Socket = *raw.RPC.Socket
	}
	if raw.RPC.SocketMode != nil {
		mode, err := socketModeValue(raw.RPC.SocketMode)
		if err != nil {
			errs.addf("rpc.socket_mode", "%v", err)
		}
		c.RPC.SocketMode = mode
	}
	c.Reactors.CPUs = []int{allowedCPUs()[0]}
	if raw.Reactors.CPUs != nil {
		c.Reactors.CPUs = cpuList(*raw.Reactors.CPUs)
	}
	c.Reactors.Poll = PollBusy
	if raw.Reactors.Poll != nil {
		c.Reactors.Poll = *raw.Reactors.Poll
	}
	for i := range raw.Bdevs {
		c.Bdevs = append(c.Bdevs, bdevFromRaw(&raw.Bdevs[i], errs.entry("bdev", i, raw.Bdevs[i].Name)))
	}
	for i := range raw.Controllers {
		rc := &raw.Controllers[i]
		c.Controllers = append(c.Controllers, controllerFromRaw(rc, c.Reactors.CPUs, errs.entry("controller", i, rc.Name)))
	}
	return c
}

func bdevFromRaw(rb *rawBdev, errs *errorList) Bdev {
	b := Bdev{
		Name:      rb.Name,
		Type:      rb.Type,
		Path:      rb.Path,
		Engine:    rb.Engine,
		Create:    rb.Create,
		ReadOnly:  rb.ReadOnly,
		BlockSize: BlockSizeDefault,
		Base:      rb.Base,
		Pool:      rb.Pool,
		Image:     rb.Image,
		Namespace: rb.Namespace,
		Conf:      rb.Conf,
		User:      rb.User,
		Keyring:   rb.Keyring,
	}
	if rb.Type == TypeError {
		b.BlockSize = 0 // the base's; a block_size key is reported by Validate
	}
	if rb.Size != nil && rb.Type == TypeRBD {
		// Even "size = 0": the image's size is what is served.
		notFor(errs, "size", true, rb.Type)
	} else if rb.Size != nil {
		size, err := sizeValue(rb.Size)
		if err != nil {
			errs.addf("size", "%v", err)
		} else if size == 0 {
			errs.addf("size", "must be greater than 0")
		}
		b.Size = size
	} else if rb.Type == TypeMalloc {
		errs.addf("size", "required for type %q", rb.Type)
	} else if rb.Create && (rb.Type == TypeFile || rb.Type == TypeAIO) {
		// Without create, a file or aio bdev takes its backing file's size.
		errs.addf("size", "required with create = true")
	}
	if rb.BlockSize != nil {
		if *rb.BlockSize < 0 || *rb.BlockSize > math.MaxUint32 {
			errs.addf("block_size", "%d is not 512 or 4096", *rb.BlockSize)
		} else {
			b.BlockSize = uint32(*rb.BlockSize)
		}
	}
	if rb.Type == TypeFile {
		b.Workers = WorkersDefault
	}
	if rb.Workers != nil {
		b.Workers = clampInt(*rb.Workers)
	}
	if rb.Type == TypeAIO && b.Engine == "" {
		b.Engine = EngineAuto
	}
	if rb.Hugepages != nil {
		b.Hugepages = *rb.Hugepages // "" included: Validate refuses it
	} else if rb.Type == TypeMalloc {
		b.Hugepages = HugepagesAuto
	}
	if rb.Type == TypeFile || rb.Type == TypeAIO || rb.Type == TypeRBD {
		b.QueueDepth = QueueDepthDefault
	}
	if rb.Type == TypeRBD {
		b.OpTimeout = OpTimeoutDefault
	}
	if rb.OpTimeout != nil {
		if rb.Type != TypeRBD {
			// Even "0s", which the typed Config cannot tell from absent.
			notFor(errs, "op_timeout", true, rb.Type)
		} else if d, err := time.ParseDuration(*rb.OpTimeout); err != nil {
			errs.addf("op_timeout", "%q is not a duration such as \"30s\" (\"0s\" waits for ever)", *rb.OpTimeout)
		} else {
			b.OpTimeout = d
		}
	}
	if rb.QueueDepth != nil {
		b.QueueDepth = clampInt(*rb.QueueDepth)
	}
	for j := range rb.Inject {
		b.Inject = append(b.Inject, injectFromRaw(&rb.Inject[j], "inject["+strconv.Itoa(j)+"]", errs))
	}
	if rb.UUID != "" {
		u, err := ParseUUID(rb.UUID)
		if err != nil {
			errs.addf("uuid", "%v", err)
		}
		b.UUID = u
	} else {
		b.UUID = BdevUUID(rb.Name)
	}
	return b
}

func injectFromRaw(ri *rawInject, key string, errs *errorList) Inject {
	in := Inject{Op: ri.Op, Error: ri.Error}
	if ri.LBAStart != nil {
		if *ri.LBAStart < 0 {
			errs.addf(key+".lba_start", "%d is negative", *ri.LBAStart)
		} else {
			in.LBAStart = uint64(*ri.LBAStart)
		}
	}
	if ri.LBACount != nil {
		if *ri.LBACount < 0 {
			errs.addf(key+".lba_count", "%d is negative", *ri.LBACount)
		} else {
			in.LBACount = uint64(*ri.LBACount)
		}
	}
	if ri.Count != nil {
		if *ri.Count < 0 {
			errs.addf(key+".count", "%d is negative; 0 (the default) injects into every matching IO", *ri.Count)
		} else {
			in.Count = uint64(*ri.Count)
		}
	}
	if ri.Delay != "" {
		d, err := time.ParseDuration(ri.Delay)
		if err != nil {
			errs.addf(key+".delay", "%q is not a duration such as \"10ms\"", ri.Delay)
		}
		in.Delay = d
	}
	return in
}

func controllerFromRaw(rc *rawController, reactorCPUs []int, errs *errorList) Controller {
	ctrl := NewController(rc.Name, uniqueCPUs(reactorCPUs))
	ctrl.SocketOwner, ctrl.SocketGroup = rc.SocketOwner, rc.SocketGroup
	if rc.Type != nil {
		ctrl.Type = *rc.Type // "" included: Validate refuses it
	}
	ctrl.Bdev, ctrl.ReadOnly = rc.Bdev, rc.ReadOnly
	if rc.CPUs != nil {
		ctrl.CPUs = cpuList(*rc.CPUs)
	}
	if rc.NumQueues != nil {
		ctrl.NumQueues = clampInt(*rc.NumQueues)
	}
	if rc.MaxSessions != nil {
		ctrl.MaxSessions = clampInt(*rc.MaxSessions)
	}
	if rc.Migration != nil {
		ctrl.Migration = *rc.Migration
	}
	if rc.SocketMode != nil {
		mode, err := socketModeValue(rc.SocketMode)
		if err != nil {
			errs.addf("socket_mode", "%v", err)
		}
		ctrl.SocketMode = mode
	}
	for j := range rc.LUNs {
		rl := &rc.LUNs[j]
		key := "lun[" + strconv.Itoa(j) + "]"
		var l LUN
		l.Bdev = rl.Bdev
		switch {
		case rl.Target == nil:
			errs.addf(key+".target", "required")
		case *rl.Target < 0 || *rl.Target > TargetMax:
			errs.addf(key+".target", "%d is out of range 0..%d", *rl.Target, TargetMax)
		default:
			l.Target = uint8(*rl.Target)
		}
		if rl.LUN != nil {
			if *rl.LUN < 0 || *rl.LUN > LUNMax {
				errs.addf(key+".lun", "%d is out of range 0..%d", *rl.LUN, LUNMax)
			} else {
				l.LUN = uint16(*rl.LUN)
			}
		}
		ctrl.LUNs = append(ctrl.LUNs, l)
	}
	return ctrl
}

// socketModeValue parses a permission string such as "0600" or "660".
// Integers are refused: TOML reads 600 as decimal, which is not what anyone
// writing a mode means.
func socketModeValue(v any) (uint32, error) {
	s, ok := v.(string)
	if !ok {
		return SocketModeDefault, fmt.Errorf("must be an octal string such as \"0660\", not %s", tomlTypeName(v))
	}
	t := strings.TrimPrefix(s, "0o")
	mode, err := strconv.ParseUint(t, 8, 32)
	if err != nil || t == "" || t[0] == '+' || t[0] == '-' {
		return SocketModeDefault, fmt.Errorf("%q is not an octal string such as \"0660\"", s)
	}
	if mode > 0o777 {
		return SocketModeDefault, fmt.Errorf("%q has bits above 0777", s)
	}
	return uint32(mode), nil
}

// uniqueCPUs copies cpus without repeats, so that a CPU listed twice in
// reactors.cpus is reported there and not again for every controller that
// takes the default.
func uniqueCPUs(cpus []int) []int {
	out := make([]int, 0, len(cpus))
	for _, cpu := range cpus {
		if !slices.Contains(out, cpu) {
			out = append(out, cpu)
		}
	}
	return out
}

// cpuList converts decoded CPU numbers; values beyond int's range become -1,
// which Validate reports as not present.
func cpuList(raw []int64) []int {
	cpus := make([]int, len(raw))
	for i, v := range raw {
		cpus[i] = clampInt(v)
	}
	return cpus
}

// clampInt converts to int; where int is 32 bits a value that does not fit
// becomes math.MinInt, which every range check refuses.
func clampInt(v int64) int {
	if int64(int(v)) != v {
		return math.MinInt
	}
	return int(v)
}

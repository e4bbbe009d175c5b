package config

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// sizeUnits maps a size suffix to its multiplier. Binary suffixes (and the
// bare letters, as in dd and QEMU) are powers of 1024; KB/MB/GB/TB are powers
// of 1000, as their SI names say.
var sizeUnits = map[string]uint64{
	"":    1,
	"B":   1,
	"K":   1 << 10,
	"KiB": 1 << 10,
	"M":   1 << 20,
	"MiB": 1 << 20,
	"G":   1 << 30,
	"GiB": 1 << 30,
	"T":   1 << 40,
	"TiB": 1 << 40,
	"KB":  1e3,
	"MB":  1e6,
	"GB":  1e9,
	"TB":  1e12,
}

const sizeSyntax = "a whole number of bytes, optionally followed by B, K, KiB, M, MiB, G, GiB, T, TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000)"

// ParseSize parses a byte count such as "4096", "512MiB", "1 G" or "10GB".
// The number is a non-negative decimal integer (no sign, fraction or
// exponent); the result must fit in a uint64. Zero is accepted here; callers
// decide whether it is meaningful.
func ParseSize(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	end := 0
	for end < len(t) && t[end] >= '0' && t[end] <= '9' {
		end++
	}
	if end == 0 {
		return 0, fmt.Errorf("%q is not %s", s, sizeSyntax)
	}
	unit := strings.TrimSpace(t[end:])
	mult, ok := sizeUnits[unit]
	if !ok && unit != "" && !(unit[0] >= 'A' && unit[0] <= 'Z' || unit[0] >= 'a' && unit[0] <= 'z') {
		return 0, fmt.Errorf("%q is not %s", s, sizeSyntax)
	}
	if !ok {
		return 0, fmt.Errorf("%q has unknown unit %q; want %s", s, unit, sizeSyntax)
	}
	n, err := strconv.ParseUint(t[:end], 10, 64)
	if err != nil {
		if errors.Is(err, strconv.ErrRange) {
			return 0, fmt.Errorf("%q does not fit in 64 bits", s)
		}
		return 0, fmt.Errorf("%q is not %s", s, sizeSyntax)
	}
	if n > math.MaxUint64/mult {
		return 0, fmt.Errorf("%q does not fit in 64 bits", s)
	}
	return n * mult, nil
}

// sizeValue converts a decoded TOML size (integer or string) to bytes.
func sizeValue(v any) (uint64, error) {
	switch x := v.(type) {
	case int64:
		if x < 0 {
			return 0, fmt.Errorf("%d is negative", x)
		}
		return uint64(x), nil
	case string:
		return ParseSize(x)
	default:
		return 0, fmt.Errorf("must be an integer or a string such as \"1GiB\", not %s", tomlTypeName(v))
	}
}

// tomlTypeName names the TOML type of a decoded value for error messages.
func tomlTypeName(v any) string {
	switch v.(type) {
	case int64:
		return "an integer"
	case float64:
		return "a float"
	case string:
		return "a string"
	case bool:
		return "a boolean"
	case []any, []map[string]any:
		return "an array"
	case map[string]any:
		return "a table"
	default:
		return "a date/time"
	}
}

package config

import (
	"runtime"

	"golang.org/x/sys/unix"
)

// allowedCPUs lists, in increasing order, the CPUs this process may run on:
// its scheduler affinity mask (which honours taskset, cgroup cpusets and
// systemd's CPUAffinity=), or 0..NumCPU-1 if the mask cannot be read. A
// reactor pinned outside this set would fail at start-up, so Validate refuses
// it up front. The list is never empty.
func allowedCPUs() []int {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err == nil {
		cpus := make([]int, 0, set.Count())
		for cpu := 0; cpu < len(set)*64; cpu++ {
			if set.IsSet(cpu) {
				cpus = append(cpus, cpu)
			}
		}
		if len(cpus) > 0 {
			return cpus
		}
	}
	n := runtime.NumCPU()
	cpus := make([]int, n)
	for i := range cpus {
		cpus[i] = i
	}
	return cpus
}

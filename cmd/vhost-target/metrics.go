package main

import (
	"net/http"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"vhost-target/vhost"
)

// collector reads the counters when scraped. Reactors write their own
// counters without atomics; a scrape copies them on each reactor (see
// vhost.ControllerStats.Snapshot), so the data path never shares a cache line
// with the metrics endpoint.
type collector struct{ t *target }

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc("vhost_target_"+name, help, labels, nil)
}

var (
	lunLabels       = []string{"controller", "target", "lun", "bdev"}
	dReads          = desc("lun_reads_total", "Read commands completed.", lunLabels...)
	dWrites         = desc("lun_writes_total", "Write commands completed.", lunLabels...)
	dFlushes        = desc("lun_flushes_total", "SYNCHRONIZE CACHE commands completed.", lunLabels...)
	dUnmaps         = desc("lun_unmaps_total", "UNMAP and WRITE SAME commands completed.", lunLabels...)
	dReadBytes      = desc("lun_read_bytes_total", "Bytes read by guests.", lunLabels...)
	dWriteBytes     = desc("lun_written_bytes_total", "Bytes written by guests.", lunLabels...)
	dLUNErrors      = desc("lun_errors_total", "Commands completed with CHECK CONDITION or BUSY, by kind.", append(lunLabels, "kind")...)
	dLatency        = desc("lun_io_latency_seconds", "Block I/O latency from submission to the bdev to completion, measured on the reactor.", lunLabels...)
	dInFlight       = desc("lun_io_in_flight", "Block I/O commands submitted to the bdev and not yet completed.", lunLabels...)
	dQueueRequests  = desc("queue_requests_total", "Requests completed per request queue.", "controller", "queue")
	dBadChains      = desc("bad_descriptor_chains_total", "Malformed descriptor chains failed individually.", "controller")
	dBadRequests    = desc("bad_requests_total", "Chains too short for virtio-scsi headers, or bidirectional.", "controller")
	dTransportErrs  = desc("transport_errors_total", "Responses other than VIRTIO_SCSI_S_OK (bad target or LUN).", "controller")
	dBroken         = desc("broken_queues_total", "Virtqueues marked broken by a misbehaving driver.", "controller")
	dRenotified     = desc("late_notifications_total", "Interrupts a driver waited for without having been sent one (its used_event store raced our used index; see virtq.Unnotified), sent after 1 ms.", "controller")
	dProtocolErrors = desc("protocol_errors_total", "vhost-user connections closed for a bad message.", "controller")
	dConnections    = desc("connections_total", "vhost-user connections accepted.", "controller")
	dSessions       = desc("sessions", "Connected front-ends.", "controller")
	dRefused        = desc("sessions_refused_total", "vhost-user connections closed at once because the controller had max_sessions front-ends.", "controller")
	dMaxSessions    = desc("max_sessions", "Front-ends a controller serves at once (its max_sessions).", "controller")
	dTMFs           = desc("task_management_total", "Task management functions answered.", "controller")
	dBusy           = desc("reactor_busy_seconds_total", "Time reactors spent in iterations that did work.", "reactor", "cpu")
	dIdle           = desc("reactor_idle_seconds_total", "Time reactors spent polling with nothing to do.", "reactor", "cpu")
	dIterations     = desc("reactor_poll_iterations_total", "Reactor loop iterations.", "reactor", "cpu")
	dSleeps         = desc("reactor_sleeps_total", "Times an adaptive reactor slept in epoll.", "reactor", "cpu")
)

func (c collector) Describe(ch chan<- *prometheus.Desc) { prometheus.DescribeByCollect(c, ch) }

func (c collector) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v uint64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), l...)
	}
	for _, ctrl := range c.t.controllers() {
		s := ctrl.Stats.Snapshot()
		n := ctrl.Name()
		for _, l := range s.LUNs {
			lv := []string{n, strconv.Itoa(int(l.Target)), strconv.Itoa(int(l.LUN)), l.Bdev}
			counter(dReads, l.Reads, lv...)
			counter(dWrites, l.Writes, lv...)
			counter(dFlushes, l.Flushes, lv...)
			counter(dUnmaps, l.Unmaps, lv...)
			counter(dReadBytes, l.ReadBytes, lv...)
			counter(dWriteBytes, l.WriteBytes, lv...)
			for k, v := range l.Errors {
				counter(dLUNErrors, v, append(lv, vhost.ErrorKindNames[k])...)
			}
			buckets := make(map[float64]uint64, vhost.LatencyBuckets)
			var cum uint64
			for i := 0; i < vhost.LatencyBuckets; i++ {
				cum += l.Latency[i]
				buckets[float64(uint64(1)<<i)*1e-6] = cum
			}
			ch <- prometheus.MustNewConstHistogram(dLatency, cum+l.Latency[vhost.LatencyBuckets],
				float64(l.LatencyNanos)/1e9, buckets, lv...)
			ch <- prometheus.MustNewConstMetric(dInFlight, prometheus.GaugeValue, float64(l.InFlight), lv...)
		}
		var bad, badReq, tr, broken, late uint64
		for q, qc := range s.Queues {
			counter(dQueueRequests, qc.Requests, n, strconv.Itoa(q))
			bad += qc.BadChains
			badReq += qc.BadRequests
			tr += qc.TransportErrors
			broken += qc.Broken
			late += qc.Renotified
		}
		counter(dBadChains, bad, n)
		counter(dBadRequests, badReq, n)
		counter(dTransportErrs, tr, n)
		counter(dBroken, broken, n)
		counter(dRenotified, late, n)
		counter(dProtocolErrors, s.ProtocolErrors, n)
		counter(dConnections, s.Connections, n)
		counter(dRefused, s.Refused, n)
		ch <- prometheus.MustNewConstMetric(dMaxSessions, prometheus.GaugeValue, float64(ctrl.MaxSessions()), n)
		counter(dTMFs, s.TMFs, n)
		ch <- prometheus.MustNewConstMetric(dSessions, prometheus.GaugeValue, float64(ctrl.Sessions()), n)
	}
	for _, r := range c.t.reactors {
		lv := []string{strconv.Itoa(r.ID()), strconv.Itoa(r.CPU())}
		ch <- prometheus.MustNewConstMetric(dBusy, prometheus.CounterValue, float64(r.Stats.BusyNanos.Load())/1e9, lv...)
		ch <- prometheus.MustNewConstMetric(dIdle, prometheus.CounterValue, float64(r.Stats.IdleNanos.Load())/1e9, lv...)
		counter(dIterations, r.Stats.Iterations.Load(), lv...)
		counter(dSleeps, r.Stats.Sleeps.Load(), lv...)
	}
}

func metricsHandler(t *target) http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collector{t})
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	return mux
}

//! The standard `process_*` metrics (as Prometheus client libraries export them, and as
//! kube-proxy does): CPU time, memory, file descriptors and start time, read from `/proc`
//! at every scrape. A value that cannot be read is left out of the scrape.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Clock ticks per second in `/proc/<pid>/stat` times: the kernel always reports them in
/// `USER_HZ`, which is 100 on every architecture Linux exports to user space.
const USER_HZ: f64 = 100.0;

/// One reading of this process's numbers.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU time, seconds.
    pub cpu_seconds: Option<f64>,
    /// Open file descriptors.
    pub open_fds: Option<f64>,
    /// The soft limit on file descriptors.
    pub max_fds: Option<f64>,
    /// Virtual memory size, bytes.
    pub virtual_memory_bytes: Option<f64>,
    /// The soft limit on the address space, bytes (`unlimited`: 2^64 − 1, as Go reports it).
    pub virtual_memory_max_bytes: Option<f64>,
    /// Resident set size, bytes.
    pub resident_memory_bytes: Option<f64>,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
}

impl ProcessStats {
    /// Reads `/proc/self` and `/proc/stat`.
    pub fn read() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        let stat = read("/proc/self/stat");
        let status = read("/proc/self/status");
        let limits = read("/proc/self/limits");
        let btime = read("/proc/stat").and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .as_deref()
            .and_then(|s| s.rsplit_once(')'))
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // fields[0] is field 3 (state): utime is field 14, stime 15, starttime 22.
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        let kb = |name: &str| {
            status.as_deref().and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                    .map(|v| v * 1024.0)
            })
        };
        let limit = |name: &str| {
            limits.as_deref().and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| {
                    match v.split_whitespace().next()? {
                        "unlimited" => Some(u64::MAX as f64),
                        n => n.parse::<f64>().ok(),
                    }
                })
            })
        };
        Self {
            cpu_seconds: field(14).zip(field(15)).map(|(u, s)| (u + s) / USER_HZ),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as f64),
            max_fds: limit("Max open files"),
            virtual_memory_bytes: kb("VmSize:"),
            virtual_memory_max_bytes: limit("Max address space"),
            resident_memory_bytes: kb("VmRSS:"),
            start_time_seconds: field(22).zip(btime).map(|(t, b)| b + t / USER_HZ),
        }
    }
}

/// Encodes [`ProcessStats`] at every scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl ProcessCollector {
    /// A collector.
    pub fn new() -> Self {
        Self
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = ProcessStats::read();
        if let Some(v) = s.cpu_seconds {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                c.metric_type(),
            )?)?;
        }
        let gauges = [
            (
                "process_open_fds",
                "Number of open file descriptors",
                s.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                s.max_fds,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.virtual_memory_bytes,
            ),
            (
                "process_virtual_memory_max_bytes",
                "Maximum amount of virtual memory available in bytes",
                s.virtual_memory_max_bytes,
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.resident_memory_bytes,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                s.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_plausible_numbers() {
        let s = ProcessStats::read();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs_f64();
        let start = s.start_time_seconds.expect("start time");
        assert!(
            start <= now + 1.0 && start > now - 86_400.0 * 365.0,
            "{s:?}"
        );
        assert!(s.open_fds.expect("fds") >= 3.0, "{s:?}");
        assert!(s.resident_memory_bytes.expect("rss") > 1e5, "{s:?}");
        assert!(s.virtual_memory_bytes.expect("vsz") >= s.resident_memory_bytes.expect("rss"));
        assert!(s.max_fds.expect("limit") >= s.open_fds.expect("fds"));
        assert!(s.cpu_seconds.expect("cpu") >= 0.0);
    }
}

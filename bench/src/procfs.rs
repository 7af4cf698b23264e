//! What `/proc` tells: CPU time and peak RSS of a process, the broker's process, the load.

use crate::error::Res;

/// User plus system CPU time of this process, from `/proc/self/stat` (100 ticks per second).
pub(crate) fn cpu_seconds() -> Res<f64> {
    cpu_seconds_of("self")
}

/// User plus system CPU time of process `pid` (`self` for this one).
pub(crate) fn cpu_seconds_of(pid: &str) -> Res<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (_, after_comm) = stat.rsplit_once(')').ok_or("malformed /proc/self/stat")?;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime); `after_comm` starts at field 3.
    let tick = |i: usize| -> Res<u64> {
        Ok(fields
            .get(i)
            .ok_or("short /proc/self/stat")?
            .parse::<u64>()?)
    };
    Ok((tick(11)? + tick(12)?) as f64 / 100.0)
}

/// Peak resident set size (`VmHWM`) of this process, in KiB.
pub(crate) fn peak_rss_kib() -> Res<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or("no VmHWM in /proc/self/status")?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .ok_or("malformed VmHWM")?
        .parse()?;
    Ok(kib)
}

/// The local RabbitMQ node's process: the one listening on the URL's port (other nodes, such
/// as a local test cluster, may run beside it), if this machine runs it.
pub(crate) fn broker_pid(url: &str) -> Option<String> {
    let port = url_port(url)?;
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    // sl local_address rem_address st ... inode
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local_port = fields.get(1)?.rsplit_once(':')?.1;
                    let listening = fields.get(3) == Some(&"0A");
                    (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                        .then(|| fields.get(9).map(|inode| format!("socket:[{inode}]")))?
                })
                .collect::<Vec<_>>()
        })
        .collect();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid = entry.file_name().into_string().ok()?;
            pid.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "beam.smp").then_some(())?;
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .ok()?
                .flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|target| {
                        inodes
                            .iter()
                            .any(|inode| target.as_os_str() == inode.as_str())
                    })
                })
                .then_some(pid)
        })
}

/// The port of an AMQP URL (5672, or 5671 for `amqps`, when none is given).
fn url_port(url: &str) -> Option<u16> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    match host_port.rsplit_once(':') {
        Some((_, port)) if !port.ends_with(']') => port.parse().ok(),
        _ => Some(if scheme == "amqps" { 5671 } else { 5672 }),
    }
}

/// The 1-minute load average: other work on the machine skews every number.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_comes_from_the_url_or_the_scheme() {
        assert_eq!(
            url_port("amqp://guest:guest@127.0.0.1:5673/%2f"),
            Some(5673)
        );
        assert_eq!(url_port("amqp://localhost/%2f"), Some(5672));
        assert_eq!(url_port("amqps://user:pw@host"), Some(5671));
        assert_eq!(url_port("amqp://[::1]/%2f"), Some(5672));
        assert_eq!(url_port("localhost"), None);
    }

    #[test]
    fn this_process_has_cpu_time_and_a_peak_rss() {
        assert!(cpu_seconds().unwrap() >= 0.0);
        assert!(peak_rss_kib().unwrap() > 0);
    }
}

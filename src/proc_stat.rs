//! A process's figures from /proc, for the benchmarks and the scoreboard.

/// CPU seconds (user + system) a process has used so far; 0 when it cannot be read.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (in parentheses) may hold spaces: fields are counted after it.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks: f64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<f64>().ok()).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}

/// The CPU time the calling thread has used, in nanoseconds (a system call: ~0.6 µs on
/// this project's VMs); 0 when it cannot be read.
pub fn thread_cpu_nanos() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only the timespec passed.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_busy_process_has_used_cpu_and_a_missing_one_none() {
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(60) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(super::cpu_secs(std::process::id()) > 0.0);
        let before = super::thread_cpu_nanos();
        while super::thread_cpu_nanos() < before + 1_000_000 {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(super::thread_cpu_nanos() >= before + 1_000_000 && before > 0);
        assert_eq!(super::cpu_secs(u32::MAX), 0.0);
    }
}

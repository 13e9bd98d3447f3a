//! The open-files limit: every connection, listener and leg takes a descriptor, and a
//! router before a thousand engines (or a simulator serving them) needs tens of
//! thousands.

/// Raises the soft limit of open files as far as the process may: to the kernel's
/// `fs.nr_open` (at most 2^20) where it is privileged to raise the hard limit too, else
/// to the hard limit.
pub(crate) fn raise() {
    #[cfg(unix)]
    {
        let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
            .unwrap_or(0)
            .min(1 << 20);
        // SAFETY: getrlimit/setrlimit read and write only the struct passed.
        unsafe {
            let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return;
            }
            if ceiling > lim.rlim_max {
                let wider = libc::rlimit { rlim_cur: ceiling, rlim_max: ceiling };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &wider) == 0 {
                    return;
                }
            }
            if lim.rlim_cur < lim.rlim_max {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    }
}

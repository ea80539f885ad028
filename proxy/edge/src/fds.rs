//! Open-file limits: a proxy session and an anchor player each hold one socket, so their
//! tables are bounded by the descriptors the process may open, less a reserve for the rest.

/// Descriptors kept free beyond sessions or players: stdio, the admin listener and its
/// connections, the Kubernetes or queue client, the runtime.
pub const FD_RESERVE: u64 = 64;

/// Raises the soft open-file limit to the hard one (children started later inherit it) and
/// logs the outcome; the soft limit in force, if it could be read.
pub fn raise_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            tracing::info!(limit, "open-file limit");
            Some(limit)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
            limits().map(|(soft, _)| soft)
        }
    }
}

/// The open-file limits now: (soft, hard).
pub fn limits() -> Option<(u64, u64)> {
    rlimit::getrlimit(rlimit::Resource::NOFILE).ok()
}

/// How many of `wanted` one-descriptor entries fit under `fd_limit` when `fixed` descriptors
/// are needed besides.
pub fn budget(wanted: usize, fd_limit: u64, fixed: u64) -> usize {
    let room = fd_limit.saturating_sub(fixed);
    wanted.min(usize::try_from(room).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_capped_by_the_descriptor_limit() {
        assert_eq!(budget(10_000, 1024, 100), 924);
        assert_eq!(budget(500, 1024, 100), 500);
        assert_eq!(budget(10_000, 50, 100), 0);
        assert_eq!(budget(10, u64::MAX, 100), 10);
    }
}

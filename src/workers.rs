//! Where the runtime's worker threads run (`[server] pin_workers`): with one worker
//! per CPU the process may use, each worker stays on a CPU of its own, so the
//! kernel wakes a worker where it waits instead of queueing it behind another
//! process on a busy CPU while its own CPU idles.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Worker threads for the runtime: `TOKIO_WORKER_THREADS` when it is a positive
/// number (tokio's own variable), else one per CPU the process may use.
pub fn count() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
}

/// The CPU for each of `workers` workers: the CPUs in `allowed` one each, when
/// `pin` and there are exactly as many; otherwise none (a CPU quota smaller than
/// the CPUs allowed, or more workers than CPUs, leaves placement to the kernel).
pub fn plan(pin: bool, workers: usize, allowed: &[usize]) -> Option<Vec<usize>> {
    (pin && workers > 0 && workers == allowed.len()).then(|| allowed.to_vec())
}

/// The CPUs this process may run on (its affinity mask), in order; empty where it
/// cannot be read.
#[cfg(target_os = "linux")]
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, and sched_getaffinity writes
    // at most size_of::<cpu_set_t>() bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

#[cfg(not(target_os = "linux"))]
pub fn allowed_cpus() -> Vec<usize> {
    Vec::new()
}

/// Keeps the calling thread on `cpu`.
#[cfg(target_os = "linux")]
fn pin_current(cpu: usize) -> std::io::Result<()> {
    // SAFETY: as above; 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn pin_current(_cpu: usize) -> std::io::Result<()> {
    Ok(())
}

thread_local! {
    static PLACED: Cell<bool> = const { Cell::new(false) };
}

/// A hook for tokio's `on_thread_park`, which only worker threads call: the first
/// time each worker is about to wait, it moves to the next CPU of `cpus`.
pub fn placer(cpus: Vec<usize>) -> impl Fn() + Send + Sync + 'static {
    let next = Arc::new(AtomicUsize::new(0));
    move || {
        if PLACED.with(|p| p.replace(true)) {
            return;
        }
        let i = next.fetch_add(1, Ordering::Relaxed);
        if let Some(&cpu) = cpus.get(i) {
            match pin_current(cpu) {
                Ok(()) => tracing::debug!(worker = i, cpu, "worker pinned"),
                Err(e) => tracing::warn!(worker = i, cpu, error = %e, "cannot pin a worker thread"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_only_one_worker_per_allowed_cpu() {
        assert_eq!(plan(true, 2, &[0, 1]), Some(vec![0, 1]));
        assert_eq!(plan(true, 2, &[4, 7]), Some(vec![4, 7]));
        // A quota below the CPUs allowed, or more workers than CPUs: no pinning.
        assert_eq!(plan(true, 2, &[0, 1, 2, 3]), None);
        assert_eq!(plan(true, 3, &[0, 1]), None);
        assert_eq!(plan(false, 2, &[0, 1]), None);
        assert_eq!(plan(true, 0, &[]), None);
    }
}

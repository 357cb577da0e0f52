//! The proxy's runtime and how its worker threads run.
//!
//! `[server] pin_workers`: with one worker per CPU the process may use, each
//! worker stays on a CPU of its own, so the kernel wakes a worker where it waits
//! instead of queueing it behind another process on a busy CPU while its own CPU
//! idles.
//!
//! `[server] yield_when_busy`: a worker that has run for a while since it last
//! woke and finds nothing left to do yields its CPU once before it waits for
//! events. Another process on that CPU (a backend, a client on the same host)
//! runs first, and what it sends wsgate's way is often there when the worker
//! looks: taken without sleeping and being woken again, which on a virtual
//! machine costs tens of microseconds and leaves CPUs idle meanwhile. A worker
//! woken for a moment's work (one message) waits at once, so a quiet
//! connection's latency is what it was.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a worker must have been running since it last woke to yield before
/// it waits: longer than a single message's work, shorter than a burst's.
pub const BUSY_BEFORE_YIELD: Duration = Duration::from_micros(50);

/// The proxy's runtime: `count()` workers; with `pin` and one worker per CPU the
/// process may use, each on a CPU of its own; with `yield_when_busy`, workers
/// yield as the module says.
pub fn runtime(pin: bool, yield_when_busy: bool) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = count();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(workers).enable_all();
    let place = plan(pin, workers, &allowed_cpus()).map(placer);
    if yield_when_busy {
        builder.on_thread_unpark(woke);
    }
    if place.is_some() || yield_when_busy {
        builder.on_thread_park(move || {
            if let Some(place) = &place {
                place();
            }
            if yield_when_busy {
                yield_if_busy(BUSY_BEFORE_YIELD);
            }
        });
    }
    builder.build()
}

thread_local! {
    /// When this worker last woke (`None` before its first wake-up).
    static WOKE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Yields taken by workers of this process, for tests and benchmarks.
static YIELDS: AtomicU64 = AtomicU64::new(0);

/// Yields taken so far by this process's workers.
pub fn yields() -> u64 {
    YIELDS.load(Ordering::Relaxed)
}

/// `on_thread_unpark`: the worker starts a busy spell.
fn woke() {
    WOKE.with(|w| w.set(Some(Instant::now())));
}

/// `on_thread_park`: a worker busy for `limit` or longer since it woke lets
/// whatever else is ready on its CPU run before it waits.
fn yield_if_busy(limit: Duration) {
    let busy = WOKE
        .with(|w| w.take())
        .is_some_and(|t| t.elapsed() >= limit);
    if busy {
        YIELDS.fetch_add(1, Ordering::Relaxed);
        std::thread::yield_now();
    }
}

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

    /// `n` times: 200 µs of work on the worker, then a wait on a timer.
    async fn busy_then_wait(n: usize) {
        for _ in 0..n {
            let start = Instant::now();
            while start.elapsed() < Duration::from_micros(200) {
                std::hint::spin_loop();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[test]
    fn a_worker_yields_only_after_a_busy_spell_and_only_when_asked() {
        let before = yields();
        let off = runtime(false, false).expect("runtime");
        off.block_on(async { tokio::spawn(busy_then_wait(5)).await.expect("task") });
        drop(off);
        assert_eq!(yields(), before, "yield_when_busy = false");
        // A spell shorter than the limit ends in a wait without a yield.
        woke();
        yield_if_busy(Duration::from_secs(3600));
        assert_eq!(yields(), before);
        let on = runtime(false, true).expect("runtime");
        on.block_on(async { tokio::spawn(busy_then_wait(5)).await.expect("task") });
        assert!(yields() > before, "no yield after five busy spells");
    }

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

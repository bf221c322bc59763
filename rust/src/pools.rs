//! The thread pools, one set per process.
//!
//! A forked child inherits none of its parent's threads, so a pool built before a fork would
//! hang the child on first use. Each pool remembers the pid it was built in; a child builds
//! its own on first use (the parent's is leaked in the child: its threads do not exist there).

use std::sync::Mutex;

struct PerProcess {
    pid: u32,
    pool: &'static rayon::ThreadPool,
}

fn get(
    slot: &Mutex<Option<PerProcess>>,
    threads: usize,
    name: &'static str,
    nice: i32,
) -> &'static rayon::ThreadPool {
    let pid = std::process::id();
    let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = guard.as_ref() {
        if p.pid == pid {
            return p.pool;
        }
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(move |i| format!("fastindex-{name}-{i}"))
        .start_handler(move |_| {
            if nice != 0 {
                // Background work yields the CPU to the caller's own threads (a server
                // answering progress, a UI). On Linux `who = 0` is the calling thread.
                // SAFETY: a plain syscall; failure only keeps the default priority.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, 0, nice);
                }
            }
        })
        .build()
        .or_else(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build())
        .unwrap_or_else(|e| panic!("cannot start any thread: {e}"));
    let pool: &'static rayon::ThreadPool = Box::leak(Box::new(pool));
    *guard = Some(PerProcess { pid, pool });
    pool
}

/// For CPU work (the walk, sorting): one thread per core.
pub fn cpu_pool() -> &'static rayon::ThreadPool {
    static SLOT: Mutex<Option<PerProcess>> = Mutex::new(None);
    let n = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    get(&SLOT, n, "cpu", 0)
}

/// For reading file headers. Reads of a cold disk block, so it has many more threads than
/// cores: 32 reads in flight are ~4x faster than one on a cold page cache.
/// `FASTINDEX_IO_THREADS` overrides the size. Its threads run at nice 10: phase 2 runs in the
/// background and should not slow whoever reads the store meanwhile.
pub fn io_pool() -> &'static rayon::ThreadPool {
    static SLOT: Mutex<Option<PerProcess>> = Mutex::new(None);
    let n = std::env::var("FASTINDEX_IO_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32usize);
    get(&SLOT, n, "io", 10)
}

//! The process allocator: mimalloc for small blocks, and for large ones whole pages from the
//! OS kept in an exact-size cache.
//!
//! A training step frees and allocates the same large buffers (activations, their gradients,
//! packing scratch) in the same sizes every step. Returning their pages to the OS costs the
//! kernel's page zeroing when they are faulted in again (about 15 % of a ResNet step with
//! mimalloc's default 10 ms purge delay, 45 % at 32 px); keeping every freed page in mimalloc
//! (purging off) lets its address space fragment: ResNet18 at 128 px grew from 0.9 to 1.9 GB
//! of anonymous memory over an epoch. So blocks of at least [`MIN_BLOCK`] bytes are mapped
//! directly (`mmap`), and on free kept for up to [`MAX_AGE_MS`] in a small cache that hands a
//! block back to the next request of exactly the same size (the next step's): hot buffers are
//! reused without faults, and a block unused for longer, or beyond [`MAX_CACHED`] bytes, is
//! unmapped, so its memory goes back to the OS at once and nothing fragments. mimalloc keeps
//! everything smaller, with purging off (set by [`configure_mimalloc`]).
//!
//! Install it in a binary with `#[global_allocator] static A: CachingAlloc = CachingAlloc;`.

use mimalloc::MiMalloc;
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Smallest block that is mapped directly and cached (1 MiB); smaller ones are mimalloc's,
/// which reuses them well within its size classes.
pub const MIN_BLOCK: usize = 1 << 20;
/// A cached block unused for this long is unmapped.
pub const MAX_AGE_MS: u64 = 2000;
/// At most this many bytes are held in the cache (older blocks are unmapped first).
pub const MAX_CACHED: usize = 4 << 30;
/// Slots of the cache (a fixed array: the cache itself never allocates).
const SLOTS: usize = 256;
/// Mapped blocks are page-aligned; a larger alignment goes to mimalloc.
const PAGE: usize = 4096;

#[derive(Clone, Copy)]
struct Slot {
    ptr: usize,
    /// The mapping's length (the request rounded up to pages).
    len: usize,
    /// Milliseconds on the cache's clock when the block was freed.
    freed_ms: u64,
}

const EMPTY: Slot = Slot {
    ptr: 0,
    len: 0,
    freed_ms: 0,
};

struct Cache {
    slots: [Slot; SLOTS],
    bytes: usize,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    slots: [EMPTY; SLOTS],
    bytes: 0,
});

/// The reference point of the cache's clock.
static START: OnceLock<Instant> = OnceLock::new();

/// Whether large blocks are mapped and cached (else everything is mimalloc's).
static ENABLED: AtomicBool = AtomicBool::new(cfg!(unix));

fn now_ms() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Turns the large-block path off (`false`: every block is mimalloc's) or on; call it before
/// the first large allocation. Used by `REST_ALLOC=mimalloc` for comparisons.
pub fn set_enabled(on: bool) {
    ENABLED.store(on && cfg!(unix), Ordering::Relaxed);
}

/// Sets mimalloc's options for this allocator: no purging of freed small blocks (the large
/// ones, whose re-faulting would cost, are the cache's). With the large-block path off,
/// mimalloc's defaults stay.
pub fn configure_mimalloc() {
    extern "C" {
        /// mimalloc's run-time option setter (linked in with the allocator).
        fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    }
    /// `mi_option_purge_delay` (index 15 in mimalloc v2 and v3).
    const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
    if ENABLED.load(Ordering::Relaxed) {
        // SAFETY: plain option setter of the linked allocator; any value is valid.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

fn is_large(layout: Layout) -> bool {
    layout.size() >= MIN_BLOCK && layout.align() <= PAGE && ENABLED.load(Ordering::Relaxed)
}

fn map_len(size: usize) -> usize {
    size.div_ceil(PAGE) * PAGE
}

/// Transparent huge pages: mappings of at least this size start on its boundary and are
/// advised as huge-page memory (as mimalloc does for its segments): a 4 KiB-page mapping costs
/// about 5 % of a ResNet step in TLB misses and page faults.
const HUGE: usize = 2 << 20;

#[cfg(unix)]
fn map(len: usize) -> *mut u8 {
    let over = if len >= HUGE { len + HUGE } else { len };
    // SAFETY: an anonymous private mapping; no existing memory is touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            over,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    if over == len {
        return p.cast();
    }
    // Trim the mapping to `len` bytes from the first huge-page boundary.
    let start = p as usize;
    let aligned = start.next_multiple_of(HUGE);
    // SAFETY: the head and tail are parts of the mapping just made, used by nobody; the kept
    // range lies inside it.
    unsafe {
        if aligned > start {
            libc::munmap(p, aligned - start);
        }
        let end = aligned + len;
        if start + over > end {
            libc::munmap(end as *mut libc::c_void, start + over - end);
        }
        #[cfg(target_os = "linux")]
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    aligned as *mut u8
}

#[cfg(unix)]
/// # Safety
/// `ptr`/`len` is a mapping made by [`map`] that nobody uses any more.
unsafe fn unmap(ptr: *mut u8, len: usize) {
    // SAFETY: as the caller promises.
    unsafe { libc::munmap(ptr.cast(), len) };
}

#[cfg(not(unix))]
fn map(_len: usize) -> *mut u8 {
    std::ptr::null_mut()
}

#[cfg(not(unix))]
unsafe fn unmap(_ptr: *mut u8, _len: usize) {}

impl Cache {
    /// Unmaps blocks freed more than [`MAX_AGE_MS`] before `now`.
    ///
    /// # Safety
    /// Every slot holds a mapping nobody uses.
    unsafe fn expire(&mut self, now: u64) {
        for s in self.slots.iter_mut() {
            if s.ptr != 0 && now.saturating_sub(s.freed_ms) > MAX_AGE_MS {
                // SAFETY: the slot's mapping is unused.
                unsafe { unmap(s.ptr as *mut u8, s.len) };
                self.bytes -= s.len;
                *s = EMPTY;
            }
        }
    }

    /// Takes a cached block of exactly this length, the most recently freed (its lines are
    /// the likeliest to be in the CPU caches still).
    fn take(&mut self, len: usize) -> Option<*mut u8> {
        let s = self
            .slots
            .iter_mut()
            .filter(|s| s.ptr != 0 && s.len == len)
            .max_by_key(|s| s.freed_ms)?;
        let p = s.ptr as *mut u8;
        self.bytes -= s.len;
        *s = EMPTY;
        Some(p)
    }

    /// Keeps a freed block; unmaps it (or older ones) when there is no room.
    ///
    /// # Safety
    /// `ptr`/`len` is a mapping made by [`map`] that nobody uses any more.
    unsafe fn keep(&mut self, ptr: *mut u8, len: usize, now: u64) {
        while self.bytes + len > MAX_CACHED || self.slots.iter().all(|s| s.ptr != 0) {
            let Some(oldest) = self
                .slots
                .iter_mut()
                .filter(|s| s.ptr != 0)
                .min_by_key(|s| s.freed_ms)
            else {
                break;
            };
            // SAFETY: the slot's mapping is unused.
            unsafe { unmap(oldest.ptr as *mut u8, oldest.len) };
            self.bytes -= oldest.len;
            *oldest = EMPTY;
        }
        match self.slots.iter_mut().find(|s| s.ptr == 0) {
            Some(s) if self.bytes + len <= MAX_CACHED => {
                *s = Slot {
                    ptr: ptr as usize,
                    len,
                    freed_ms: now,
                };
                self.bytes += len;
            }
            // SAFETY: as the caller promises.
            _ => unsafe { unmap(ptr, len) },
        }
    }
}

/// Bytes held in the cache now (freed large blocks waiting for reuse).
pub fn cached_bytes() -> usize {
    CACHE.lock().map(|c| c.bytes).unwrap_or(0)
}

/// Unmaps every cached block (before a phase that needs other sizes, such as evaluation).
pub fn release_cached() {
    if let Ok(mut c) = CACHE.lock() {
        // SAFETY: slots hold unused mappings; u64::MAX ages every one past the limit.
        unsafe { c.expire(u64::MAX) };
    }
}

/// mimalloc for small blocks, cached page mappings for large ones (see the module doc).
pub struct CachingAlloc;

impl CachingAlloc {
    /// A large block: from the cache, else freshly mapped (zeroed by the OS); `zeroed` asks
    /// for zeroes either way.
    fn alloc_large(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let len = map_len(layout.size());
        if let Ok(mut c) = CACHE.lock() {
            if let Some(p) = c.take(len) {
                drop(c);
                if zeroed {
                    // SAFETY: `p` is a mapping of `len >= size` bytes that we own now.
                    unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
                }
                return p;
            }
            // SAFETY: slots hold unused mappings.
            unsafe { c.expire(now_ms()) };
        }
        map(len)
    }
}

// SAFETY: a block is either mimalloc's (small, or over-aligned, or with the large path off:
// `is_large` is false for its layout, and a layout's size and alignment are the same at
// allocation and free) or a private mapping of `map_len(size)` bytes handed out once.
unsafe impl GlobalAlloc for CachingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_large(layout) {
            return self.alloc_large(layout, false);
        }
        // SAFETY: forwarded with the caller's valid layout.
        unsafe { MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_large(layout) {
            return self.alloc_large(layout, true);
        }
        // SAFETY: forwarded with the caller's valid layout.
        unsafe { MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !is_large(layout) {
            // SAFETY: `ptr` came from MiMalloc with `layout`.
            return unsafe { MiMalloc.dealloc(ptr, layout) };
        }
        let len = map_len(layout.size());
        match CACHE.lock() {
            Ok(mut c) => {
                let now = now_ms();
                // SAFETY: slots hold unused mappings; `ptr`/`len` is the caller's freed one.
                unsafe {
                    c.expire(now);
                    c.keep(ptr, len, now);
                }
            }
            // SAFETY: as above.
            Err(_) => unsafe { unmap(ptr, len) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees a valid non-zero size for this alignment.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !is_large(layout) && !is_large(new) {
            // SAFETY: a mimalloc block, staying one.
            return unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        }
        // Across the paths, or between mappings: a new block, the bytes copied.
        // SAFETY: `new` is valid; both blocks hold at least `min(old, new)` bytes.
        unsafe {
            let p = self.alloc(new);
            if !p.is_null() {
                std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            p
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    // The library's tests run on the system allocator; this calls the allocator's methods
    // directly. They share the global cache, so it is one test.
    #[test]
    fn reuses_exact_sizes_and_unmaps_old_blocks() {
        let a = CachingAlloc;
        let l = Layout::from_size_align(3 << 20, 64).unwrap();
        let other = Layout::from_size_align((3 << 20) + 2 * PAGE, 64).unwrap();
        unsafe {
            let p = a.alloc(l);
            assert!(!p.is_null());
            assert_eq!(p as usize % PAGE, 0);
            p.write_bytes(7, l.size());
            a.dealloc(p, l);
            assert_eq!(cached_bytes(), l.size());
            // A different length is not served from the cache.
            let q = a.alloc(other);
            assert_ne!(q, p);
            q.write_bytes(1, other.size());
            a.dealloc(q, other);
            assert_eq!(cached_bytes(), l.size() + other.size());
            // The same length gets the same block back, zeroed when asked.
            let z = a.alloc_zeroed(l);
            assert_eq!(z, p);
            assert!(std::slice::from_raw_parts(z, l.size())
                .iter()
                .all(|&b| b == 0));
            assert_eq!(cached_bytes(), other.size());
            a.dealloc(z, l);
            // Small and over-aligned blocks are mimalloc's, never cached.
            for small in [
                Layout::from_size_align(1000, 8).unwrap(),
                Layout::from_size_align(2 << 20, 2 * PAGE).unwrap(),
            ] {
                let s = a.alloc(small);
                assert_eq!(s as usize % small.align(), 0);
                s.write_bytes(3, small.size());
                a.dealloc(s, small);
            }
            assert_eq!(cached_bytes(), l.size() + other.size());
            // Old blocks are unmapped.
            CACHE.lock().unwrap().expire(now_ms() + MAX_AGE_MS + 1);
            assert_eq!(cached_bytes(), 0);
            // release_cached empties it at once; a fresh mapping reads as zeroes.
            let p = a.alloc_zeroed(l);
            assert!(std::slice::from_raw_parts(p, l.size())
                .iter()
                .all(|&b| b == 0));
            a.dealloc(p, l);
            assert_eq!(cached_bytes(), l.size());
            release_cached();
            assert_eq!(cached_bytes(), 0);
        }
    }
}

//! `BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH`, which aya 0.14
//! lacks: many entries per `bpf(2)` call instead of one.
//!
//! Typed over the handles aya built (`HashMap`, `Array`), whose construction checked the map's
//! type and its key and value sizes against `K` and `V`: the buffers below are exactly what the
//! kernel reads and writes. Per-CPU maps are not supported (their values are not `Pod`).
//!
//! Kernel semantics the code relies on (kernel/bpf/syscall.c, kernel/bpf/hashtab.c):
//! - LOOKUP_BATCH on a hash map walks buckets: the token (`in_batch`/`out_batch`) is a `u32`
//!   bucket index, whole buckets are copied, and a bucket larger than the room left ends the
//!   call (`ENOSPC` if nothing was copied yet). On an array the token is the last key copied.
//!   `ENOENT` means the walk reached the end; `count` still says how many entries were copied.
//!   `EBUSY`/`EAGAIN`/`EINTR` can end a call early with some entries copied and the token
//!   advanced past them.
//! - UPDATE_BATCH and DELETE_BATCH apply the entries in order and stop at the first one that
//!   fails; `count` says how many were applied before it.

use std::{
    io,
    mem::{self, size_of},
    os::fd::{AsFd, AsRawFd},
};

use anyhow::{bail, ensure, Context, Result};
use aya::{
    maps::{IterableMap, MapData},
    Pod,
};
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Consecutive calls that may end in `EBUSY`/`EAGAIN`/`EINTR` without any progress before a
/// batch operation gives up.
const MAX_RETRIES: u32 = 64;

/// At most this many entries per UPDATE/DELETE call (`count` is a `u32`; smaller calls also
/// bound how long one call holds the CPU in the kernel).
const MAX_WRITE_BATCH: usize = 1 << 16;

fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBUSY | libc::EAGAIN | libc::EINTR)
    )
}

/// One batch call on `map`. Returns the call's result and `count` as the kernel left it (only
/// meaningful for the errors the batch loops report it with: `ENOENT`, `ENOSPC`, `EBUSY`,
/// `EAGAIN`, `EINTR`, and success).
///
/// # Safety
/// `keys` and `values` (when not null) must point to buffers of `count` keys and values of the
/// map's sizes, writable for LOOKUP; `in_batch` (when not null) and `out_batch` to tokens of
/// the map's batch-token size; all of them alive for the call.
unsafe fn batch_call(
    cmd: bpf_cmd,
    map: &MapData,
    in_batch: *const u8,
    out_batch: *mut u8,
    keys: *const u8,
    values: *const u8,
    count: u32,
) -> (io::Result<()>, u32) {
    // SAFETY: `bpf_attr` is a C union of integers and integer arrays: all zeroes is a valid
    // value, and the kernel requires the bytes past the command's fields to be zero.
    let mut attr: bpf_attr = unsafe { mem::zeroed() };
    attr.batch.in_batch = in_batch as u64;
    attr.batch.out_batch = out_batch as u64;
    attr.batch.keys = keys as u64;
    attr.batch.values = values as u64;
    attr.batch.count = count;
    attr.batch.map_fd = map.fd().as_fd().as_raw_fd() as u32;
    // SAFETY: `attr` is initialised and lives across the call; the pointers in it are valid for
    // the sizes the kernel derives from the map and `count` (this function's contract); the
    // kernel writes back only into `attr` and those buffers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            &mut attr as *mut bpf_attr,
            size_of::<bpf_attr>(),
        )
    };
    let result = if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    };
    // SAFETY: the `batch` variant is the one initialised above (the kernel writes `count` in
    // place); reading a `u32` field of it is reading plain bytes.
    let count_out = unsafe { attr.batch.count };
    (result, count_out.min(count))
}

/// Reads a map's entries `chunk` at a time with LOOKUP_BATCH. The cursor holds no borrow of the
/// map between chunks: entries already handed out may be deleted between calls (on a hash map
/// the token is a bucket index, which deleting entries of visited buckets does not disturb).
pub struct BatchCursor<K, V> {
    /// The token to resume from (none before the first call).
    token: Vec<u8>,
    started: bool,
    out: Vec<u8>,
    keys: Vec<K>,
    values: Vec<V>,
    chunk: usize,
    done: bool,
}

impl<K: Pod, V: Pod> BatchCursor<K, V> {
    /// A cursor at the start of the map, asking for `chunk` entries per call (grown when a hash
    /// bucket holds more).
    pub fn new(chunk: usize) -> Self {
        let chunk = chunk.clamp(1, u32::MAX as usize);
        // A hash map's token is a u32; an array's is a key.
        let token_len = size_of::<K>().max(size_of::<u64>());
        Self {
            token: vec![0; token_len],
            started: false,
            out: vec![0; token_len],
            keys: Vec::with_capacity(chunk),
            values: Vec::with_capacity(chunk),
            chunk,
            done: false,
        }
    }

    /// The next entries of `map` (never an empty chunk), or `None` at the end.
    pub fn next<'a>(
        &'a mut self,
        map: &impl IterableMap<K, V>,
    ) -> Result<Option<(&'a [K], &'a [V])>> {
        let map = map.map();
        let mut retries = 0;
        loop {
            if self.done {
                return Ok(None);
            }
            self.keys.clear();
            self.values.clear();
            self.keys.reserve(self.chunk);
            self.values.reserve(self.chunk);
            let in_batch = if self.started {
                self.token.as_ptr()
            } else {
                std::ptr::null()
            };
            // SAFETY: `keys` and `values` have room for `chunk` entries of the map's key and
            // value sizes (aya checked them against K and V); both tokens are at least as long
            // as the map's token (a u32 for hash maps, a key for arrays).
            let (result, count) = unsafe {
                batch_call(
                    bpf_cmd::BPF_MAP_LOOKUP_BATCH,
                    map,
                    in_batch,
                    self.out.as_mut_ptr(),
                    self.keys.as_mut_ptr().cast(),
                    self.values.as_mut_ptr().cast(),
                    self.chunk as u32,
                )
            };
            let count = match result {
                Ok(()) => count,
                Err(e) => match e.raw_os_error() {
                    // The end of the map, with the last entries.
                    Some(libc::ENOENT) => {
                        self.done = true;
                        count
                    }
                    // A bucket holds more entries than a chunk: ask for more at once.
                    Some(libc::ENOSPC) if count == 0 => {
                        if self.chunk >= u32::MAX as usize {
                            return Err(e).context("BPF_MAP_LOOKUP_BATCH: a bucket too large");
                        }
                        self.chunk = self.chunk.saturating_mul(2).min(u32::MAX as usize);
                        continue;
                    }
                    _ if transient(&e) => {
                        if count == 0 {
                            retries += 1;
                            if retries > MAX_RETRIES {
                                return Err(e).context("BPF_MAP_LOOKUP_BATCH kept failing");
                            }
                            continue;
                        }
                        count
                    }
                    _ => return Err(e).context("BPF_MAP_LOOKUP_BATCH"),
                },
            };
            if count == 0 {
                if self.done {
                    return Ok(None);
                }
                // Success with nothing copied would loop forever on the same token.
                bail!("BPF_MAP_LOOKUP_BATCH returned no entries before the end of the map");
            }
            // The kernel moved the token past what it copied.
            mem::swap(&mut self.token, &mut self.out);
            self.started = true;
            // SAFETY: the kernel wrote `count` (≤ the capacity reserved above) whole keys and
            // values into the buffers; K and V are Pod, so any bytes are valid values.
            unsafe {
                self.keys.set_len(count as usize);
                self.values.set_len(count as usize);
            }
            return Ok(Some((&self.keys, &self.values)));
        }
    }
}

/// Every entry of `map`, read `chunk` entries per call.
pub fn lookup_all<K: Pod, V: Pod>(
    map: &impl IterableMap<K, V>,
    chunk: usize,
) -> Result<Vec<(K, V)>> {
    let mut cursor = BatchCursor::new(chunk);
    let mut out = Vec::new();
    while let Some((keys, values)) = cursor.next(map)? {
        out.extend(keys.iter().copied().zip(values.iter().copied()));
    }
    Ok(out)
}

/// Writes `values[i]` at `keys[i]` (BPF_ANY) with UPDATE_BATCH. On failure the error names the
/// index of the entry the kernel refused; the entries before it are written.
pub fn update_batch<K: Pod, V: Pod>(
    map: &mut impl IterableMap<K, V>,
    keys: &[K],
    values: &[V],
) -> Result<()> {
    ensure!(
        keys.len() == values.len(),
        "{} keys but {} values",
        keys.len(),
        values.len()
    );
    let map = map.map();
    let mut done = 0;
    let mut retries = 0;
    while done < keys.len() {
        let n = (keys.len() - done).min(MAX_WRITE_BATCH);
        // SAFETY: `keys[done..]` and `values[done..]` hold at least `n` entries of the map's
        // key and value sizes; UPDATE only reads them.
        let (result, count) = unsafe {
            batch_call(
                bpf_cmd::BPF_MAP_UPDATE_BATCH,
                map,
                std::ptr::null(),
                std::ptr::null_mut(),
                keys[done..].as_ptr().cast(),
                values[done..].as_ptr().cast(),
                n as u32,
            )
        };
        match result {
            Ok(()) => {
                done += n;
                retries = 0;
            }
            Err(e) if transient(&e) => {
                done += count as usize;
                retries = if count > 0 { 0 } else { retries + 1 };
                if retries > MAX_RETRIES {
                    return Err(e).with_context(|| {
                        format!("BPF_MAP_UPDATE_BATCH kept failing at entry {done}")
                    });
                }
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "BPF_MAP_UPDATE_BATCH: entry {} of {}",
                        done + count as usize,
                        keys.len()
                    )
                })
            }
        }
    }
    Ok(())
}

/// Deletes `keys` with DELETE_BATCH; returns how many were there. A key that is not in the map
/// (an LRU map evicted it, the program or another writer deleted it) is skipped: the kernel
/// stops the batch there with `ENOENT`, and the next call resumes after it.
pub fn delete_batch<K: Pod, V: Pod>(map: &mut impl IterableMap<K, V>, keys: &[K]) -> Result<usize> {
    let map = map.map();
    let mut done = 0;
    let mut deleted = 0;
    let mut retries = 0;
    while done < keys.len() {
        let n = (keys.len() - done).min(MAX_WRITE_BATCH);
        // SAFETY: `keys[done..]` holds at least `n` keys of the map's key size; DELETE only
        // reads them and no values.
        let (result, count) = unsafe {
            batch_call(
                bpf_cmd::BPF_MAP_DELETE_BATCH,
                map,
                std::ptr::null(),
                std::ptr::null_mut(),
                keys[done..].as_ptr().cast(),
                std::ptr::null(),
                n as u32,
            )
        };
        let count = count as usize;
        match result {
            Ok(()) => {
                done += n;
                deleted += n;
                retries = 0;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // Entries before `count` went; the one at `count` was not there.
                done += count + 1;
                deleted += count;
                retries = 0;
            }
            Err(e) if transient(&e) => {
                done += count;
                deleted += count;
                retries = if count > 0 { 0 } else { retries + 1 };
                if retries > MAX_RETRIES {
                    return Err(e).with_context(|| {
                        format!("BPF_MAP_DELETE_BATCH kept failing at entry {done}")
                    });
                }
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "BPF_MAP_DELETE_BATCH: entry {} of {}",
                        done + count,
                        keys.len()
                    )
                })
            }
        }
    }
    Ok(deleted)
}

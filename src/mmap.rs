//! Read-only file mappings: weights, checkpoints and recordings are read in place rather than
//! copied onto the heap, through this one mapping routine.

use std::fs::File;

use memmap2::Mmap;

/// Maps the whole of `file`, read-only.
pub(crate) fn map_readonly(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the mapping is read-only, so nothing in this process writes through it; a file
    // truncated or rewritten underneath us by another process is outside what any mmap-based
    // reader can defend against, and drape only maps files it was asked to read.
    unsafe { Mmap::map(file) }
}

//! Files that ship with drape — the demo model, the replay frames, a bench image, calibration
//! profiles — found wherever drape is run from, not only from the repository root.
//!
//! Looked for, in order: under `$DRAPE_HOME` when it is set (and only there: a wrong override
//! should fail, not be silently ignored); beside the executable and up to three folders above
//! it (`target/release/drape` in a clone, or `bin/drape` in an unpacked install); and in the
//! source tree the binary was built from (`cargo install --path .` leaves the assets there).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Environment variable naming the folder that holds drape's bundled files.
pub const HOME_ENV: &str = "DRAPE_HOME";
/// The demo model, relative to that folder.
pub const DEMO_WEIGHTS: &str = "weights/drape-tiny-r50.safetensors";
/// The replay frames `run`, `demo` and `calibrate` use without `--source`.
pub const DEMO_FRAMES: &str = "tests/fixtures/frames";
/// The photo `bench` uses without `--image`.
pub const BENCH_IMAGE: &str = "tests/fixtures/images/landscape.png";
/// Where `calibrate` writes and `run` looks for per-device profiles.
pub const PROFILES: &str = "calibration";
/// Folders above the executable that are searched.
const EXE_LEVELS: usize = 3;

/// Folders that may hold the bundled files, most specific first.
pub fn search_roots() -> Vec<PathBuf> {
    if let Some(home) = std::env::var_os(HOME_ENV) {
        return vec![PathBuf::from(home)];
    }
    let mut roots = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        let exe = exe.canonicalize().unwrap_or(exe);
        roots.extend(
            exe.ancestors()
                .skip(1)
                .take(EXE_LEVELS + 1)
                .map(Path::to_path_buf),
        );
    }
    let built_from = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if !roots.contains(&built_from) {
        roots.push(built_from);
    }
    roots
}

/// The bundled file or folder `relative` (one of the constants above).
pub fn find(relative: &str) -> Result<PathBuf> {
    let roots = search_roots();
    roots
        .iter()
        .map(|root| root.join(relative))
        .find(|path| path.exists())
        .ok_or_else(|| Error::AssetNotFound {
            name: relative.to_string(),
            looked_in: roots,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_files_are_found_from_the_build() {
        for name in [DEMO_WEIGHTS, DEMO_FRAMES, BENCH_IMAGE, PROFILES] {
            let path = find(name).unwrap();
            assert!(path.ends_with(name), "{}", path.display());
        }
    }
}

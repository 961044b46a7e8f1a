//! Kaggle iMaterialist 2019 submissions: `ImageId,EncodedPixels,ClassId`, one row per mask.
//! The competition required masks of one image not to overlap: here a pixel belongs to the
//! highest-scoring detection that covers it, and masks left empty are dropped.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::eval::imaterialist::class_id_of;
use crate::eval::{kaggle_rle, masks, EvalError};
use crate::postprocess::Instance;
use crate::rle::Rle;

pub const HEADER: &str = "ImageId,EncodedPixels,ClassId";
/// Kaggle rejected submissions that leave out an image; the competition's public kernels filled
/// such images with a one-pixel mask of class 23 (shoe), which costs at most that one pair.
pub const PLACEHOLDER_ROW: (&str, usize) = ("1 1", 23);

/// A detection's share of the image once higher-scoring masks have taken their pixels.
#[derive(Debug, Clone)]
pub struct ExclusiveMask {
    pub class_id: usize,
    pub score: f32,
    pub mask: Rle,
}

/// The masks of `instances` scoring at least `min_score`, made disjoint: each pixel goes to
/// the highest-scoring mask covering it (ties to the earlier instance); empty results are
/// dropped. Instances without a mask (beyond a mask cap) are skipped.
pub fn non_overlapping(instances: &[Instance], min_score: f32) -> Vec<ExclusiveMask> {
    let mut ranked: Vec<(&Instance, &Rle)> = instances
        .iter()
        .filter(|i| i.score >= min_score)
        .filter_map(|i| Some((i, i.mask.as_ref()?)))
        .collect();
    ranked.sort_by(|a, b| b.0.score.total_cmp(&a.0.score));
    let mut out = Vec::with_capacity(ranked.len());
    let mut taken: Option<Rle> = None;
    for (instance, mask) in ranked {
        let own = match &taken {
            None => mask.clone(),
            Some(t) => masks::merge(mask, t, |m, t| m && !t),
        };
        if own.area() == 0 {
            continue;
        }
        taken = Some(match taken {
            None => own.clone(),
            Some(t) => masks::merge(&t, &own, |a, b| a || b),
        });
        out.push(ExclusiveMask {
            class_id: instance.class_id,
            score: instance.score,
            mask: own,
        });
    }
    out
}

/// The PNG and JPEG files of `dir`, sorted by name.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>, EvalError> {
    let io = |error| EvalError::Io {
        path: dir.to_path_buf(),
        error,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        if matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) && path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Writes a submission to a temporary file beside `path` and renames it into place once
/// complete, so an interrupted run never leaves a truncated file behind.
pub struct SubmissionWriter {
    path: PathBuf,
    file: std::io::BufWriter<tempfile::NamedTempFile>,
    /// Data rows written so far.
    pub rows: usize,
}

impl SubmissionWriter {
    pub fn create(path: &Path) -> Result<Self, EvalError> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let temp = tempfile::NamedTempFile::new_in(dir).map_err(|error| EvalError::Io {
            path: dir.to_path_buf(),
            error,
        })?;
        let mut writer = Self {
            path: path.to_path_buf(),
            file: std::io::BufWriter::new(temp),
            rows: 0,
        };
        writer.line(HEADER)?;
        Ok(writer)
    }

    fn line(&mut self, text: &str) -> Result<(), EvalError> {
        writeln!(self.file, "{text}").map_err(|error| EvalError::Io {
            path: self.path.clone(),
            error,
        })
    }

    /// The rows of one image; a placeholder row when no mask survived.
    pub fn image(&mut self, image_id: &str, masks: &[ExclusiveMask]) -> Result<(), EvalError> {
        if masks.is_empty() {
            let (pixels, class) = PLACEHOLDER_ROW;
            self.line(&format!("{image_id},{pixels},{class}"))?;
            self.rows += 1;
        }
        for m in masks {
            let mut row = format!("{image_id},");
            kaggle_rle::write(&m.mask, &mut row);
            row.push_str(&format!(",{}", class_id_of(m.class_id)));
            self.line(&row)?;
            self.rows += 1;
        }
        Ok(())
    }

    /// Flushes and renames the file into place.
    pub fn finish(self) -> Result<usize, EvalError> {
        let io = |error| EvalError::Io {
            path: self.path.clone(),
            error,
        };
        let temp = self.file.into_inner().map_err(|e| io(e.into_error()))?;
        temp.as_file().sync_all().map_err(io)?;
        temp.persist(&self.path).map_err(|e| io(e.error))?;
        Ok(self.rows)
    }
}

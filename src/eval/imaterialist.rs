//! iMaterialist (Fashion) 2019 `train.csv`: one row per mask,
//! `ImageId,EncodedPixels,Height,Width,ClassId`, where `EncodedPixels` is Kaggle's RLE
//! ([`super::kaggle_rle`]) and `ClassId` is the category, optionally followed by
//! attribute ids (`"31_115_136"`); attributes are not evaluated and are dropped. The 2020 file's
//! extra `AttributesIds` column (quoted, with commas) is accepted and ignored.
//!
//! iMaterialist ClassId `k` is torchvision label `k + 1` (label 0 is background).

use std::collections::HashMap;
use std::path::Path;

use crate::eval::kaggle_rle;
use crate::eval::{Dataset, EvalError, GtImage, GtObject};

/// Columns the reader needs, found by name in the header.
const COLUMNS: [&str; 5] = ["ImageId", "EncodedPixels", "Height", "Width", "ClassId"];

/// The torchvision label of iMaterialist ClassId `class_id`.
pub fn label_of(class_id: usize) -> usize {
    class_id + 1
}

/// The iMaterialist ClassId of torchvision label `label` (≥ 1).
pub fn class_id_of(label: usize) -> usize {
    label - 1
}

/// Reads `path`; ClassIds must name one of the `num_classes - 1` foreground classes of the
/// model.
pub fn read_train_csv(path: &Path, num_classes: usize) -> Result<Dataset, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|error| EvalError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    parse_train_csv(&text, path, num_classes)
}

/// [`read_train_csv`] on text already read; `path` only names the file in errors. Images keep
/// the order of their first row.
pub fn parse_train_csv(text: &str, path: &Path, num_classes: usize) -> Result<Dataset, EvalError> {
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    let malformed = |line: usize, reason: String| EvalError::Csv {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let (_, header) = lines
        .next()
        .ok_or_else(|| malformed(1, "empty file: expected a header".to_owned()))?;
    let header = split_row(header).map_err(|reason| malformed(1, reason))?;
    let mut column = [0usize; COLUMNS.len()];
    for (slot, name) in column.iter_mut().zip(COLUMNS) {
        *slot = header
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| malformed(1, format!("header {header:?} has no `{name}` column")))?;
    }
    let [id_col, pixels_col, height_col, width_col, class_col] = column;

    let mut images: Vec<GtImage> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (line, row) in lines {
        if row.trim().is_empty() {
            continue;
        }
        let fields = split_row(row).map_err(|reason| malformed(line, reason))?;
        if fields.len() != header.len() {
            return Err(malformed(
                line,
                format!(
                    "{} fields where the header has {}",
                    fields.len(),
                    header.len()
                ),
            ));
        }
        let size = |col: usize, name: &str| {
            fields[col]
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| {
                    malformed(
                        line,
                        format!("{name} `{}` is not a positive integer", fields[col]),
                    )
                })
        };
        let (height, width) = (size(height_col, "Height")?, size(width_col, "Width")?);
        let class_field = fields[class_col].trim();
        let category = class_field.split('_').next().unwrap_or_default();
        let class_id: usize = category.parse().map_err(|_| {
            malformed(
                line,
                format!("ClassId `{class_field}` does not start with a category number"),
            )
        })?;
        if label_of(class_id) >= num_classes {
            return Err(EvalError::UnknownClass {
                path: path.to_path_buf(),
                line,
                class_id,
                categories: num_classes.saturating_sub(1),
            });
        }
        let encoded = fields[pixels_col].trim();
        if encoded.is_empty() {
            return Err(malformed(line, "EncodedPixels is empty".to_owned()));
        }
        let mask = kaggle_rle::decode(encoded, height, width).map_err(|reason| EvalError::Rle {
            path: path.to_path_buf(),
            line,
            reason,
        })?;

        let name = fields[id_col].trim();
        let slot = *index.entry(name.to_owned()).or_insert_with(|| {
            images.push(GtImage {
                name: name.to_owned(),
                height,
                width,
                objects: Vec::new(),
            });
            images.len() - 1
        });
        let image = &mut images[slot];
        if (image.height, image.width) != (height, width) {
            return Err(malformed(
                line,
                format!(
                    "ImageId `{name}` was {}x{} (width x height) on an earlier row, \
                     {width}x{height} here",
                    image.width, image.height
                ),
            ));
        }
        image.objects.push(GtObject {
            class_id: label_of(class_id),
            mask,
            iscrowd: false,
        });
    }
    Ok(Dataset {
        images,
        categories: (1..num_classes).collect(),
    })
}

/// Splits one CSV row at commas outside double quotes; `""` inside quotes is a quote.
fn split_row(row: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = row.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    if quoted {
        return Err("unterminated quoted field".to_owned());
    }
    fields.push(field);
    Ok(fields)
}

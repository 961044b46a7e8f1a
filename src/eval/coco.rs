//! COCO instance annotations (`instances_*.json`, also Fashionpedia's): `images` (`id`,
//! `file_name`, `height`, `width`), `categories` (`id`) and `annotations` (`image_id`,
//! `category_id`, `iscrowd`, `segmentation`). A segmentation is a list of polygons, rasterised
//! with pycocotools' `rleFrPoly` and merged ([`masks::from_polygon`]), or an RLE whose `counts`
//! are a compressed string or a list of uncompressed run lengths, as pycocotools' `annToRLE`
//! accepts them.
//!
//! Category id `c` is torchvision label `c + label_offset`: 0 for torchvision's own COCO
//! convention (`coco_utils.py` uses `category_id` as the label), 1 for Fashionpedia, whose ids
//! start at 0.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;

use crate::eval::masks;
use crate::eval::{Dataset, EvalError, GtImage, GtObject};
use crate::rle::Rle;

/// Fewer coordinates than a triangle: pycocotools would read four numbers as a box instead.
const MIN_POLYGON_COORDS: usize = 6;

#[derive(Deserialize)]
struct InstancesFile {
    images: Vec<ImageEntry>,
    #[serde(default)]
    annotations: Vec<Annotation>,
    categories: Vec<Category>,
}

#[derive(Deserialize)]
struct ImageEntry {
    id: u64,
    file_name: String,
    height: usize,
    width: usize,
}

#[derive(Deserialize)]
struct Category {
    id: u64,
}

#[derive(Deserialize)]
struct Annotation {
    id: u64,
    image_id: u64,
    category_id: u64,
    segmentation: Segmentation,
    #[serde(default)]
    iscrowd: u8,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Segmentation {
    Polygons(Vec<Vec<f64>>),
    Rle { size: [usize; 2], counts: Counts },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Counts {
    Compressed(String),
    Uncompressed(Vec<u32>),
}

/// Reads `path` for a model with `num_classes` classes (background included). Images come
/// sorted by id, the order pycocotools evaluates them in.
pub fn read_instances(
    path: &Path,
    num_classes: usize,
    label_offset: usize,
) -> Result<Dataset, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|error| EvalError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    parse_instances(&text, path, num_classes, label_offset)
}

/// [`read_instances`] on text already read; `path` only names the file in errors.
pub fn parse_instances(
    text: &str,
    path: &Path,
    num_classes: usize,
    label_offset: usize,
) -> Result<Dataset, EvalError> {
    let file: InstancesFile = serde_json::from_str(text).map_err(|e| EvalError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        reason: e.to_string(),
    })?;
    let error = |item: String, reason: String| EvalError::Coco {
        path: path.to_path_buf(),
        item,
        reason,
    };

    let mut entries = file.images;
    entries.sort_by_key(|i| i.id);
    let mut by_id: HashMap<u64, usize> = HashMap::new();
    for (index, entry) in entries.iter().enumerate() {
        if by_id.insert(entry.id, index).is_some() {
            return Err(error(
                format!("image {}", entry.id),
                "the id appears twice".to_owned(),
            ));
        }
    }
    // Category id -> label, for the categories the model can predict; the rest can only
    // matter through an annotation, which is then an error.
    let mut labels: BTreeMap<u64, usize> = BTreeMap::new();
    for c in &file.categories {
        let label = usize::try_from(c.id)
            .ok()
            .and_then(|id| id.checked_add(label_offset));
        if let Some(label) = label.filter(|l| (1..num_classes).contains(l)) {
            labels.insert(c.id, label);
        }
    }
    let mut images: Vec<GtImage> = entries
        .into_iter()
        .map(|e| GtImage {
            name: e.file_name,
            height: e.height,
            width: e.width,
            objects: Vec::new(),
        })
        .collect();

    for a in file.annotations {
        let item = || format!("annotation {}", a.id);
        let &index = by_id.get(&a.image_id).ok_or_else(|| {
            error(
                item(),
                format!("image_id {} is not in `images`", a.image_id),
            )
        })?;
        let image = &mut images[index];
        let class_id = match labels.get(&a.category_id) {
            Some(&label) => label,
            None if file.categories.iter().any(|c| c.id == a.category_id) => {
                return Err(error(
                    item(),
                    format!(
                        "category_id {} + label offset {label_offset} is not one of the model's \
                         labels 1..{num_classes}",
                        a.category_id
                    ),
                ))
            }
            None => {
                return Err(error(
                    item(),
                    format!("category_id {} is not in `categories`", a.category_id),
                ))
            }
        };
        let mask = rasterise(&a.segmentation, image.height, image.width)
            .map_err(|reason| error(item(), reason))?;
        image.objects.push(GtObject {
            class_id,
            mask,
            iscrowd: a.iscrowd != 0,
        });
    }
    Ok(Dataset {
        images,
        categories: labels.into_values().collect(),
    })
}

/// pycocotools' `annToRLE` for an image of `height × width`.
fn rasterise(segmentation: &Segmentation, height: usize, width: usize) -> Result<Rle, String> {
    match segmentation {
        Segmentation::Polygons(polygons) => {
            let mut parts = polygons.iter().map(|p| {
                if p.len() < MIN_POLYGON_COORDS || p.len() % 2 != 0 {
                    return Err(format!(
                        "a polygon needs an even number of at least {MIN_POLYGON_COORDS} \
                         coordinates, this one has {}",
                        p.len()
                    ));
                }
                Ok(masks::from_polygon(p, height, width))
            });
            let first = parts
                .next()
                .ok_or_else(|| "the segmentation is an empty list of polygons".to_owned())??;
            parts.try_fold(first, |union, part| {
                Ok(masks::merge(&union, &part?, |a, b| a || b))
            })
        }
        Segmentation::Rle { size, counts } => {
            if *size != [height, width] {
                return Err(format!(
                    "RLE size {size:?} differs from the image's [height, width] [{height}, {width}]"
                ));
            }
            match counts {
                Counts::Compressed(s) => masks::from_coco_string(s, height, width),
                Counts::Uncompressed(c) => masks::from_counts(c.clone(), height, width),
            }
        }
    }
}

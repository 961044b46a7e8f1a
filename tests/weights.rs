//! Every way a weights file can be wrong ends in an error that names the problem; the older
//! torchvision key spellings and the f32/bf16 dtypes load.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use common::Stored;
use drape::MaskRcnn;
use safetensors::Dtype;

fn write(dir: &Path, file: &str, tensors: &[Stored], meta: &HashMap<String, String>) -> PathBuf {
    let path = dir.join(file);
    common::write_safetensors(&path, tensors, meta);
    path
}

/// A copy of the tiny model with `edit` applied.
fn variant(
    dir: &Path,
    file: &str,
    edit: impl FnOnce(&mut Vec<Stored>, &mut HashMap<String, String>),
) -> PathBuf {
    let (mut tensors, mut meta) = common::read_safetensors(&common::tiny_weights());
    edit(&mut tensors, &mut meta);
    write(dir, file, &tensors, &meta)
}

fn load(path: &Path) -> drape::Result<MaskRcnn> {
    MaskRcnn::load(path, |_| {}, &Device::Cpu)
}

#[test]
fn bad_files_get_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let original = std::fs::read(common::tiny_weights()).unwrap();
    let raw = |file: &str, bytes: &[u8]| {
        let p = d.join(file);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let truncated = raw("truncated.safetensors", &original[..original.len() / 2]);
    let empty = raw("empty.safetensors", &[]);
    let random = raw(
        "random.safetensors",
        &(0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<_>>(),
    );
    let png = raw(
        "image.safetensors",
        &std::fs::read(common::fixtures().join("images/odd.png")).unwrap(),
    );
    // A header whose offsets make two tensors overlap.
    let lying = {
        let n = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
        let mut header: serde_json::Value = serde_json::from_slice(&original[8..8 + n]).unwrap();
        let name = "backbone.fpn.layer_blocks.1.0.weight";
        header[name]["data_offsets"][0] = serde_json::json!(0);
        let text = serde_json::to_vec(&header).unwrap();
        let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&text);
        bytes.extend_from_slice(&original[8 + n..]);
        raw("lying.safetensors", &bytes)
    };

    let missing = variant(d, "missing.safetensors", |t, _| {
        t.retain(|t| t.name != "roi_heads.box_head.fc7.bias")
    });
    let unexpected = variant(d, "unexpected.safetensors", |t, _| {
        t.push(Stored {
            name: "roi_heads.keypoint_head.0.weight".into(),
            dtype: Dtype::F16,
            shape: vec![2],
            data: vec![0; 4],
        })
    });
    let wrong_shape = variant(d, "shape.safetensors", |t, _| {
        let s = common::stored_mut(t, "backbone.fpn.layer_blocks.1.0.weight");
        s.shape = vec![32, 32 * 9, 1, 1];
    });
    let int_dtype = variant(d, "dtype.safetensors", |t, _| {
        let s = common::stored_mut(t, "rpn.head.cls_logits.bias");
        s.dtype = Dtype::I16;
    });
    let nan = variant(d, "nan.safetensors", |t, _| {
        let s = common::stored_mut(t, "roi_heads.box_head.fc6.weight");
        s.data[20..22].copy_from_slice(&half::f16::NAN.to_le_bytes());
    });
    let bad_labels = variant(d, "labels.safetensors", |_, m| {
        m.insert("labels".into(), r#"["shirt", "pants"]"#.into());
    });
    let bad_eps = variant(d, "eps.safetensors", |_, m| {
        m.insert("bn_eps".into(), "tiny".into());
    });
    let bad_size = variant(d, "size.safetensors", |_, m| {
        m.insert("min_size".into(), "0".into());
    });
    let huge_size = variant(d, "huge-size.safetensors", |_, m| {
        m.insert("max_size".into(), "200000".into());
    });
    let max_size = variant(d, "u64-size.safetensors", |_, m| {
        m.insert("min_size".into(), u64::MAX.to_string());
    });
    // The stem conv and its BatchNorm with zero output channels.
    let zero_channels = variant(d, "zero.safetensors", |t, _| {
        for s in t.iter_mut() {
            if s.name.starts_with("backbone.body.conv1.")
                || s.name.starts_with("backbone.body.bn1.")
            {
                s.shape[0] = 0;
                s.data.clear();
            }
        }
    });
    // One Bottleneck block stripped of its third conv.
    let broken_block = variant(d, "block.safetensors", |t, _| {
        t.retain(|t| {
            !t.name.starts_with("backbone.body.layer2.0.conv3")
                && !t.name.starts_with("backbone.body.layer2.0.bn3")
        })
    });

    // (file, error kind, substrings the message must contain)
    let cases: Vec<(PathBuf, &str, Vec<&str>)> = vec![
        (
            d.join("absent.safetensors"),
            "Io",
            vec!["absent.safetensors"],
        ),
        (empty, "NotSafetensors", vec!["empty.safetensors"]),
        (random, "NotSafetensors", vec!["random.safetensors"]),
        (png, "NotSafetensors", vec!["image.safetensors"]),
        (
            truncated,
            "Truncated",
            vec!["truncated.safetensors", "truncated"],
        ),
        (
            lying,
            "NotSafetensors",
            vec!["lying.safetensors", "backbone.fpn.layer_blocks.1.0.weight"],
        ),
        (
            missing,
            "MissingTensor",
            vec!["roi_heads.box_head.fc7.bias"],
        ),
        (
            unexpected,
            "UnexpectedTensor",
            vec!["roi_heads.keypoint_head.0.weight"],
        ),
        (
            wrong_shape,
            "Shape",
            vec![
                "backbone.fpn.layer_blocks.1.0.weight",
                "[32, 32, 3, 3]",
                "[32, 288, 1, 1]",
            ],
        ),
        (int_dtype, "Dtype", vec!["rpn.head.cls_logits.bias", "I16"]),
        (
            nan,
            "NonFinite",
            vec!["roi_heads.box_head.fc6.weight", "NaN"],
        ),
        (bad_labels, "Metadata", vec!["labels", "2 names for 46"]),
        (bad_eps, "Metadata", vec!["bn_eps", "tiny"]),
        (bad_size, "Metadata", vec!["min_size"]),
        (huge_size, "Metadata", vec!["max_size", "200000"]),
        (
            max_size,
            "Metadata",
            vec!["min_size", "18446744073709551615"],
        ),
        (zero_channels, "Shape", vec!["backbone.body.conv1.weight"]),
        (
            broken_block,
            "MissingTensor",
            vec!["backbone.body.layer2.0.conv3.weight"],
        ),
    ];
    let mut failures = Vec::new();
    for (path, kind, needles) in cases {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let err = match load(&path) {
            Ok(_) => {
                failures.push(format!("{file}: loaded without error"));
                continue;
            }
            Err(e) => e,
        };
        let got = format!("{err:?}");
        let msg = err.to_string();
        if !got.starts_with(kind) {
            failures.push(format!("{file}: expected {kind}, got {got}"));
        }
        for n in needles {
            if !msg.contains(n) {
                failures.push(format!("{file}: message {msg:?} lacks {n:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn detect(model: &MaskRcnn) -> drape::Detections {
    let im = drape::image_io::load_rgb(common::fixtures().join("images/landscape.png")).unwrap();
    model
        .detect(im.as_raw(), (im.height() as usize, im.width() as usize))
        .unwrap()
}

fn same_instances(a: &drape::Detections, b: &drape::Detections) -> bool {
    a.instances.len() == b.instances.len()
        && a.instances.iter().zip(&b.instances).all(|(x, y)| {
            x.class_id == y.class_id && x.score == y.score && x.bbox == y.bbox && x.mask == y.mask
        })
}

#[test]
fn old_torchvision_key_spellings_load_identically() {
    let dir = tempfile::tempdir().unwrap();
    let old = variant(dir.path(), "old.safetensors", |t, _| {
        for s in t.iter_mut() {
            let renamed = s
                .name
                .replace("rpn.head.conv.0.0.", "rpn.head.conv.")
                .replace(".0.weight", ".weight")
                .replace(".0.bias", ".bias");
            if let Some(rest) = s.name.strip_prefix("roi_heads.mask_head.") {
                let (i, leaf) = rest.split_once(".0.").unwrap();
                s.name = format!(
                    "roi_heads.mask_head.mask_fcn{}.{leaf}",
                    i.parse::<usize>().unwrap() + 1
                );
            } else if s.name.starts_with("backbone.fpn.") || s.name.starts_with("rpn.head.conv.") {
                s.name = renamed;
            }
        }
        assert!(t
            .iter()
            .any(|s| s.name == "roi_heads.mask_head.mask_fcn4.weight"));
        assert!(t
            .iter()
            .any(|s| s.name == "backbone.fpn.inner_blocks.3.weight"));
        assert!(t.iter().any(|s| s.name == "rpn.head.conv.weight"));
    });
    let a = detect(&load(&common::tiny_weights()).unwrap());
    let b = detect(&load(&old).unwrap());
    assert!(!a.instances.is_empty());
    assert!(same_instances(&a, &b));
}

#[test]
fn f32_and_bf16_files_load() {
    let dir = tempfile::tempdir().unwrap();
    let convert = |file: &str, dtype: Dtype| {
        variant(dir.path(), file, |t, _| {
            for s in t.iter_mut() {
                let values = s.values().into_iter();
                s.data = match dtype {
                    Dtype::F32 => values.flat_map(f32::to_le_bytes).collect(),
                    _ => values
                        .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
                        .collect(),
                };
                s.dtype = dtype;
            }
        })
    };
    let f16 = detect(&load(&common::tiny_weights()).unwrap());
    // f16 values widen to f32 exactly: the same file in f32 gives the same result.
    let f32_file = convert("f32.safetensors", Dtype::F32);
    assert!(same_instances(&f16, &detect(&load(&f32_file).unwrap())));
    // bf16 keeps 8 mantissa bits to f16's 10: the weights move by up to 0.4%, so most
    // confident instances must survive with their class and nearly their box and score (bytes
    // read with the wrong dtype would give garbage instead).
    let bf16 = detect(&load(&convert("bf16.safetensors", Dtype::BF16)).unwrap());
    let confident: Vec<_> = f16.instances.iter().filter(|i| i.score >= 0.3).collect();
    assert!(
        confident.len() >= 5,
        "{} confident instances",
        confident.len()
    );
    let kept = confident
        .iter()
        .filter(|a| {
            bf16.instances.iter().any(|b| {
                b.class_id == a.class_id
                    && (b.score - a.score).abs() <= 0.05
                    && common::box_iou(&a.bbox, &b.bbox) >= 0.9
            })
        })
        .count();
    // Measured: 16 of 20 on the landscape photo; a misread dtype keeps none.
    assert!(
        kept * 10 >= confident.len() * 7,
        "bf16 kept {kept} of {}",
        confident.len()
    );
}

#[test]
fn architecture_and_labels_come_from_the_file() {
    let r50 = load(&common::tiny_weights()).unwrap();
    let a = r50.architecture();
    assert_eq!(a.block, "Bottleneck");
    assert_eq!(a.blocks_per_stage, [1, 1, 1, 1]);
    assert_eq!(a.num_classes, 47);
    assert_eq!(r50.label(1), "shirt, blouse");
    assert_eq!(r50.label(46), "tassel");
    assert_eq!(a.variant, "v1");
    let r101 = load(&common::fixtures().join("tiny_r101/model.safetensors")).unwrap();
    assert_eq!(r101.architecture().backbone, "ResNet-101");
    assert_eq!(r101.architecture().blocks_per_stage, [3, 4, 23, 3]);
    let v2 = load(&common::fixtures().join("tiny_v2/model.safetensors")).unwrap();
    assert_eq!(v2.architecture().variant, "v2");
    assert_eq!(v2.architecture().representation_size, 64);
    assert_eq!(v2.architecture().mask_layers, vec![32; 4]);
    let r18 = load(&common::fixtures().join("tiny_r18/model.safetensors")).unwrap();
    assert_eq!(r18.architecture().block, "BasicBlock");
    assert_eq!(r18.architecture().bn_eps, 0.0);
    assert_eq!(r18.architecture().num_classes, 6);
    assert_eq!(r18.label(1), "shirt");
}

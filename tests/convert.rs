//! `drape convert` and `drape inspect` as a user runs them, on checkpoints torch.save wrote
//! (`calibration/make_checkpoints.py`: the tiny R50 fixture's weights, saved bare, wrapped, in
//! both formats, strided; plus tiny bad ones). Every good checkpoint must convert to exactly the
//! fixture's f16 tensors and detect exactly what the fixture detects; every bad input must be
//! refused with an error that names the problem, leaving nothing in the output directory.
//!
//! After `make_fixtures.py` rewrites the tiny model, rerun `make_checkpoints.py`.

mod common;

use std::collections::HashMap;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::Device;
use common::Stored;
use drape::MaskRcnn;
use safetensors::Dtype;
use sha2::{Digest, Sha256};

fn drape(args: &[&str]) -> Output {
    common::drape_command().args(args).output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn checkpoint(name: &str) -> PathBuf {
    common::fixtures().join("checkpoints").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A safetensors file's tensors by name, and its metadata.
fn read(path: &Path) -> (HashMap<String, Stored>, HashMap<String, String>) {
    let (tensors, meta) = common::read_safetensors(path);
    let by_name = tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
    (by_name, meta)
}

fn sha256(path: &Path) -> String {
    Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn load(path: &Path) -> MaskRcnn {
    MaskRcnn::load(path, |_| {}, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"))
}

/// Every instance, exactly (Debug prints floats in full).
fn detections(model: &MaskRcnn) -> String {
    let image = drape::image_io::load_rgb(common::fixtures().join("images/landscape.png")).unwrap();
    let size = (image.height() as usize, image.width() as usize);
    let result = model.detect(image.as_raw(), size).unwrap();
    assert!(!result.instances.is_empty());
    format!("{:?}", result.instances)
}

#[test]
fn good_checkpoints_convert_to_the_fixture_and_detect_the_same() {
    let (reference, _) = read(&common::tiny_weights());
    let expected = detections(&load(&common::tiny_weights()));
    let dir = tempfile::tempdir().unwrap();
    // (checkpoint, extra flags, what the summary must say)
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            "zip_bare_mixed.pth",
            &[],
            &[
                "zip archive",
                "bare state_dict",
                "17 num_batches_tracked dropped",
            ],
        ),
        ("legacy_bare_f16.pth", &[], &["legacy stream"]),
        ("zip_training.pth", &[], &["state_dict under `model`"]),
        ("zip_training.pth", &["--key", "model"], &["under `model`"]),
        (
            "zip_dataparallel_strided.pth",
            &[],
            &["under `state_dict`", "`module.` prefix stripped"],
        ),
    ];
    for (i, (file, flags, says)) in cases.iter().enumerate() {
        let input = checkpoint(file);
        let out = dir.path().join(format!("{i}.safetensors"));
        let mut args = vec!["convert", s(&input), s(&out)];
        args.extend(["--min-size", "160", "--max-size", "224"]);
        args.extend(*flags);
        let run = drape(&args);
        let log = text(&run);
        assert!(run.status.success(), "{file}: {log}");
        for phrase in *says {
            assert!(
                log.contains(phrase),
                "{file}: summary lacks {phrase:?}: {log}"
            );
        }
        assert!(log.contains("1.5 MB"), "{file}: {log}");

        let (tensors, meta) = read(&out);
        assert_eq!(tensors.len(), reference.len(), "{file}");
        for (name, r) in &reference {
            let t = tensors
                .get(name)
                .unwrap_or_else(|| panic!("{file}: `{name}` missing"));
            assert_eq!(t.dtype, Dtype::F16, "{file}: {name}");
            assert_eq!(t.shape, r.shape, "{file}: {name}");
            assert!(
                t.data == r.data,
                "{file}: `{name}` differs from the fixture"
            );
        }
        let labels: Vec<String> = serde_json::from_str(&meta["labels"]).unwrap();
        assert_eq!(labels, drape::labels::IMATERIALIST_2019, "{file}");
        assert_eq!(meta["bn_eps"].parse::<f32>().unwrap(), 1e-5, "{file}");
        assert_eq!(meta["min_size"], "160", "{file}");
        assert_eq!(meta["max_size"], "224", "{file}");
        assert_eq!(meta["source_sha256"], sha256(&input), "{file}");
        assert_eq!(
            meta["converter"],
            format!("drape {}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(
            detections(&load(&out)),
            expected,
            "{file}: detections differ"
        );
    }
}

#[test]
fn precision_loss_is_reported_per_tensor() {
    // The f32 tensors of this checkpoint hold values below f16's normal range that round to
    // the fixture's subnormals: exact output, but the loss must be reported.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w.safetensors");
    let run = drape(&["convert", s(&checkpoint("zip_bare_mixed.pth")), s(&out)]);
    assert!(run.status.success(), "{}", text(&run));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("warning: 414 values in") && stderr.contains("lost precision"),
        "{stderr}"
    );
    // Each named tensor with its count, most affected first.
    assert!(stderr.contains("` 1") || stderr.contains("` 2"), "{stderr}");
    // A checkpoint already in f16 loses nothing.
    let out = dir.path().join("legacy.safetensors");
    let run = drape(&["convert", s(&checkpoint("legacy_bare_f16.pth")), s(&out)]);
    assert!(run.status.success(), "{}", text(&run));
    assert!(!text(&run).contains("warning"), "{}", text(&run));
}

#[test]
fn dtype_and_labels_flags() {
    let (reference, _) = read(&common::tiny_weights());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (flag, dtype) in [("f32", Dtype::F32), ("bf16", Dtype::BF16)] {
        let out = d.join(format!("{flag}.safetensors"));
        let ckpt = checkpoint("zip_training.pth");
        let run = drape(&["convert", s(&ckpt), s(&out), "--dtype", flag]);
        assert!(run.status.success(), "{}", text(&run));
        let (tensors, _) = read(&out);
        for (name, r) in &reference {
            let t = &tensors[name];
            assert_eq!(t.dtype, dtype, "{name}");
            let expected: Vec<u8> = match dtype {
                Dtype::F32 => r.values().iter().flat_map(|v| v.to_le_bytes()).collect(),
                _ => r
                    .values()
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            };
            assert!(t.data == expected, "--dtype {flag}: `{name}` differs");
        }
        load(&out);
    }

    let names: Vec<String> = (1..47).map(|k| format!("garment {k}")).collect();
    let json = d.join("labels.json");
    std::fs::write(&json, serde_json::to_string(&names).unwrap()).unwrap();
    let txt = d.join("labels.txt");
    std::fs::write(&txt, format!("__background__\n{}\n\n", names.join("\n"))).unwrap();
    for (i, labels) in [&json, &txt].into_iter().enumerate() {
        let out = d.join(format!("labels{i}.safetensors"));
        let ckpt = checkpoint("zip_training.pth");
        let run = drape(&[
            "convert",
            s(&ckpt),
            s(&out),
            "--labels",
            s(labels),
            "--bn-eps",
            "0",
        ]);
        assert!(run.status.success(), "{}", text(&run));
        let (_, meta) = read(&out);
        let written: Vec<String> = serde_json::from_str(&meta["labels"]).unwrap();
        assert_eq!(written, names, "{}", labels.display());
        assert_eq!(meta["bn_eps"], "0");
        let model = load(&out);
        assert_eq!(model.label(46), "garment 46");
        assert_eq!(model.architecture().bn_eps, 0.0);
    }
}

// ----------------------------------------------------------------------------- bad inputs

/// A little pickle writer for inputs torch.save would never produce: opcodes from CPython's
/// `Lib/pickletools.py`, laid out as torch.save lays out a state_dict.
struct Pickler(Vec<u8>);

impl Pickler {
    fn new() -> Self {
        Self(b"\x80\x02".to_vec())
    }
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.op(b"X")
            .op(&(s.len() as u32).to_le_bytes())
            .op(s.as_bytes())
    }
    fn int(&mut self, v: u64) -> &mut Self {
        self.op(b"\x8a\x08").op(&v.to_le_bytes())
    }
    /// `_rebuild_tensor_v2(storage KEY (numel, f32), 0, shape, contiguous strides, ...)`.
    fn tensor(&mut self, key: &str, numel: u64, len: u64) -> &mut Self {
        self.op(b"ctorch._utils\n_rebuild_tensor_v2\n(")
            .op(b"(")
            .str("storage")
            .op(b"ctorch\nFloatStorage\n")
            .str(key)
            .str("cpu")
            .int(numel)
            .op(b"tQ")
            .int(0)
            .int(len)
            .op(b"\x85")
            .int(1)
            .op(b"\x85\x89}tR")
    }
    /// `_rebuild_tensor_v2` over storage KEY (numel, f32) with any shape and strides.
    fn view(&mut self, key: &str, numel: u64, shape: &[u64], strides: &[u64]) -> &mut Self {
        self.op(b"ctorch._utils\n_rebuild_tensor_v2\n(")
            .op(b"(")
            .str("storage")
            .op(b"ctorch\nFloatStorage\n")
            .str(key)
            .str("cpu")
            .int(numel)
            .op(b"tQ")
            .int(0)
            .op(b"(");
        for &n in shape {
            self.int(n);
        }
        self.op(b"t(");
        for &s in strides {
            self.int(s);
        }
        self.op(b"t\x89}tR")
    }
    /// A state_dict holding the one tensor `view` describes.
    fn one_view(numel: u64, shape: &[u64], strides: &[u64]) -> Vec<u8> {
        let mut p = Self::new();
        p.op(b"}(")
            .str("backbone.body.conv1.weight")
            .view("0", numel, shape, strides)
            .op(b"u.");
        p.0
    }
    /// A state_dict of one `len`-element tensor per Mask R-CNN stage, all views of storage "0".
    fn state_dict(numel: u64, len: u64) -> Vec<u8> {
        let mut p = Self::new();
        p.op(b"}(");
        for name in [
            "backbone.body.conv1.weight",
            "backbone.fpn.inner_blocks.0.0.weight",
            "rpn.head.conv.0.0.weight",
            "roi_heads.box_head.fc6.weight",
            "roi_heads.box_predictor.cls_score.weight",
            "roi_heads.mask_head.0.0.weight",
            "roi_heads.mask_predictor.conv5_mask.weight",
        ] {
            p.str(name).tensor("0", numel, len);
        }
        p.op(b"u.");
        p.0
    }
}

/// A torch.save-style zip archive with the given entries under `archive/`.
fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in entries {
        zip.start_file(format!("archive/{name}"), options).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

enum Input {
    Fixture(&'static str),
    Bytes(Vec<u8>),
}

#[test]
fn bad_inputs_get_named_errors_and_leave_no_file() {
    let zip = std::fs::read(checkpoint("zip_bare_mixed.pth")).unwrap();
    let legacy = std::fs::read(checkpoint("legacy_bare_f16.pth")).unwrap();
    // A fixed LCG, so the "random" bytes are the same on every run.
    let mut x: u32 = 12345;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    let mut huge_string = Pickler::new();
    huge_string.op(b"X\xff\xff\xff\xff");
    let mut overflow = vec![0.5f32; 8];
    overflow[3] = 1e6;
    let zeros = f32_bytes(&[0.0; 8]);

    // (case, input, extra flags, what the error must say)
    let cases: Vec<(&str, Input, &[&str], &str)> = vec![
        (
            "truncated zip",
            Input::Bytes(zip[..zip.len() / 2].to_vec()),
            &[],
            "truncated or damaged zip archive",
        ),
        (
            "truncated legacy",
            Input::Bytes(legacy[..legacy.len() * 9 / 10].to_vec()),
            &[],
            "(truncated?)",
        ),
        (
            "random bytes",
            Input::Bytes(random),
            &[],
            "not a PyTorch checkpoint",
        ),
        (
            "empty file",
            Input::Bytes(Vec::new()),
            &[],
            "not a PyTorch checkpoint",
        ),
        (
            "code in the pickle",
            Input::Fixture("runs_code.pth"),
            &[],
            "references `posix.system`",
        ),
        (
            "TorchScript",
            Input::Fixture("torchscript.pt"),
            &[],
            "a TorchScript archive",
        ),
        (
            "mmdetection",
            Input::Fixture("mmdetection.pth"),
            &[],
            "an mmdetection checkpoint, not a torchvision Mask R-CNN (it has `rpn_head.rpn_conv.weight`)",
        ),
        (
            "detectron2",
            Input::Fixture("detectron2.pth"),
            &[],
            "a detectron2 checkpoint, not a torchvision Mask R-CNN",
        ),
        (
            "classifier",
            Input::Fixture("classifier.pth"),
            &[],
            "an image classifier, not a torchvision Mask R-CNN",
        ),
        (
            "missing tensor",
            Input::Fixture("missing_tensor.pth"),
            &[],
            "do not load: tensor `backbone.body.bn1.running_var` is missing",
        ),
        (
            "--key naming no state_dict",
            Input::Fixture("zip_training.pth"),
            &["--key", "optimizer"],
            "`optimizer` holds a dict of 2 entries, not a dict of tensors",
        ),
        (
            "--key not there",
            Input::Fixture("zip_training.pth"),
            &["--key", "ema"],
            "no top-level key `ema`; the checkpoint has `epoch` (int 3)",
        ),
        (
            "4 GiB string",
            Input::Bytes(archive(&[("data.pkl", &huge_string.0)])),
            &[],
            "an object of 4294967295 bytes",
        ),
        (
            "nesting bomb",
            Input::Bytes(archive(&[("data.pkl", &[b'('; 100_000])])),
            &[],
            "more than 256 nested containers",
        ),
        (
            "storage larger than its entry",
            Input::Bytes(archive(&[
                ("data.pkl", &Pickler::state_dict(1 << 40, 8)),
                ("data/0", &zeros),
            ])),
            &[],
            "storage `0`: entry `archive/data/0` has 32 bytes",
        ),
        (
            "view beyond its storage",
            Input::Bytes(archive(&[
                ("data.pkl", &Pickler::one_view(8, &[5], &[2])),
                ("data/0", &zeros),
            ])),
            &[],
            "reaches element 8 of a 8-element storage",
        ),
        (
            "stride-0 broadcast of 2^40 elements",
            Input::Bytes(archive(&[
                ("data.pkl", &Pickler::one_view(1, &[1 << 40], &[0])),
                ("data/0", &zeros[..4]),
            ])),
            &[],
            "stride 0 along dimension 0",
        ),
        (
            "overlapping view of 2^62 elements",
            Input::Bytes(archive(&[
                ("data.pkl", &Pickler::one_view(8, &[1 << 31, 1 << 31], &[0, 1])),
                ("data/0", &zeros),
            ])),
            &[],
            "stride 0 along dimension 0",
        ),
        (
            "more elements than the storage",
            Input::Bytes(archive(&[
                ("data.pkl", &Pickler::one_view(8, &[2, 8], &[1, 0])),
                ("data/0", &zeros),
            ])),
            &[],
            "stride 0 along dimension 1",
        ),
        (
            "overlapping strides",
            Input::Bytes(archive(&[
                ("data.pkl", &Pickler::one_view(8, &[4, 4], &[1, 1])),
                ("data/0", &zeros),
            ])),
            &[],
            "has 16 elements but its storage 8",
        ),
        (
            "element count overflow",
            Input::Bytes(archive(&[
                ("data.pkl", &Pickler::one_view(8, &[1 << 32, 1 << 32, 1 << 32], &[1, 1, 1])),
                ("data/0", &zeros),
            ])),
            &[],
            "overflows",
        ),
        (
            "views repeating one storage",
            Input::Bytes(archive(&[
                ("data.pkl", &Pickler::state_dict(2000, 2000)),
                ("data/0", &vec![0u8; 8000]),
            ])),
            &["--dtype", "f32"],
            "more than 4 times the file's",
        ),
        (
            "object bomb",
            // EMPTY_LIST, POP: objects pile up while the stack stays empty.
            Input::Bytes(archive(&[("data.pkl", &b"]0".repeat(300_000))])),
            &[],
            "more than 262144 objects",
        ),
        (
            "stack bomb",
            Input::Bytes(archive(&[("data.pkl", &[b'N'; 100_000])])),
            &[],
            "a stack deeper than 65536 values",
        ),
        (
            "f16 overflow",
            Input::Bytes(archive(&[
                ("data.pkl", &Pickler::state_dict(8, 8)),
                ("data/0", &f32_bytes(&overflow)),
            ])),
            &[],
            "tensor `backbone.body.conv1.weight`: 1 values overflow f16 (largest |x| = 1.000e6)",
        ),
        (
            "labels for another class count",
            Input::Fixture("zip_training.pth"),
            &["--labels", "LABELS3"],
            "3 names for a model with 47 classes",
        ),
    ];
    for (case, input, flags, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let labels3 = dir.path().join("three.txt");
        std::fs::write(&labels3, "a\nb\nc\n").unwrap();
        let input = match input {
            Input::Fixture(name) => checkpoint(name),
            Input::Bytes(bytes) => {
                let p = dir.path().join("input.pth");
                std::fs::write(&p, bytes).unwrap();
                p
            }
        };
        let out_dir = dir.path().join("out");
        std::fs::create_dir(&out_dir).unwrap();
        let out = out_dir.join("w.safetensors");
        let mut args = vec!["convert", s(&input), s(&out)];
        args.extend(
            flags
                .iter()
                .map(|f| if *f == "LABELS3" { s(&labels3) } else { *f }),
        );
        let run = drape(&args);
        let log = text(&run);
        assert_eq!(run.status.code(), Some(1), "{case}: {log}");
        assert!(
            log.contains(expected),
            "{case}: expected {expected:?} in: {log}"
        );
        assert!(
            log.contains(s(&input)),
            "{case}: the error names no file: {log}"
        );
        let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().collect();
        assert!(left.is_empty(), "{case}: left {left:?}");
    }
}

#[test]
fn refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w.safetensors");
    std::fs::write(&out, "keep me").unwrap();
    let ckpt = checkpoint("legacy_bare_f16.pth");
    let run = drape(&["convert", s(&ckpt), s(&out)]);
    assert_eq!(run.status.code(), Some(1));
    assert!(
        text(&run).contains("already exists; pass --force"),
        "{}",
        text(&run)
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "keep me");

    let run = drape(&["convert", s(&ckpt), s(&out), "--force"]);
    assert!(run.status.success(), "{}", text(&run));
    load(&out);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

// ----------------------------------------------------------------------------- inspect

#[test]
fn inspect_reports_the_fixture() {
    let fixture = common::tiny_weights();
    let (v, _) = common::run_json(common::drape_command().args(["inspect", s(&fixture), "--json"]));
    let a = &v["architecture"];
    assert_eq!(a["block"], "Bottleneck");
    assert_eq!(a["blocks_per_stage"], serde_json::json!([1, 1, 1, 1]));
    assert_eq!(a["num_classes"], 47);
    assert_eq!(a["fpn_channels"], 32);
    assert_eq!(v["head"], "v1");
    assert_eq!(v["dtypes"], serde_json::json!(["F16"]));
    assert_eq!(v["tensors"], 127);
    assert_eq!(v["sha256"], sha256(&fixture));
    assert_eq!(v["labels"].as_array().unwrap().len(), 46);
    assert_eq!(v["labels"][0], "shirt, blouse");
    assert_eq!(v["metadata"]["min_size"], "160");
    assert_eq!(v["check"]["ok"], true);

    let run = drape(&["inspect", s(&fixture)]);
    let out = text(&run);
    assert!(run.status.success(), "{out}");
    for phrase in [
        "Bottleneck [1, 1, 1, 1]",
        "47 incl. background",
        "check         ok",
    ] {
        assert!(out.contains(phrase), "lacks {phrase:?}: {out}");
    }
}

#[test]
fn inspect_fails_naming_what_breaks_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let logits = "roi_heads.mask_predictor.mask_fcn_logits.weight";
    let bias = "roi_heads.mask_predictor.conv5_mask.bias";
    type Edit = fn(&mut HashMap<String, Stored>);
    let cases: [(&str, Edit, String); 3] = [
        (
            "missing",
            |t| {
                t.remove("roi_heads.mask_predictor.mask_fcn_logits.weight");
            },
            format!("tensor `{logits}` is missing"),
        ),
        (
            "misshapen",
            |t| {
                let bias = t
                    .get_mut("roi_heads.mask_predictor.conv5_mask.bias")
                    .unwrap();
                bias.shape[0] -= 1;
                bias.data.truncate(bias.data.len() - 2);
            },
            format!("tensor `{bias}` has shape [31]"),
        ),
        (
            "extra",
            |t| {
                let extra = Stored {
                    name: "roi_heads.keypoint_predictor.weight".into(),
                    dtype: Dtype::F16,
                    shape: vec![1],
                    data: vec![0, 0],
                };
                t.insert("roi_heads.keypoint_predictor.weight".into(), extra);
            },
            "unexpected tensor `roi_heads.keypoint_predictor.weight`".into(),
        ),
    ];
    for (case, edit, expected) in cases {
        let (mut tensors, _) = read(&common::tiny_weights());
        edit(&mut tensors);
        let path = dir.path().join(format!("{case}.safetensors"));
        let tensors: Vec<Stored> = tensors.into_values().collect();
        common::write_safetensors(&path, &tensors, &HashMap::new());
        for json in [false, true] {
            let mut args = vec!["inspect", s(&path)];
            if json {
                args.push("--json");
            }
            let run = drape(&args);
            let log = text(&run);
            assert_eq!(run.status.code(), Some(1), "{case}: {log}");
            assert!(log.contains(&expected), "{case}: {log}");
            if json {
                let v: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
                assert_eq!(v["check"]["ok"], false, "{case}");
                assert_eq!(v["tensors"], tensors.len(), "{case}");
            }
        }
    }

    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not weights").unwrap();
    let run = drape(&["inspect", s(&junk)]);
    assert_eq!(run.status.code(), Some(1));
    assert!(text(&run).contains("not a usable safetensors file"));
}

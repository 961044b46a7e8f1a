//! Shared test helpers: fixture loading, an independent COCO RLE decoder, the detection
//! matcher the parity tests use, and a scripted frame source for the pipeline tests.
#![allow(dead_code)]

pub mod scripted;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use candle_core::{Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

/// Whether the tests run under an emulator: `.ci/aarch64` sets `DRAPE_TEST_RUNNER` (see
/// [`drape_command`]) to qemu-user, where every float operation is done in software, so a
/// warm GEMM call takes about 0.75 s and a frame of the tiny model 3 s (milliseconds natively).
pub fn emulated() -> bool {
    std::env::var_os("DRAPE_TEST_RUNNER").is_some_and(|r| !r.is_empty())
}

/// The `drape` binary built with the tests, run from the repository root (so that fixture
/// paths given relative to it resolve; a test may set another directory) and started through
/// `DRAPE_TEST_RUNNER` where set (an emulator and its arguments, as `.ci/aarch64` sets it:
/// under qemu-user a process cannot exec a binary of the emulated architecture itself).
pub fn drape_command() -> Command {
    let bin = env!("CARGO_BIN_EXE_drape");
    let runner = std::env::var("DRAPE_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    let mut c = match words.next() {
        Some(emulator) => {
            let mut c = Command::new(emulator);
            c.args(words).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

/// Runs `cmd` to the end and asserts that it succeeded, with its stderr as the message if not.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed ({}): {}",
        cmd.get_args().collect::<Vec<_>>(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd` to the end and asserts that it failed as drape fails (exit status 1, not a crash
/// and not clap's usage error); returns its stderr.
pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{:?}: {stderr}",
        cmd.get_args().collect::<Vec<_>>()
    );
    stderr
}

/// [`run_ok`], then its stdout parsed as one JSON value; returns the value and the stderr.
pub fn run_json(cmd: &mut Command) -> (serde_json::Value, String) {
    let out = run_ok(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON value ({e}): {}\nstderr: {stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (value, stderr)
}

/// Asks a child process to stop as a service manager would (SIGTERM); it is not waited for.
pub fn terminate(child: &std::process::Child) {
    rustix::process::kill_process(
        rustix::process::Pid::from_child(child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The tiny Bottleneck fixture model's weights (also the bundled demo model).
pub fn tiny_weights() -> PathBuf {
    fixtures().join("tiny_r50/model.safetensors")
}

/// [`tiny_weights`] loaded on the CPU.
pub fn tiny_model() -> drape::MaskRcnn {
    drape::MaskRcnn::load(tiny_weights(), |_| {}, &Device::Cpu).unwrap()
}

/// Deterministic pseudo-random floats in [0, 1).
pub fn noise(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2654435761) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as f32 / (1u32 << 24) as f32
        })
        .collect()
}

/// One of the fixture photos, as RGB.
pub fn fixture_image(name: &str) -> image::RgbImage {
    drape::image_io::load_rgb(fixtures().join("images").join(format!("{name}.png"))).unwrap()
}

/// A detection result in the matcher's terms, masks decoded from their COCO strings.
pub fn candidates(result: &drape::Detections) -> Vec<Candidate> {
    result
        .instances
        .iter()
        .map(|i| Candidate {
            label: i.class_id,
            score: i.score,
            bbox: i.bbox,
            mask: decode_coco_rle(
                &i.mask
                    .as_ref()
                    .expect("every instance is masked")
                    .to_coco_string(),
                result.height,
                result.width,
            ),
        })
        .collect()
}

/// The bundled replay frames, looped at `fps` like a camera.
pub fn replay_frames(fps: f64) -> drape::capture::SourceSpec {
    drape::capture::SourceSpec {
        fps: Some(fps),
        looping: true,
        ..drape::capture::SourceSpec::new(fixtures().join("frames").display().to_string())
    }
}

/// One tensor of a safetensors file, as stored.
#[derive(Debug, Clone)]
pub struct Stored {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Little-endian elements.
    pub data: Vec<u8>,
}

impl Stored {
    /// The elements widened to f32 (exact for F16, BF16 and F32; I64 indices as floats).
    pub fn values(&self) -> Vec<f32> {
        let d = &self.data;
        match self.dtype {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
            other => panic!("{}: dtype {other:?}", self.name),
        }
    }
}

/// Every tensor of a safetensors file (sorted by name) and its `__metadata__`.
pub fn read_safetensors(path: &Path) -> (Vec<Stored>, HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{}: not safetensors: {e}", path.display()));
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut tensors: Vec<Stored> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| Stored {
            name,
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            data: v.data().to_vec(),
        })
        .collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    (tensors, meta.metadata().clone().unwrap_or_default())
}

/// Writes `tensors` and `metadata` as a safetensors file at `path`.
pub fn write_safetensors(path: &Path, tensors: &[Stored], metadata: &HashMap<String, String>) {
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .map(|t| {
            let view = TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap();
            (t.name.as_str(), view)
        })
        .collect();
    let meta = (!metadata.is_empty()).then(|| metadata.clone());
    std::fs::write(path, safetensors::serialize(views, meta).unwrap()).unwrap();
}

/// The tensor `name` of `tensors`, to edit.
pub fn stored_mut<'a>(tensors: &'a mut [Stored], name: &str) -> &'a mut Stored {
    tensors
        .iter_mut()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no tensor `{name}`"))
}

/// Reference tensors torchvision wrote for one model and image (`calibration/make_fixtures.py`).
pub struct Reference {
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub metadata: HashMap<String, String>,
}

impl Reference {
    pub fn load(path: &Path) -> Self {
        let (stored, metadata) = read_safetensors(path);
        let tensors = stored
            .into_iter()
            .map(|t| {
                let values = t.values();
                (t.name, (t.shape, values))
            })
            .collect();
        Self { tensors, metadata }
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn data(&self, name: &str) -> &[f32] {
        &self.get(name).1
    }

    pub fn shape(&self, name: &str) -> &[usize] {
        &self.get(name).0
    }

    fn get(&self, name: &str) -> &(Vec<usize>, Vec<f32>) {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("fixture lacks `{name}`"))
    }

    pub fn tensor(&self, name: &str) -> Tensor {
        let (shape, data) = self.get(name);
        Tensor::from_vec(data.clone(), shape.as_slice(), &Device::Cpu).unwrap()
    }

    pub fn boxes(&self, name: &str) -> Vec<[f32; 4]> {
        self.data(name)
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect()
    }
}

/// Max |a - b| over max(1, max |b|): an error relative to the reference's scale.
pub fn scaled_error(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len(), "element counts differ");
    let scale = reference.iter().fold(1f32, |m, v| m.max(v.abs()));
    let diff = ours
        .iter()
        .zip(reference)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

pub fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[derive(Debug, Deserialize)]
pub struct FinalJson {
    pub width: usize,
    pub height: usize,
    pub instances: Vec<FinalInstance>,
}

#[derive(Debug, Deserialize)]
pub struct FinalInstance {
    #[serde(alias = "class_id")]
    pub label: usize,
    pub score: f32,
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
    pub mask: MaskJson,
}

#[derive(Debug, Deserialize)]
pub struct MaskJson {
    pub size: [usize; 2],
    pub counts: String,
}

pub fn load_final(path: &Path) -> FinalJson {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// pycocotools' `rleFrString`, written from its definition independently of drape's encoder:
/// returns the column-major 0/1 mask.
pub fn decode_coco_rle(counts: &str, height: usize, width: usize) -> Vec<u8> {
    let bytes = counts.as_bytes();
    let mut runs: Vec<i64> = Vec::new();
    let mut p = 0;
    while p < bytes.len() {
        let mut x: i64 = 0;
        let mut k = 0;
        loop {
            let c = (bytes[p] - 48) as i64;
            x |= (c & 0x1f) << (5 * k);
            let more = c & 0x20 != 0;
            p += 1;
            k += 1;
            if !more {
                if c & 0x10 != 0 {
                    x |= -1i64 << (5 * k);
                }
                break;
            }
        }
        if runs.len() > 2 {
            x += runs[runs.len() - 2];
        }
        runs.push(x);
    }
    let mut mask = Vec::with_capacity(height * width);
    for (i, &r) in runs.iter().enumerate() {
        mask.extend(std::iter::repeat_n((i % 2) as u8, r as usize));
    }
    assert_eq!(
        mask.len(),
        height * width,
        "RLE covers {} of {} pixels",
        mask.len(),
        height * width
    );
    mask
}

pub fn box_iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |x: &[f32; 4]| (x[2] - x[0]) * (x[3] - x[1]);
    let union = area(a) + area(b) - inter;
    if union <= 0.0 {
        if a == b {
            1.0
        } else {
            0.0
        }
    } else {
        inter / union
    }
}

pub fn mask_iou(a: &[u8], b: &[u8]) -> f32 {
    let inter = a
        .iter()
        .zip(b)
        .filter(|(x, y)| **x == 1 && **y == 1)
        .count();
    let union = a
        .iter()
        .zip(b)
        .filter(|(x, y)| **x == 1 || **y == 1)
        .count();
    if union == 0 {
        1.0
    } else {
        inter as f32 / union as f32
    }
}

/// One of ours as the matcher sees it.
pub struct Candidate {
    pub label: usize,
    pub score: f32,
    pub bbox: [f32; 4],
    pub mask: Vec<u8>,
}

/// Outcome of matching torchvision's final instances against ours.
#[derive(Debug)]
pub struct MatchReport {
    pub reference: usize,
    pub ours: usize,
    pub matched: usize,
    pub worst_box_iou: f32,
    pub worst_mask_iou: f32,
    pub worst_score_diff: f32,
    /// Reference instances whose class, score and box matched one of ours but whose mask did
    /// not: (reference index, our index, mask IoU).
    pub mask_misses: Vec<(usize, usize, f32)>,
}

/// The mask IoU at which one of ours matches a torchvision instance.
pub const MASK_IOU_MIN: f32 = 0.95;

/// Greedy in torchvision's score order: a reference instance is matched by the unused one of
/// ours with the same class, box IoU >= 0.98, |score diff| <= 0.01 and mask IoU >= 0.95.
pub fn match_instances(reference: &FinalJson, ours: &[Candidate]) -> MatchReport {
    let mut used = vec![false; ours.len()];
    let mut report = MatchReport {
        reference: reference.instances.len(),
        ours: ours.len(),
        matched: 0,
        worst_box_iou: 1.0,
        worst_mask_iou: 1.0,
        worst_score_diff: 0.0,
        mask_misses: Vec::new(),
    };
    for (ri, r) in reference.instances.iter().enumerate() {
        let rmask = decode_coco_rle(&r.mask.counts, r.mask.size[0], r.mask.size[1]);
        let best = ours
            .iter()
            .enumerate()
            .filter(|(i, c)| !used[*i] && c.label == r.label && (c.score - r.score).abs() <= 0.01)
            .map(|(i, c)| (i, box_iou(&c.bbox, &r.bbox)))
            .filter(|(_, iou)| *iou >= 0.98)
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((i, biou)) = best {
            let miou = mask_iou(&ours[i].mask, &rmask);
            if miou >= MASK_IOU_MIN {
                used[i] = true;
                report.matched += 1;
                report.worst_box_iou = report.worst_box_iou.min(biou);
                report.worst_mask_iou = report.worst_mask_iou.min(miou);
                report.worst_score_diff =
                    report.worst_score_diff.max((ours[i].score - r.score).abs());
            } else {
                report.mask_misses.push((ri, i, miou));
            }
        }
    }
    report
}

/// `paste_masks_in_image`'s integer box for `bbox`, from torchvision's definition:
/// `expand_boxes` by 30/28 in f32, then `.to(torch.int64)` (truncation toward zero).
pub fn paste_cells(bbox: &[f32; 4]) -> [i64; 4] {
    let scale = 30.0f32 / 28.0;
    let w_half = (bbox[2] - bbox[0]) * 0.5 * scale;
    let h_half = (bbox[3] - bbox[1]) * 0.5 * scale;
    let x_c = (bbox[2] + bbox[0]) * 0.5;
    let y_c = (bbox[3] + bbox[1]) * 0.5;
    [x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half].map(|v| v as i64)
}

/// A loopback port nobody listens on right now, for a server the test starts as a process.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HTTP response as a test reads it.
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The whole response as text, head and body.
    pub fn text(&self) -> String {
        format!(
            "{}\r\n\r\n{}",
            self.head,
            String::from_utf8_lossy(&self.body)
        )
    }
}

/// Sends `request` (as written on the wire: head and any body) to `addr` and reads one
/// response: the head, then `Content-Length` bytes of body where the head gives a length (a
/// keep-alive server such as ChromeDriver leaves the connection open), else everything up to
/// the close, de-chunked if chunked. Each read waits at most `timeout`, so a hang fails the test
/// instead of stalling it.
pub fn http_exchange(
    addr: impl ToSocketAddrs,
    request: &str,
    timeout: Duration,
) -> std::io::Result<HttpResponse> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let end = loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    };
    let mut body = raw.split_off(end + 4);
    match header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        Some(n) => {
            while body.len() < n {
                let got = s.read(&mut buf)?;
                if got == 0 {
                    break;
                }
                body.extend_from_slice(&buf[..got]);
            }
        }
        None => {
            s.read_to_end(&mut body)?;
            if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
                body = dechunk(&body);
            }
        }
    }
    Ok(HttpResponse { status, head, body })
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(std::str::from_utf8(&raw[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 4 + size..];
    }
    out
}

/// One `GET path` to 127.0.0.1:`port` with `Connection: close`: (status, head, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String, Vec<u8>)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let r = http_exchange(("127.0.0.1", port), &request, Duration::from_secs(20))?;
    Ok((r.status, r.head, r.body))
}

/// The same JPEG without its DHT segments, as UVC cameras send MJPEG. The `image` encoder uses
/// the standard Annex K tables, so putting those back must restore the image.
pub fn without_dht(jpeg: &[u8]) -> Vec<u8> {
    let mut out = jpeg[..2].to_vec();
    let mut pos = 2;
    loop {
        let code = jpeg[pos + 1];
        if code == 0xDA {
            out.extend_from_slice(&jpeg[pos..]);
            return out;
        }
        let len = u16::from_be_bytes([jpeg[pos + 2], jpeg[pos + 3]]) as usize;
        if code != 0xC4 {
            out.extend_from_slice(&jpeg[pos..pos + 2 + len]);
        }
        pos += 2 + len;
    }
}

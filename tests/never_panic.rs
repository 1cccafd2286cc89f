//! Readers of user files never panic, hang or allocate what a header claims (#22): proptest
//! properties over arbitrary bytes and over mutations (bytes overwritten, inserted, deleted,
//! the file cut short, mostly where headers lie) of valid files, for every reader of user
//! files: IDX images and labels (plain and gzipped), CIFAR-10 binary batches, DFA file names,
//! the metadata tables (SubpopBench, Waterbirds, CelebA, generic), run checkpoints
//! (`best.safetensors`, the resume checkpoint) and sparse exports, PyTorch `.pth` files, and
//! config and sweep TOML. Each input gives a value or an error; a panic fails the property.
//!
//! Allocation: this binary's global allocator records the largest single allocation request
//! made on the thread that runs a reader (these readers do their work on the calling thread);
//! it must stay below [`alloc_bound`] of the input's
//! length, also for headers that claim 2^31 images or tensors of 2^40 elements. Hangs: every
//! call must return within [`SLOW`]. The properties run a fixed number of cases from a fixed
//! seed, without persistence files, so the test is deterministic.

mod common;

use anyhow::Result;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, RngSeed, TestRunner};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The system allocator, noting the largest request made on a thread while it is tracking.
struct Counting;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let on = TRACKING.try_with(Cell::get).unwrap_or(false);
    if on {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    }
}

// SAFETY: every call is forwarded unchanged to `System`; `note` neither allocates nor panics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The most a reader may take in one allocation for an input of `len` bytes: a few MB of
/// fixed cost (models, decoders' tables) plus a small multiple of the input.
fn alloc_bound(len: usize) -> usize {
    (8 << 20) + 8 * len
}

/// No single call may take longer than this (a hang, on a machine shared with other jobs).
const SLOW: Duration = Duration::from_secs(10);

/// Runs `f` (a reader on an input of `len` bytes) and checks that it returned in time and
/// that no single allocation exceeded [`alloc_bound`]; returns whether it gave a value.
fn check<T>(what: &str, len: usize, f: impl FnOnce() -> Result<T>) -> bool {
    TRACKING.with(|t| t.set(true));
    LARGEST.with(|l| l.set(0));
    let t0 = Instant::now();
    let r = f();
    let dt = t0.elapsed();
    TRACKING.with(|t| t.set(false));
    let largest = LARGEST.with(Cell::get);
    assert!(dt < SLOW, "{what}: {dt:?} on {len} bytes");
    assert!(
        largest <= alloc_bound(len),
        "{what}: one allocation of {largest} bytes for a {len}-byte input"
    );
    r.is_ok()
}

/// [`check`] of a reader of files on `bytes`, written to `path` first; whether it accepted them.
fn check_file<T>(
    what: &str,
    path: &Path,
    bytes: &[u8],
    read: impl FnOnce(&Path) -> Result<T>,
) -> bool {
    std::fs::write(path, bytes).expect("write");
    check(what, bytes.len(), || read(path))
}

/// A deterministic runner of `cases` cases.
fn runner(cases: u32) -> TestRunner {
    TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            rng_algorithm: RngAlgorithm::ChaCha,
            rng_seed: RngSeed::Fixed(22),
            max_shrink_iters: 200,
            ..Config::default()
        },
        proptest::test_runner::TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    )
}

/// One edit of a mutation: overwrite, insert, delete or cut at a position, mostly in the
/// first `head` bytes.
#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Cut(usize),
}

/// 1-4 edits; positions are drawn in `0..2^16` and taken modulo the head (three times in
/// four) or the length.
fn edits() -> impl Strategy<Value = Vec<(Edit, bool)>> {
    let pos = 0usize..1 << 16;
    let edit = prop_oneof![
        3 => (pos.clone(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        1 => (pos.clone(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        1 => pos.clone().prop_map(Edit::Delete),
        1 => pos.prop_map(Edit::Cut),
    ];
    prop::collection::vec((edit, prop::bool::weighted(0.75)), 1..5)
}

/// `valid` with `edits` applied (`head`: the span that most edits fall in).
fn apply(valid: &[u8], head: usize, edits: &[(Edit, bool)]) -> Vec<u8> {
    let mut b = valid.to_vec();
    for (e, in_head) in edits {
        let span = if *in_head { head.min(b.len()) } else { b.len() }.max(1);
        match *e {
            Edit::Set(i, v) if !b.is_empty() => {
                let i = i % span.min(b.len());
                b[i] = v;
            }
            Edit::Insert(i, v) => b.insert((i % span).min(b.len()), v),
            Edit::Delete(i) if !b.is_empty() => {
                b.remove(i % span.min(b.len()));
            }
            Edit::Cut(i) => b.truncate(i % span),
            _ => {}
        }
    }
    b
}

/// Runs `reader` on `cases` mutations of `valid`; returns how many were errors. The
/// unmutated input must be accepted.
fn mutations(
    name: &str,
    valid: &[u8],
    head: usize,
    cases: u32,
    reader: impl Fn(&[u8]) -> Result<()>,
) -> usize {
    assert!(
        check(name, valid.len(), || reader(valid)),
        "{name}: the unmutated input must be accepted"
    );
    let errors = Cell::new(0usize);
    runner(cases)
        .run(&edits(), |e| {
            let b = apply(valid, head, &e);
            if !check(name, b.len(), || reader(&b)) {
                errors.set(errors.get() + 1);
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    errors.get()
}

/// Runs `reader` on `cases` arbitrary inputs of up to `max_len` bytes; returns how many were
/// errors.
fn arbitrary(
    name: &str,
    max_len: usize,
    cases: u32,
    reader: impl Fn(&[u8]) -> Result<()>,
) -> usize {
    let errors = Cell::new(0usize);
    runner(cases)
        .run(&prop::collection::vec(any::<u8>(), 0..max_len), |b| {
            if !check(name, b.len(), || reader(&b)) {
                errors.set(errors.get() + 1);
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    errors.get()
}

fn gzip(b: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(b).expect("gzip");
    z.finish().expect("gzip")
}

fn be(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_be_bytes()).collect()
}

/// The allocation check itself: a reader that allocates 64 MB for a small input fails it.
#[test]
#[should_panic(expected = "one allocation of")]
fn the_allocation_check_catches_a_large_allocation() {
    check("64 MB", 100, || Ok(vec![0u8; 64 << 20].len()));
}

#[test]
fn idx_images_and_labels() {
    let images = |b: &[u8]| rest::data::idx::parse_images(b, "t").map(drop);
    let labels = |b: &[u8]| rest::data::idx::parse_labels(b, "t").map(drop);
    // 5 images of 4x3, and their labels.
    let mut img = be(&[0x0803, 5, 4, 3]);
    img.extend((0..60).map(|v| v as u8));
    let mut lab = be(&[0x0801, 5]);
    lab.extend([1, 2, 3, 4, 5]);
    assert!(mutations("IDX images", &img, 16, 300, images) > 100);
    assert!(mutations("IDX labels", &lab, 8, 300, labels) > 100);
    assert!(mutations("gzipped IDX images", &gzip(&img), 24, 150, images) > 50);
    arbitrary("IDX images", 256, 200, images);
    arbitrary("IDX labels", 256, 200, labels);
    // Headers that claim up to 2^32 - 1 images of up to 2^32 - 1 pixels, over a few bytes.
    let claims = (
        (1u32 << 24)..=u32::MAX,
        any::<u32>(),
        any::<u32>(),
        prop::collection::vec(any::<u8>(), 0..64),
        any::<bool>(),
    );
    runner(200)
        .run(&claims, |(n, rows, cols, payload, zipped)| {
            let mut b = be(&[0x0803, n, rows, cols]);
            b.extend(&payload);
            let mut l = be(&[0x0801, n]);
            l.extend(&payload);
            if zipped {
                (b, l) = (gzip(&b), gzip(&l));
            }
            prop_assert!(!check("IDX image claim", b.len(), || images(&b)));
            prop_assert!(!check("IDX label claim", l.len(), || labels(&l)));
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn cifar_batches() {
    let parse = |b: &[u8]| rest::data::cifar::parse_batch(b, Path::new("b.bin")).map(drop);
    let images: Vec<u8> = (0..3 * 32 * 32 * 3).map(|v| (v % 251) as u8).collect();
    let batch = rest::data::cifar::encode_batch(&images, &[1, 2, 3]).expect("encode");
    assert!(mutations("CIFAR batch", &batch, 3 * 3073, 200, parse) > 100);
    arbitrary("CIFAR batch", 3 * 3073 + 8, 100, parse);
    // Whole records with arbitrary labels.
    runner(100)
        .run(&prop::collection::vec(any::<u8>(), 1..4), |labels| {
            let mut b = batch[..labels.len() * 3073].to_vec();
            for (i, l) in labels.iter().enumerate() {
                b[i * 3073] = *l;
            }
            let ok = check("CIFAR labels", b.len(), || parse(&b));
            prop_assert_eq!(ok, labels.iter().all(|&l| l < 10));
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn dfa_file_names() {
    let parse = |b: &[u8]| {
        let name = String::from_utf8_lossy(b).into_owned();
        rest::data::dfa::parse_name(Path::new(&name)).map(drop)
    };
    mutations("DFA name", b"dir/123_4_7.png", 15, 500, parse);
    arbitrary("DFA name", 40, 500, parse);
    // Names that are not UTF-8 are an error.
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let p = Path::new(std::ffi::OsStr::from_bytes(b"1_\xff_2.png"));
        assert!(rest::data::dfa::parse_name(p).is_err());
    }
}

/// A table dataset folder for one layout: its CSV files and small image files.
struct TableCase {
    name: &'static str,
    kind: rest::data::DatasetKind,
    /// The file the mutations go to, and its valid content.
    file: &'static str,
    text: String,
    /// Other files of the layout (CelebA's partition table).
    others: Vec<(&'static str, String)>,
    table_file: Option<&'static str>,
}

fn table_cases() -> Vec<TableCase> {
    use rest::data::DatasetKind as K;
    let mut subpop = String::from("id,filename,split,y,a\n");
    let mut water = String::from("img_id,img_filename,y,split,place\n");
    let mut generic = String::from("path,label,colour,part\n");
    let mut attrs = String::from("image_id,Blond_Hair,Male,Smiling\n");
    let mut part = String::from("image_id,partition\n");
    for i in 0..6 {
        let (s, y, a) = (i % 3, i % 2, (i / 2) % 2);
        subpop.push_str(&format!("{i},i{i}.png,{s},{y},{a}\n"));
        water.push_str(&format!("{i},i{i}.png,{y},{s},{a}\n"));
        let split = ["train", "valid", "test"][s];
        generic.push_str(&format!("i{i}.png,cat{y},red{a},{split}\n"));
        let pm = |v: usize| if v == 1 { "1" } else { "-1" };
        attrs.push_str(&format!("i{i}.png,{},{},1\n", pm(y), pm(a)));
        part.push_str(&format!("i{i}.png,{s}\n"));
    }
    vec![
        TableCase {
            name: "SubpopBench table",
            kind: K::Subpop,
            file: "metadata_x.csv",
            text: subpop,
            others: vec![],
            table_file: None,
        },
        TableCase {
            name: "Waterbirds table",
            kind: K::Waterbirds,
            file: "metadata.csv",
            text: water,
            others: vec![],
            table_file: None,
        },
        TableCase {
            name: "generic table",
            kind: K::Table,
            file: "t.csv",
            text: generic,
            others: vec![],
            table_file: Some("t.csv"),
        },
        TableCase {
            name: "CelebA attributes",
            kind: K::Celeba,
            file: "list_attr_celeba.csv",
            text: attrs.clone(),
            others: vec![("list_eval_partition.csv", part.clone())],
            table_file: None,
        },
        TableCase {
            name: "CelebA partition",
            kind: K::Celeba,
            file: "list_eval_partition.csv",
            text: part,
            others: vec![("list_attr_celeba.csv", attrs)],
            table_file: None,
        },
    ]
}

#[test]
fn metadata_tables() -> Result<()> {
    for case in table_cases() {
        let dir = tempfile::tempdir()?;
        for i in 0..6 {
            std::fs::write(dir.path().join(format!("i{i}.png")), b"x")?;
        }
        for (f, text) in &case.others {
            std::fs::write(dir.path().join(f), text)?;
        }
        let o = rest::data::table::TableOptions {
            root: dir.path().to_path_buf(),
            kind: case.kind,
            file: case.table_file.map(PathBuf::from),
            image_column: "path".into(),
            label_column: "label".into(),
            attribute_column: "colour".into(),
            split_column: "part".into(),
            target_attr: "Blond_Hair".into(),
            confounder_attr: "Male".into(),
            skip_bad: false,
            cache_dir: None,
        };
        let path = dir.path().join(case.file);
        let list = |b: &[u8]| {
            std::fs::write(&path, b)?;
            rest::data::table::list(&o).map(drop)
        };
        let n = case.text.len();
        let e = mutations(case.name, case.text.as_bytes(), n, 150, list);
        assert!(e > 30, "{}: {e}", case.name);
        arbitrary(case.name, 120, 100, list);
    }
    Ok(())
}

#[test]
fn config_and_sweep_toml() {
    let config =
        |b: &[u8]| rest::train::TrainConfig::from_toml_str(&String::from_utf8_lossy(b)).map(drop);
    let sweep = |b: &[u8]| {
        rest::sweep::SweepSpec::parse(&String::from_utf8_lossy(b), Path::new("s.toml")).map(drop)
    };
    let full = include_str!("fixtures/config-full.toml");
    assert!(mutations("config TOML", full.as_bytes(), full.len(), 300, config) > 100);
    arbitrary("config TOML", 200, 300, config);
    let spec = "[base]\nepochs = 5\n[grid]\ndensity = [1.0, 0.1]\nseed = [41, 42]\n\
                [zip]\nconflict_pct = [1, 2]\nupweight = [10, 30]\n";
    assert!(mutations("sweep TOML", spec.as_bytes(), spec.len(), 300, sweep) > 100);
    arbitrary("sweep TOML", 200, 300, sweep);
}

/// A finished tiny sparse MLP run (trained once for the binary) and its sparse export.
fn tiny_run() -> &'static (tempfile::TempDir, rest::train::TrainConfig) {
    static RUN: OnceLock<(tempfile::TempDir, rest::train::TrainConfig)> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = dir.path().join("run");
        let mut cfg = common::tiny_config(&run);
        cfg.model.kind = rest::models::ModelKind::Mlp;
        cfg.optim.epochs = 1;
        cfg.data.train_size = 256;
        cfg.data.valid_size = 64;
        cfg.data.test_size = 64;
        cfg.sparse.density = 0.1;
        rest::train::train(&cfg).expect("train");
        rest::infer::export::export(
            &run.join("best.safetensors"),
            &dir.path().join("m.safetensors"),
            false,
        )
        .expect("export");
        (dir, cfg)
    })
}

/// Mutations of `file` (copied into a fresh folder with the `beside` files of `src`) read by
/// `reader(path)`.
fn file_mutations(
    name: &str,
    src: &Path,
    beside: &[&str],
    head: usize,
    cases: u32,
    reader: impl Fn(&Path) -> Result<()>,
) -> Result<usize> {
    let dir = tempfile::tempdir()?;
    for f in beside {
        std::fs::copy(src.with_file_name(f), dir.path().join(f))?;
    }
    let path = dir.path().join(src.file_name().expect("file name"));
    let valid = std::fs::read(src)?;
    Ok(mutations(name, &valid, head, cases, |b| {
        std::fs::write(&path, b)?;
        reader(&path)
    }))
}

#[test]
fn run_checkpoints_and_sparse_exports() -> Result<()> {
    let (dir, cfg) = tiny_run();
    let run = dir.path().join("run");
    let load = |p: &Path| rest::infer::load(p).map(drop);
    let best = run.join("best.safetensors");
    let e = file_mutations("best.safetensors", &best, &["config.toml"], 2048, 120, load)?;
    assert!(e > 40, "best.safetensors: {e}");
    let export = dir.path().join("m.safetensors");
    let e = file_mutations("sparse export", &export, &[], 4096, 150, load)?;
    assert!(e > 40, "sparse export: {e}");
    // The resume checkpoint: its tensors and its loop state.
    let resume = |p: &Path| {
        let d = p.parent().expect("dir");
        rest::train::checkpoint::load(d, cfg, &candle_core::Device::Cpu).map(drop)
    };
    let pair = ["checkpoint.json", "checkpoint.safetensors"];
    let tensors = run.join(pair[1]);
    let e = file_mutations(
        "checkpoint tensors",
        &tensors,
        &pair[..1],
        2048,
        100,
        resume,
    )?;
    assert!(e > 30, "checkpoint tensors: {e}");
    let state = run.join(pair[0]);
    let n = std::fs::metadata(&state)?.len() as usize;
    let e = file_mutations("checkpoint state", &state, &pair[1..], n, 100, resume)?;
    assert!(e > 30, "checkpoint state: {e}");
    Ok(())
}

/// Safetensors headers that claim tensors far larger than the file.
#[test]
fn safetensors_claims() -> Result<()> {
    let (dir, _) = tiny_run();
    let tmp = tempfile::tempdir()?;
    std::fs::copy(
        dir.path().join("run/config.toml"),
        tmp.path().join("config.toml"),
    )?;
    let path = tmp.path().join("best.safetensors");
    let claims = (
        prop::collection::vec(1u64..=1 << 20, 1..4),
        0u64..1 << 44,
        prop::sample::select(vec!["F32", "U32", "U16", "F16", "U8"]),
    );
    runner(100)
        .run(&claims, |(shape, end, dtype)| {
            let header = format!(
                "{{\"fc.weight\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[0,{end}]}}}}"
            );
            let mut b = (header.len() as u64).to_le_bytes().to_vec();
            b.extend(header.as_bytes());
            b.extend([0u8; 16]);
            let ok = check_file("safetensors claim", &path, &b, |p| rest::infer::load(p).map(drop));
            prop_assert!(!ok);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    Ok(())
}

/// Sparse exports whose CSR `shape` tensors claim dense weights of up to 2^60 elements.
#[test]
fn sparse_export_shape_claims() -> Result<()> {
    use rest::infer::st::{RawTensor, StFile};
    let (dir, _) = tiny_run();
    let valid = StFile::read(&dir.path().join("m.safetensors"))?;
    let sparse: Vec<String> = valid
        .tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".shape").map(str::to_string))
        .collect();
    assert!(!sparse.is_empty(), "the export has CSR weights");
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("m.safetensors");
    // The real row count first (so that the CSR arrays still fit) or not, then any dims.
    let claims = (
        prop::sample::select(sparse),
        any::<bool>(),
        prop::collection::vec(any::<u32>(), 0..4),
    );
    runner(150)
        .run(&claims, |(base, keep_rows, tail)| {
            let mut f = valid.clone();
            let key = format!("{base}.shape");
            let real = f.tensors.get(&key).expect("shape").to_u32();
            let mut dims = if keep_rows { vec![real[0]] } else { vec![] };
            dims.extend(&tail);
            prop_assume!(dims != real);
            f.tensors
                .insert(key, RawTensor::u32(vec![dims.len()], &dims));
            let b = f.to_bytes().expect("bytes");
            let ok = check_file("CSR shape claim", &path, &b, |p| {
                rest::infer::load(p).map(drop)
            });
            prop_assert!(!ok);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    Ok(())
}

#[test]
fn pytorch_pth_files() -> Result<()> {
    let pth = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/init/resnet18w4.pth");
    let read = |p: &Path| rest::models::init::read_tensors(p).map(drop);
    let n = std::fs::metadata(&pth)?.len() as usize;
    // Zip entries' headers lie at the start of each entry and in the central directory at the
    // end; the pickle is the first entry.
    let e = file_mutations(".pth", &pth, &[], n, 150, read)?;
    assert!(e > 30, ".pth: {e}");
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("x.pth");
    arbitrary(".pth", 512, 100, |b| {
        std::fs::write(&path, b)?;
        read(&path)
    });
    Ok(())
}

/// `.pth` pickles whose strings claim up to 4 GB (candle would allocate the claim before
/// reading it).
#[test]
fn pytorch_pickle_string_claims() -> Result<()> {
    let pth = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/init/resnet18w4.pth");
    let valid = std::fs::read(&pth)?;
    // BINUNICODE opcodes (`X`, a u32 length, then that many bytes of a name) in the pickle.
    let strings: Vec<usize> = (0..valid.len().min(16_384) - 5)
        .filter(|&i| {
            valid[i] == b'X'
                && u32::from_le_bytes([valid[i + 1], valid[i + 2], valid[i + 3], valid[i + 4]]) < 64
        })
        .collect();
    assert!(strings.len() > 50, "{}", strings.len());
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("x.pth");
    runner(100)
        .run(
            &(prop::sample::select(strings), (1u32 << 16)..=u32::MAX),
            |(at, len)| {
                let mut b = valid.clone();
                b[at + 1..at + 5].copy_from_slice(&len.to_le_bytes());
                let ok = check_file(".pth string claim", &path, &b, |p| {
                    rest::models::init::read_tensors(p).map(drop)
                });
                prop_assert!(!ok);
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    Ok(())
}

/// Deeply nested TOML arrays and inline tables are an error or a value, not a stack overflow.
#[test]
fn deeply_nested_toml() {
    for open in ["[", "{a="] {
        let text = format!("epochs = {}", open.repeat(20_000));
        let r = check("nested TOML", text.len(), || {
            rest::train::TrainConfig::from_toml_str(&text).map(drop)
        });
        assert!(!r);
        let r = check("nested sweep TOML", text.len(), || {
            rest::sweep::SweepSpec::parse(&text, Path::new("s.toml")).map(drop)
        });
        assert!(!r);
    }
}

//! Datasets described by a table: Colored MNIST written by `rest data make colored-mnist
//! --format subpopbench|waterbirds` loads with the labels, attributes, splits and pixels of
//! its table; a generic table with names, and CelebA's two tables, load; minority groups
//! follow the stated rule; every method trains end to end on a table; bad tables are errors
//! naming the file, the line and the column.

mod common;

use anyhow::Result;
use common::{idx_source, ok, read_json, rest_cmd};
use rest::data::make::{make_colored_mnist_table, MakeFormat, MakeSpec, MnistSource, Palette};
use rest::data::{DataOptions, DatasetKind, GroupDataset};
use rest::train::methods::Method;
use std::path::{Path, PathBuf};

/// A Colored MNIST table dataset in `format` at 10 % conflicting, from 400 + 90 digits.
fn make(dir: &Path, name: &str, format: MakeFormat) -> Result<PathBuf> {
    let src = dir.join("mnist");
    if !src.is_dir() {
        idx_source(dir);
    }
    let out = dir.join(name);
    let spec = MakeSpec {
        source: MnistSource::Dir(src),
        out: out.clone(),
        palette: Palette::Dfa,
        severity: 5,
        seed: 3,
    };
    make_colored_mnist_table(&spec, format, 10.0)?;
    Ok(out)
}

fn opts(data: &Path) -> DataOptions {
    DataOptions {
        data: Some(data.to_path_buf()),
        ..DataOptions::default()
    }
}

fn load(o: &DataOptions) -> Result<GroupDataset> {
    o.validate()?;
    rest::data::load(&o.plan().source)
}

fn load_err(o: &DataOptions) -> String {
    match load(o) {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// The rows of a SubpopBench table: (filename, split, y, a).
fn subpop_rows(data: &Path) -> Vec<(String, usize, u32, u32)> {
    let text = std::fs::read_to_string(data.join("metadata_cmnist.csv")).expect("table");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("id,filename,split,y,a"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                f[1].to_string(),
                f[2].parse().expect("split"),
                f[3].parse().expect("y"),
                f[4].parse().expect("a"),
            )
        })
        .collect()
}

#[test]
fn subpopbench_table_loads_labels_attributes_splits_and_pixels() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = make(dir.path(), "cm", MakeFormat::Subpopbench)?;
    let o = opts(&data);
    assert_eq!(o.kind(), Some(DatasetKind::Subpop));
    let ds = load(&o)?;
    let rows = subpop_rows(&data);
    // 400 training digits; the 90 held-out ones split 1/3 validation, 2/3 test.
    assert_eq!(
        (ds.train.len(), ds.valid.len(), ds.test.len()),
        (400, 30, 60)
    );
    assert_eq!(ds.num_classes, 10);
    for (s, split) in [&ds.train, &ds.valid, &ds.test].into_iter().enumerate() {
        let want: Vec<&(String, usize, u32, u32)> = rows.iter().filter(|r| r.1 == s).collect();
        assert_eq!(split.len(), want.len());
        for (i, r) in want.iter().enumerate() {
            assert_eq!(
                (split.labels[i], split.bias[i]),
                (r.2, r.3),
                "split {s} row {i}"
            );
        }
        // The pixels of the first and the last image are those of their files.
        for i in [0, want.len() - 1] {
            let img = image::open(data.join(&want[i].0))?.to_rgb8().into_raw();
            let sz = split.image_size();
            assert_eq!(
                &split.images.contiguous().expect("one buffer")[i * sz..(i + 1) * sz],
                &img[..]
            );
        }
    }
    // 10 % conflicting: each class's 40 training digits hold 36 of their own colour; the
    // other colours' groups (under 0.2 of the class) are the minority groups, exactly the
    // label != colour samples here.
    let g = ds.train.groups.as_ref().expect("table groups");
    assert!(g.rule.contains("0.2"));
    for e in &g.train_groups {
        assert_eq!(e.minority, e.label != e.attribute, "{e:?}");
    }
    let conflicting = rows.iter().filter(|r| r.1 == 0 && r.2 != r.3).count();
    assert_eq!(conflicting, 40);
    assert_eq!(ds.train.conflicting_count(), conflicting);
    // An explicit list replaces the rule.
    let mut listed = opts(&data);
    listed.minority_groups = Some("0:2,3:3".into());
    let ds2 = load(&listed)?;
    let n02 = rows
        .iter()
        .filter(|r| r.1 == 0 && (r.2, r.3) == (0, 2))
        .count();
    let n33 = rows
        .iter()
        .filter(|r| r.1 == 0 && (r.2, r.3) == (3, 3))
        .count();
    assert!(n02 > 0 && n33 > 0);
    assert_eq!(ds2.train.conflicting_count(), n02 + n33);
    // The same images as a Waterbirds table: the same dataset.
    let wb = make(dir.path(), "wb", MakeFormat::Waterbirds)?;
    let mut w = opts(&wb);
    assert_eq!(w.kind(), Some(DatasetKind::Waterbirds));
    // Waterbirds' own pipeline: 224 px with ImageNet statistics, random resized crops in
    // training; at --image-size 28 images are resized to 32 (28 x 256/224) and centre-cropped
    // to 28.
    assert_eq!(w.plan().image_size, Some(224));
    w.image_size = Some(28);
    let plan = w.plan();
    assert!(plan.train_transform.resized_crop && plan.normalize.is_some());
    assert!(!plan.eval_transform.is_random());
    let dw = load(&w)?;
    for (a, b) in [
        (&ds.train, &dw.train),
        (&ds.valid, &dw.valid),
        (&ds.test, &dw.test),
    ] {
        assert_eq!((&a.labels, &a.bias), (&b.labels, &b.bias));
        assert_eq!((b.width, b.height), (28, 28));
    }
    let first = image::open(wb.join(&rows[0].0))?.to_rgb8();
    let big = image::imageops::resize(&first, 32, 32, image::imageops::FilterType::Triangle);
    let want = image::imageops::crop_imm(&big, 2, 2, 28, 28)
        .to_image()
        .into_raw();
    assert_eq!(
        &dw.train.images.contiguous().expect("one buffer")[..28 * 28 * 3],
        &want[..]
    );
    // `rest predict` prepares a file of such a run the same way (CHW, in [0, 1]).
    let g = DatasetKind::Waterbirds.geometry(Some(28));
    let x = rest::infer::predict::load_image_geometry(
        &wb.join(&rows[0].0),
        (3, 28, 28),
        image::imageops::FilterType::Triangle,
        Some(&g),
    )?;
    for p in 0..28 * 28 {
        for ch in 0..3 {
            assert_eq!(
                x[ch * 28 * 28 + p],
                f32::from(want[p * 3 + ch]) * (1.0 / 255.0)
            );
        }
    }
    // A generic table: the SubpopBench file with its columns named by flags.
    let mut t = opts(&data);
    t.dataset = DatasetKind::Table;
    t.table_file = Some("metadata_cmnist.csv".into());
    t.image_column = Some("filename".into());
    let dt = load(&t)?;
    assert_eq!(
        (&dt.train.labels, &dt.train.bias),
        (&ds.train.labels, &ds.train.bias)
    );
    Ok(())
}

fn png(path: &Path, w: u32, h: u32, v: [u8; 3]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    image::RgbImage::from_pixel(w, h, image::Rgb(v))
        .save(path)
        .expect("png");
}

#[test]
fn generic_table_with_names_and_celeba_tables() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("pets");
    let mut csv = String::from("path,animal,place,part\n");
    let rows = [
        ("dog", "indoor", "train"),
        ("cat", "outdoor", "train"),
        ("cat", "indoor", "train"),
        ("dog", "indoor", "val"),
        ("cat", "outdoor", "test"),
    ];
    for (i, (a, p, s)) in rows.iter().enumerate() {
        png(
            &root.join(format!("img/{i}.png")),
            6,
            5,
            [i as u8 * 40, 0, 0],
        );
        csv.push_str(&format!("img/{i}.png,{a},{p},{s}\n"));
    }
    std::fs::write(root.join("pets.csv"), &csv)?;
    let mut o = opts(&root);
    o.dataset = DatasetKind::Table;
    o.table_file = Some("pets.csv".into());
    o.image_column = Some("path".into());
    o.label_column = Some("animal".into());
    o.attribute_column = Some("place".into());
    o.split_column = Some("part".into());
    o.minority_share = Some(0.6);
    let ds = load(&o)?;
    // Names numbered in sorted order: cat 0, dog 1; indoor 0, outdoor 1.
    assert_eq!(ds.num_classes, 2);
    let g = ds.train.groups.as_ref().expect("groups");
    assert_eq!(
        g.class_names,
        Some(vec!["cat".to_string(), "dog".to_string()])
    );
    assert_eq!(
        g.attribute_names,
        Some(vec!["indoor".to_string(), "outdoor".to_string()])
    );
    assert_eq!(ds.train.labels, vec![1, 0, 0]);
    assert_eq!(ds.train.bias, vec![0, 1, 0]);
    assert_eq!(
        ds.train.images.contiguous().expect("one buffer")[6 * 5 * 3],
        40,
        "second image's red value"
    );
    assert_eq!((ds.valid.labels[0], ds.test.labels[0]), (1, 0));
    // Class cat holds (0,0) and (0,1) half each (< 0.6: both minority); dog only (1,0).
    assert_eq!(ds.train.conflicting_count(), 2);

    // CelebA: +-1 attributes, a partition table, images in img_align_celeba/.
    let root = dir.path().join("celeba");
    let mut attrs = String::from("image_id,Blond_Hair,Male,Smiling\n");
    let mut part = String::from("image_id,partition\n");
    let table = [
        (1, -1, 1, 0),
        (-1, 1, -1, 0),
        (1, 1, 1, 0),
        (-1, -1, 1, 1),
        (1, -1, -1, 2),
    ];
    for (i, (b, m, s, p)) in table.iter().enumerate() {
        let name = format!("{:06}.jpg", i + 1);
        // 190x200 images: the centre crop to 178 then the resize to --image-size 8.
        png(
            &root.join("img_align_celeba").join(&name),
            190,
            200,
            [200, 10, i as u8],
        );
        attrs.push_str(&format!("{name},{b},{m},{s}\n"));
        part.push_str(&format!("{name},{p}\n"));
    }
    // `.jpg` names holding PNG bytes decode by content.
    std::fs::write(root.join("list_attr_celeba.csv"), &attrs)?;
    std::fs::write(root.join("list_eval_partition.csv"), &part)?;
    let mut c = opts(&root);
    assert_eq!(c.kind(), Some(DatasetKind::Celeba));
    c.image_size = Some(8);
    let ds = load(&c)?;
    assert_eq!((ds.train.len(), ds.valid.len(), ds.test.len()), (3, 1, 1));
    assert_eq!((ds.train.width, ds.train.height), (8, 8));
    assert_eq!(ds.train.labels, vec![1, 0, 1]);
    assert_eq!(ds.train.bias, vec![0, 1, 1]);
    // A uniform image stays uniform through the crop and the resize (within rounding).
    for (px, want) in ds.train.images.contiguous().expect("one buffer")[..3]
        .iter()
        .zip([200u8, 10, 0])
    {
        assert!(px.abs_diff(want) <= 1, "{px} vs {want}");
    }
    c.target_attr = Some("Smiling".into());
    c.confounder_attr = Some("Blond_Hair".into());
    let ds = load(&c)?;
    assert_eq!(ds.train.labels, vec![1, 0, 1]);
    assert_eq!(ds.train.bias, vec![1, 0, 1]);
    c.target_attr = Some("Bald".into());
    let e = load_err(&c);
    assert!(
        e.contains("list_attr_celeba.csv") && e.contains("Bald") && e.contains("--target-attr"),
        "{e}"
    );
    Ok(())
}

/// A change to one line of a table.
type LineEdit = dyn Fn(&str) -> String;

/// Rewrites line `line` (1 = the header) of `file` with `f`.
fn edit_line(file: &Path, line: usize, f: impl Fn(&str) -> String) {
    let text = std::fs::read_to_string(file).expect("read");
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[line - 1] = f(&lines[line - 1]);
    std::fs::write(file, lines.join("\n") + "\n").expect("write");
}

#[test]
fn bad_tables_name_the_file_line_and_column() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let good = make(dir.path(), "cm", MakeFormat::Subpopbench)?;
    let table = "metadata_cmnist.csv";
    let fresh = |name: &str| -> PathBuf {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        for e in std::fs::read_dir(&good).expect("ls").flatten() {
            let p = e.path();
            if p.is_file() {
                std::fs::copy(&p, d.join(e.file_name())).expect("copy");
            }
        }
        // Images are shared through their path (absolute paths in the table are not
        // needed): link the images folder.
        std::os::unix::fs::symlink(good.join("images"), d.join("images")).expect("link");
        d
    };
    // Each case: a change to line 5 (a training row: id 3) and what the error must name.
    let cases: Vec<(&str, Box<LineEdit>, Vec<&str>)> = vec![
        (
            "split",
            Box::new(|l: &str| {
                let f: Vec<&str> = l.split(',').collect();
                format!("{},{},7,{},{}", f[0], f[1], f[3], f[4])
            }),
            vec!["line 5", "`split`", "\"7\""],
        ),
        (
            "label",
            Box::new(|l: &str| {
                let f: Vec<&str> = l.split(',').collect();
                format!("{},{},{},seven,{}", f[0], f[1], f[2], f[4])
            }),
            vec!["line 5", "`y`", "seven", "not an integer"],
        ),
        (
            "attr",
            Box::new(|l: &str| {
                let f: Vec<&str> = l.split(',').collect();
                format!("{},{},{},{},-1", f[0], f[1], f[2], f[3])
            }),
            vec!["line 5", "`a`", "\"-1\""],
        ),
        (
            "missing",
            Box::new(|l: &str| {
                let f: Vec<&str> = l.split(',').collect();
                format!(
                    "{},images/train/absent.png,{},{},{}",
                    f[0], f[2], f[3], f[4]
                )
            }),
            vec!["line 5", "`filename`", "absent.png", "does not exist"],
        ),
        (
            "dup",
            Box::new(|l: &str| {
                let f: Vec<&str> = l.split(',').collect();
                format!("0,{},{},{},{}", f[1], f[2], f[3], f[4])
            }),
            vec!["line 5", "`id`", "repeats", "line 2"],
        ),
        (
            "columns",
            Box::new(|l: &str| l.replace(",a", ",attr")),
            vec!["line 1", "no column `a`", "id, filename, split, y, attr"],
        ),
        (
            "short",
            Box::new(|l: &str| {
                l.rsplit_once(',')
                    .map(|(a, _)| a.to_string())
                    .unwrap_or_default()
            }),
            vec!["line 5"],
        ),
    ];
    for (name, f, needles) in cases {
        let d = fresh(name);
        let line = if name == "columns" { 1 } else { 5 };
        edit_line(&d.join(table), line, f);
        let e = load_err(&opts(&d));
        assert!(e.contains(table), "{name}: {e}");
        for n in needles {
            assert!(e.contains(n), "{name}: no {n:?} in {e}");
        }
    }
    // An unreadable image: its table line and its path.
    let d = fresh("corrupt");
    let first = subpop_rows(&d)[0].0.clone();
    std::fs::create_dir_all(d.join("bad"))?;
    std::fs::write(d.join("bad/x.png"), b"not a png")?;
    edit_line(&d.join(table), 2, |l| l.replace(&first, "bad/x.png"));
    let e = load_err(&opts(&d));
    assert!(
        e.contains("line 2") && e.contains("x.png") && e.contains("decode"),
        "{e}"
    );
    // --skip-bad skips it.
    let mut o = opts(&d);
    o.skip_bad = true;
    assert_eq!(load(&o)?.train.len(), 399);
    // A split with no samples.
    let d = fresh("empty");
    let text = std::fs::read_to_string(d.join(table))?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| l.split(',').nth(2) != Some("1"))
        .collect();
    std::fs::write(d.join(table), kept.join("\n") + "\n")?;
    let e = load_err(&opts(&d));
    assert!(
        e.contains(table) && e.contains("validation") && e.contains("no samples"),
        "{e}"
    );
    // Two SubpopBench tables: --table-file chooses.
    let d = fresh("two");
    std::fs::copy(d.join(table), d.join("metadata_other.csv"))?;
    let e = load_err(&opts(&d));
    assert!(
        e.contains("--table-file") && e.contains("metadata_other.csv"),
        "{e}"
    );
    let mut o = opts(&d);
    o.table_file = Some("metadata_other.csv".into());
    assert_eq!(load(&o)?.train.len(), 400);
    // Flags of tables on a non-table run, and bad rules.
    let o = DataOptions {
        minority_share: Some(0.1),
        ..DataOptions::default()
    };
    assert!(o
        .validate()
        .unwrap_err()
        .to_string()
        .contains("--minority-share"));
    let mut o = opts(&good);
    o.minority_share = Some(1.5);
    assert!(o
        .validate()
        .unwrap_err()
        .to_string()
        .contains("--minority-share"));
    let mut o = opts(&good);
    o.minority_groups = Some("0:x".into());
    assert!(o
        .validate()
        .unwrap_err()
        .to_string()
        .contains("--minority-groups"));
    let mut o = opts(&good);
    o.minority_groups = Some("0:0,11:0".into());
    let e = load_err(&o);
    assert!(e.contains("11:0") && e.contains("--minority-groups"), "{e}");
    Ok(())
}

#[test]
fn every_method_trains_on_a_table_and_reports_its_groups() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = make(dir.path(), "cm", MakeFormat::Subpopbench)?;
    for method in [
        Method::Upweight,
        Method::Erm,
        Method::Jtt,
        Method::GroupDro,
        Method::Balanced,
        Method::ClassBalanced,
    ] {
        let out = dir.path().join(format!("run-{}", method.as_str()));
        let mut cfg = common::tiny_config(&out);
        cfg.data.data = Some(data.clone());
        cfg.data.conflict_pct = 10.0;
        cfg.model.kind = rest::models::ModelKind::Mlp;
        cfg.sparse.density = 0.5;
        cfg.optim.epochs = 2;
        cfg.method.kind = method;
        cfg.method.jtt_epochs = 1;
        cfg.run.threads = Some(1);
        let o = rest::train::train(&cfg)?;
        let s = read_json(&out.join("summary.json"));
        let groups = s["groups"]["train_groups"].as_array().expect("groups");
        // Every class has its own colour's group and some conflicting ones.
        assert!(groups.len() > 10, "{method:?}");
        assert!(s["groups"]["rule"]
            .as_str()
            .expect("rule")
            .contains("--minority-share"));
        let test = &s["test"];
        let per_group = test["groups"].as_array().expect("per-group accuracies");
        let worst = per_group
            .iter()
            .map(|g| g["accuracy"].as_f64().expect("acc"))
            .fold(f64::INFINITY, f64::min);
        assert_eq!(test["worst_group"].as_f64(), Some(worst), "{method:?}");
        assert_eq!(o.summary.test.worst_group, worst);
        let wa = test["weighted_accuracy"].as_f64().expect("weighted");
        assert!((0.0..=1.0).contains(&wa));
        if method == Method::Jtt {
            let conflicting = s["jtt"]["conflicting"].as_u64().expect("jtt");
            assert_eq!(conflicting, 40);
        }
    }
    Ok(())
}

#[test]
fn cli_makes_a_table_and_trains_on_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = idx_source(dir.path());
    let data = dir.path().join("wb");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let o = rest_cmd(&[
        "data",
        "make",
        "colored-mnist",
        "--source",
        &s(&src),
        "--out",
        &s(&data),
        "--format",
        "waterbirds",
        "--conflict-pct",
        "5",
    ]);
    assert!(ok(&o).contains("metadata.csv"));
    let run = dir.path().join("run");
    let o = rest_cmd(&[
        "train",
        "--data",
        &s(&data),
        "--image-size",
        "16",
        "--method",
        "group-dro",
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--threads",
        "1",
        "--out",
        &s(&run),
    ]);
    ok(&o);
    let cfg = std::fs::read_to_string(run.join("config.toml"))?;
    assert!(cfg.contains("dataset = \"waterbirds\""), "{cfg}");
    assert_eq!(
        read_json(&run.join("data.json"))["input"],
        serde_json::json!([3, 16, 16])
    );
    // A bad table on the command line: one line naming the table and the line.
    edit_line(&data.join("metadata.csv"), 3, |l| {
        let mut f: Vec<&str> = l.split(',').collect();
        f[3] = "9";
        f.join(",")
    });
    let o = rest_cmd(&[
        "train",
        "--data",
        &s(&data),
        "--out",
        &s(&run),
        "--overwrite",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("metadata.csv line 3"), "{err}");
    Ok(())
}

/// Mutated tables (bytes flipped, inserted, deleted, lines cut short; 400 seeded variants per
/// layout) give a listing or an error, never a panic.
#[test]
fn mutated_tables_never_panic() -> Result<()> {
    use rand::{Rng, RngCore};
    use rest::data::table::{list, TableOptions};
    let dir = tempfile::tempdir()?;
    let data = make(dir.path(), "cm", MakeFormat::Subpopbench)?;
    let wb = make(dir.path(), "wb", MakeFormat::Waterbirds)?;
    // A small CelebA folder (images need not decode: the listing only checks they exist).
    let celeba = dir.path().join("celeba");
    std::fs::create_dir_all(celeba.join("img_align_celeba"))?;
    let mut attrs = String::from("image_id,Blond_Hair,Male\n");
    let mut part = String::from("image_id,partition\n");
    for i in 0..6 {
        let name = format!("{i:06}.jpg");
        std::fs::write(celeba.join("img_align_celeba").join(&name), b"x")?;
        attrs.push_str(&format!("{name},{},{}\n", 1 - 2 * (i % 2), 1 - 2 * (i / 3)));
        part.push_str(&format!("{name},{}\n", i % 3));
    }
    std::fs::write(celeba.join("list_attr_celeba.csv"), attrs)?;
    std::fs::write(celeba.join("list_eval_partition.csv"), part)?;
    let opts = |root: &Path, kind: DatasetKind| TableOptions {
        root: root.to_path_buf(),
        kind,
        file: (kind == DatasetKind::Table).then(|| PathBuf::from("metadata_cmnist.csv")),
        image_column: "filename".into(),
        label_column: "y".into(),
        attribute_column: "a".into(),
        split_column: "split".into(),
        target_attr: "Blond_Hair".into(),
        confounder_attr: "Male".into(),
        skip_bad: false,
        cache_dir: None,
    };
    let cases = [
        (data.clone(), "metadata_cmnist.csv", DatasetKind::Subpop),
        (data.clone(), "metadata_cmnist.csv", DatasetKind::Table),
        (wb.clone(), "metadata.csv", DatasetKind::Waterbirds),
        (celeba.clone(), "list_attr_celeba.csv", DatasetKind::Celeba),
        (
            celeba.clone(),
            "list_eval_partition.csv",
            DatasetKind::Celeba,
        ),
    ];
    let mut rng = rest::util::rng(11, 0);
    for (root, file, kind) in cases {
        let path = root.join(file);
        let original = std::fs::read(&path)?;
        assert!(list(&opts(&root, kind)).is_ok(), "{file} as {kind:?}");
        let mut errors = 0;
        for _ in 0..400 {
            let mut b = original.clone();
            // Mutate within the first 400 bytes (the header and first rows) most of the time.
            let span = if rng.random_bool(0.8) {
                b.len().min(400)
            } else {
                b.len()
            };
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..span.min(b.len()).max(1));
                match rng.random_range(0..4) {
                    0 if i < b.len() => b[i] = rng.next_u32() as u8,
                    1 => b.insert(i.min(b.len()), b",\n\"-01x\xff"[rng.random_range(0..8)]),
                    2 if i < b.len() => {
                        b.remove(i);
                    }
                    _ => b.truncate(i),
                }
            }
            std::fs::write(&path, &b)?;
            if list(&opts(&root, kind)).is_err() {
                errors += 1;
            }
        }
        // Most mutations break something; the readers noticed (and none panicked).
        assert!(
            errors > 100,
            "{file}: only {errors} of 400 mutations were errors"
        );
        std::fs::write(&path, &original)?;
    }
    Ok(())
}

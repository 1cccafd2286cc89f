//! Datasets described by a table: a folder of images and a CSV of file name, label, attribute
//! and split, in the conventions such datasets ship in:
//!
//! | layout | table | columns |
//! |---|---|---|
//! | `subpop` (SubpopBench) | `metadata_<name>.csv` | `id,filename,split,y,a`; split 0/1/2 = train/valid/test |
//! | `waterbirds` (group_DRO) | `metadata.csv` | `img_id,img_filename,y,split,place` |
//! | `celeba` (group_DRO) | `list_attr_celeba.csv` (+-1 attributes) + `list_eval_partition.csv` | target and confounder attributes by `--target-attr`/`--confounder-attr` |
//! | `table` (generic) | `--table-file` | `--image-column`, `--label-column`, `--attribute-column`, `--split-column` |
//!
//! This module reads the tables into per-split lists of image files with their label and
//! attribute (checking them: every error names the table, the line and the column); the
//! images are decoded, resized and cached by the shared path of `data::dfa`
//! ([`super::dfa::load_listed`]).

use super::dfa::{self, ListedFile, LoadGeometry};
use super::{DatasetKind, GroupDataset};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The Waterbirds table of group_DRO.
pub const WATERBIRDS_TABLE: &str = "metadata.csv";
/// CelebA's attribute table and partition table (group_DRO's file names).
pub const CELEBA_ATTRS: &str = "list_attr_celeba.csv";
pub const CELEBA_PARTITION: &str = "list_eval_partition.csv";
/// CelebA's image folder (images are looked up there when it exists, else in the root).
pub const CELEBA_IMAGES: &str = "img_align_celeba";
/// Labels and attributes at or above this are taken for a mistake rather than a class.
const MAX_CODE: u32 = 100_000;

/// How to read a table dataset (the table flags of `DataOptions`).
#[derive(Debug, Clone, PartialEq)]
pub struct TableOptions {
    pub root: PathBuf,
    /// `Subpop`, `Waterbirds`, `Celeba` or `Table`.
    pub kind: DatasetKind,
    /// The table (relative to `root` unless absolute); `None`: the layout's own name.
    pub file: Option<PathBuf>,
    pub image_column: String,
    pub label_column: String,
    pub attribute_column: String,
    pub split_column: String,
    /// CelebA: the attribute predicted and the confounding attribute.
    pub target_attr: String,
    pub confounder_attr: String,
    pub skip_bad: bool,
    pub cache_dir: Option<PathBuf>,
}

/// The table layout of a folder, when it holds one of the known tables: CelebA's attribute
/// list, Waterbirds' `metadata.csv`, or exactly one SubpopBench `metadata_<name>.csv`.
pub fn detect(root: &Path) -> Option<DatasetKind> {
    if root.join(CELEBA_ATTRS).is_file() {
        return Some(DatasetKind::Celeba);
    }
    if root.join(WATERBIRDS_TABLE).is_file() {
        return Some(DatasetKind::Waterbirds);
    }
    if !subpop_tables(root).is_empty() {
        return Some(DatasetKind::Subpop);
    }
    None
}

/// The `metadata_<name>.csv` files of `root`, sorted.
fn subpop_tables(root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("metadata_") && n.ends_with(".csv"))
        })
        .collect();
    out.sort();
    out
}

/// What a table lists: the image files of each split with label and attribute, and the
/// names of classes and attribute values where the table spells them as words.
#[derive(Debug, Clone)]
pub struct Listing {
    pub table: PathBuf,
    pub files: [Vec<ListedFile>; 3],
    pub num_classes: usize,
    /// Class names in label order, when the labels were names (else `None`).
    pub class_names: Option<Vec<String>>,
    /// Attribute names in value order, when the attributes were names.
    pub attribute_names: Option<Vec<String>>,
}

/// The split of a code: `0`/`train`, `1`/`valid`/`val`/`validation`, `2`/`test`.
fn split_of(code: &str) -> Option<usize> {
    match code.trim().to_ascii_lowercase().as_str() {
        "0" | "train" | "training" => Some(0),
        "1" | "valid" | "val" | "validation" => Some(1),
        "2" | "test" => Some(2),
        _ => None,
    }
}

/// A CSV table read whole: header and records with their line numbers.
struct Table {
    path: PathBuf,
    header: Vec<String>,
    rows: Vec<(u64, csv::StringRecord)>,
}

impl Table {
    fn read(path: &Path) -> Result<Table> {
        let mut rd = csv::ReaderBuilder::new()
            .has_headers(true)
            .trim(csv::Trim::All)
            .from_path(path)
            .with_context(|| format!("cannot open the table {}", path.display()))?;
        let header: Vec<String> = rd
            .headers()
            .with_context(|| format!("{}: cannot read the header line", path.display()))?
            .iter()
            .map(str::to_string)
            .collect();
        let mut rows = Vec::new();
        for rec in rd.records() {
            let rec = rec.map_err(|e| {
                let line = e.position().map_or(0, |p| p.line());
                anyhow::anyhow!("{} line {line}: {e}", path.display())
            })?;
            let line = rec.position().map_or(0, |p| p.line());
            rows.push((line, rec));
        }
        Ok(Table {
            path: path.to_path_buf(),
            header,
            rows,
        })
    }

    /// The index of column `name`; the error lists the columns the table has.
    fn column(&self, name: &str, flag: &str) -> Result<usize> {
        self.header.iter().position(|h| h == name).with_context(|| {
            format!(
                "{} line 1: no column `{name}`{flag}; the table's columns are: {}",
                self.path.display(),
                self.header.join(", ")
            )
        })
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

/// Reads the integer codes or names of one column into indices. Integer columns (every value
/// a non-negative integer) keep their values; otherwise the distinct names, sorted, are
/// numbered from 0 (and returned).
fn codes(
    t: &Table,
    col: usize,
    what: &str,
    names_allowed: bool,
) -> Result<(Vec<u32>, Option<Vec<String>>)> {
    let cname = &t.header[col];
    let vals: Vec<&str> = t
        .rows
        .iter()
        .map(|(_, r)| r.get(col).unwrap_or(""))
        .collect();
    let ints: Vec<Option<u32>> = vals
        .iter()
        .map(|v| v.parse::<u32>().ok().filter(|&x| x < MAX_CODE))
        .collect();
    if ints.iter().all(Option::is_some) {
        return Ok((ints.into_iter().flatten().collect(), None));
    }
    if !names_allowed {
        let (i, _) = ints
            .iter()
            .enumerate()
            .find(|(_, v)| v.is_none())
            .context("internal error: a non-integer value was expected")?;
        bail!(
            "{} line {}, column `{cname}`: the {what} {:?} is not an integer in 0..{MAX_CODE}",
            t.name(),
            t.rows[i].0,
            vals[i]
        );
    }
    if let Some(i) = vals.iter().position(|v| v.is_empty()) {
        bail!(
            "{} line {}, column `{cname}`: the {what} is empty",
            t.name(),
            t.rows[i].0
        );
    }
    let names: BTreeSet<&str> = vals.iter().copied().collect();
    let names: Vec<String> = names.into_iter().map(str::to_string).collect();
    let index: HashMap<&str, u32> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u32))
        .collect();
    Ok((vals.iter().map(|v| index[v]).collect(), Some(names)))
}

/// One table row's image: the path it names, which must be a file.
fn image_path(t: &Table, line: u64, col: usize, dir: &Path, rel: &str) -> Result<PathBuf> {
    if rel.is_empty() {
        bail!(
            "{} line {line}, column `{}`: the image file name is empty",
            t.name(),
            t.header[col]
        );
    }
    let p = dir.join(rel);
    if !p.is_file() {
        bail!(
            "{} line {line}, column `{}`: the image {} does not exist (image paths are relative \
             to {})",
            t.name(),
            t.header[col],
            p.display(),
            dir.display()
        );
    }
    Ok(p)
}

/// Checks that no value of column `col` repeats; the error names both lines.
fn check_unique(t: &Table, col: usize) -> Result<()> {
    let mut seen: HashMap<&str, u64> = HashMap::new();
    for (line, r) in &t.rows {
        let v = r.get(col).unwrap_or("");
        if let Some(first) = seen.insert(v, *line) {
            bail!(
                "{} line {line}, column `{}`: the id {v:?} repeats (first on line {first})",
                t.name(),
                t.header[col]
            );
        }
    }
    Ok(())
}

/// The columns of a one-table layout.
struct Columns<'a> {
    id: Option<&'a str>,
    image: &'a str,
    label: &'a str,
    attribute: &'a str,
    split: &'a str,
    /// Flags that name the columns, for the error (empty for fixed layouts).
    flags: [&'a str; 4],
    names_allowed: bool,
}

fn list_one_table(root: &Path, path: &Path, c: &Columns) -> Result<Listing> {
    let t = Table::read(path)?;
    let col = |name: &str, flag: &str| {
        let hint = if flag.is_empty() {
            String::new()
        } else {
            format!(" (set by {flag})")
        };
        t.column(name, &hint)
    };
    let image = col(c.image, c.flags[0])?;
    let label = col(c.label, c.flags[1])?;
    let attribute = col(c.attribute, c.flags[2])?;
    let split = col(c.split, c.flags[3])?;
    check_unique(&t, c.id.map(|id| col(id, "")).transpose()?.unwrap_or(image))?;
    let (labels, class_names) = codes(&t, label, "label", c.names_allowed)?;
    let (attrs, attribute_names) = codes(&t, attribute, "attribute", c.names_allowed)?;
    let mut files: [Vec<ListedFile>; 3] = Default::default();
    for (i, (line, r)) in t.rows.iter().enumerate() {
        let code = r.get(split).unwrap_or("");
        let s = split_of(code).with_context(|| {
            format!(
                "{} line {line}, column `{}`: unknown split {code:?} (expected 0/1/2 or \
                 train/valid/test)",
                t.name(),
                t.header[split]
            )
        })?;
        let p = image_path(&t, *line, image, root, r.get(image).unwrap_or(""))?;
        files[s].push(ListedFile {
            path: p,
            label: labels[i],
            attribute: attrs[i],
            origin: format!("{} line {line}", t.name()),
        });
    }
    let num_classes = match &class_names {
        Some(n) => n.len(),
        None => labels.iter().max().map_or(0, |&m| m as usize + 1),
    };
    Ok(Listing {
        table: path.to_path_buf(),
        files,
        num_classes,
        class_names,
        attribute_names,
    })
}

/// CelebA: the target and confounder attributes (+1 -> 1, -1 -> 0) of every image of the
/// attribute table, split by the partition table.
fn list_celeba(root: &Path, o: &TableOptions) -> Result<Listing> {
    let attrs = Table::read(&root.join(CELEBA_ATTRS))?;
    let part = Table::read(&root.join(CELEBA_PARTITION)).with_context(|| {
        format!("CelebA needs {CELEBA_PARTITION} beside {CELEBA_ATTRS} (the split of each image)")
    })?;
    let id = attrs.column("image_id", "")?;
    let target = attrs.column(&o.target_attr, " (set by --target-attr)")?;
    let conf = attrs.column(&o.confounder_attr, " (set by --confounder-attr)")?;
    check_unique(&attrs, id)?;
    let pid = part.column("image_id", "")?;
    let pcol = part.column("partition", "")?;
    check_unique(&part, pid)?;
    let mut split_of_id: HashMap<&str, (usize, u64)> = HashMap::new();
    for (line, r) in &part.rows {
        let code = r.get(pcol).unwrap_or("");
        let s = match code {
            "0" => 0,
            "1" => 1,
            "2" => 2,
            _ => bail!(
                "{} line {line}, column `partition`: unknown split {code:?} (expected 0, 1 or 2)",
                part.name()
            ),
        };
        split_of_id.insert(r.get(pid).unwrap_or(""), (s, *line));
    }
    let dir = if root.join(CELEBA_IMAGES).is_dir() {
        root.join(CELEBA_IMAGES)
    } else {
        root.to_path_buf()
    };
    let pm = |r: &csv::StringRecord, col: usize, line: u64| -> Result<u32> {
        match r.get(col).unwrap_or("") {
            "1" => Ok(1),
            "-1" | "0" => Ok(0),
            v => bail!(
                "{} line {line}, column `{}`: the attribute {v:?} is not 1 or -1 (0 is read as \
                 -1)",
                attrs.name(),
                attrs.header[col]
            ),
        }
    };
    let mut files: [Vec<ListedFile>; 3] = Default::default();
    for (line, r) in &attrs.rows {
        let name = r.get(id).unwrap_or("");
        let (s, _) = *split_of_id.get(name).with_context(|| {
            format!(
                "{} line {line}: the image {name:?} has no row in {}",
                attrs.name(),
                part.name()
            )
        })?;
        files[s].push(ListedFile {
            path: image_path(&attrs, *line, id, &dir, name)?,
            label: pm(r, target, *line)?,
            attribute: pm(r, conf, *line)?,
            origin: format!("{} line {line}", attrs.name()),
        });
    }
    let yes_no = |a: &str| Some(vec![format!("not {a}"), a.to_string()]);
    Ok(Listing {
        table: root.join(CELEBA_ATTRS),
        files,
        num_classes: 2,
        class_names: yes_no(&o.target_attr),
        attribute_names: yes_no(&o.confounder_attr),
    })
}

/// Reads the table(s) of `o` (checking every row) into the image files of each split.
pub fn list(o: &TableOptions) -> Result<Listing> {
    let root = &o.root;
    let table_path = |default: Option<&str>| -> Result<PathBuf> {
        match (&o.file, default) {
            (Some(f), _) => Ok(root.join(f)),
            (None, Some(d)) => Ok(root.join(d)),
            (None, None) => bail!(
                "--dataset table needs --table-file FILE (the CSV, relative to --data {})",
                root.display()
            ),
        }
    };
    let listing = match o.kind {
        DatasetKind::Celeba => list_celeba(root, o)?,
        DatasetKind::Waterbirds => {
            let c = Columns {
                id: Some("img_id"),
                image: "img_filename",
                label: "y",
                attribute: "place",
                split: "split",
                flags: [""; 4],
                names_allowed: false,
            };
            list_one_table(root, &table_path(Some(WATERBIRDS_TABLE))?, &c)?
        }
        DatasetKind::Subpop => {
            let path = match &o.file {
                Some(f) => root.join(f),
                None => match subpop_tables(root).as_slice() {
                    [one] => one.clone(),
                    [] => bail!(
                        "--data {}: no SubpopBench table metadata_<name>.csv in the folder",
                        root.display()
                    ),
                    many => bail!(
                        "--data {}: several SubpopBench tables ({}); choose one with --table-file",
                        root.display(),
                        many.iter()
                            .filter_map(|p| p.file_name()?.to_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                },
            };
            let c = Columns {
                id: Some("id"),
                image: "filename",
                label: "y",
                attribute: "a",
                split: "split",
                flags: [""; 4],
                names_allowed: false,
            };
            list_one_table(root, &path, &c)?
        }
        DatasetKind::Table => {
            let c = Columns {
                id: None,
                image: &o.image_column,
                label: &o.label_column,
                attribute: &o.attribute_column,
                split: &o.split_column,
                flags: [
                    "--image-column",
                    "--label-column",
                    "--attribute-column",
                    "--split-column",
                ],
                names_allowed: true,
            };
            list_one_table(root, &table_path(None)?, &c)?
        }
        other => bail!(
            "internal error: --dataset {} is not a table layout",
            other.as_str()
        ),
    };
    for (f, what) in listing
        .files
        .iter()
        .zip(["training (0)", "validation (1)", "test (2)"])
    {
        if f.is_empty() {
            bail!(
                "{}: the {what} split has no samples; a dataset needs images in every split",
                listing.table.display()
            );
        }
    }
    Ok(listing)
}

/// Loads a table dataset: its listing, then the images through the shared decoding, resizing
/// and caching of `data::dfa` with `geometry`.
pub fn load(o: &TableOptions, geometry: &LoadGeometry) -> Result<(GroupDataset, Listing)> {
    let listing = list(o)?;
    let name = listing.table.file_stem().map_or_else(
        || o.kind.as_str().to_string(),
        |s| s.to_string_lossy().into_owned(),
    );
    let load = dfa::load_listed(
        &o.root,
        o.kind,
        &name,
        &listing.files,
        o.skip_bad,
        o.cache_dir.as_deref(),
        geometry,
    )?;
    let base = o
        .root
        .canonicalize()
        .unwrap_or_else(|_| o.root.clone())
        .file_name()
        .map_or_else(
            || o.kind.as_str().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
    let [train, valid, test] = load.splits;
    Ok((
        GroupDataset {
            name: format!("{base}-{}", o.kind.as_str()),
            num_classes: listing.num_classes.max(load.num_classes),
            train,
            valid,
            test,
        },
        listing,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_codes() {
        assert_eq!(split_of("0"), Some(0));
        assert_eq!(split_of(" Val "), Some(1));
        assert_eq!(split_of("test"), Some(2));
        assert_eq!(split_of("3"), None);
        assert_eq!(split_of(""), None);
    }
}

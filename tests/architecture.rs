//! The module layering of ARCHITECTURE.md, checked on the source: every `crate::<module>`
//! reference in `src/` (comments aside) points to a module of the same or a lower layer, so
//! the modules form no import cycle and none imports from a layer above it.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

/// The layers, lowest first (ARCHITECTURE.md, "Layers").
const LAYERS: &[&[&str]] = &[
    &["util", "device", "alloc"],
    &["kernels"],
    &["nn", "data"],
    &["sparse"],
    &["models"],
    &["train"],
    &["report", "bench"],
    &["infer", "sweep"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// `crate::<module>` references of every file under `src/<module>` (or `src/<module>.rs`),
/// outside comments and `#[cfg(test)]` modules.
fn references() -> BTreeMap<String, Vec<(String, String)>> {
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for (rel, bytes) in common::tree(&src) {
        if rel.extension().is_none_or(|x| x != "rs") {
            continue;
        }
        let first = rel.components().next().expect("component");
        let module = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let text = String::from_utf8_lossy(&bytes);
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for line in code.lines() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            for (i, _) in line.match_indices("crate::") {
                let name: String = line[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                out.entry(module.clone())
                    .or_default()
                    .push((name, rel.display().to_string()));
            }
        }
    }
    out
}

#[test]
fn modules_import_only_from_their_layer_or_below() {
    let mut bad = Vec::new();
    for (module, refs) in references() {
        let Some(from) = layer_of(&module) else {
            // lib.rs, main.rs: the crate root and the binary dispatch everything.
            assert!(
                ["lib", "main"].contains(&module.as_str()),
                "src/{module} is in no layer: add it to LAYERS and ARCHITECTURE.md"
            );
            continue;
        };
        for (to, file) in refs {
            let Some(layer) = layer_of(&to) else {
                continue; // not a top-level module (a macro, an item of lib.rs)
            };
            if layer > from {
                bad.push(format!(
                    "src/{file}: {module} (layer {from}) uses crate::{to} (layer {layer})"
                ));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "imports from a layer above:\n{}",
        bad.join("\n")
    );
}

#[test]
fn every_top_level_module_has_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for e in std::fs::read_dir(&src).expect("read src") {
        let p = e.expect("entry").path();
        let name = p.file_stem().expect("name").to_string_lossy().to_string();
        if name == "lib" || name == "main" {
            continue;
        }
        assert!(
            layer_of(&name).is_some(),
            "src/{name} is in no layer of LAYERS"
        );
    }
}

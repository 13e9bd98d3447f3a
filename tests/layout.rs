//! The layout is part of the contract (docs/ARCHITECTURE.md): every file under src/ is
//! named in the map, no file runs past 600 lines, and no folder imports from a folder that
//! imports it back (directly or round a longer circle).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs" || e == "py" || e == "yaml") {
            out.push(path);
        }
    }
}

fn src_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    rust_files(&Path::new(ROOT).join("src"), &mut files);
    files.sort();
    files
}

/// `src/router/pair/mod.rs` -> `router/pair`; `src/router/pair/retry.rs` -> `router/pair`.
fn folder_of(file: &Path) -> String {
    let rel = file.strip_prefix(Path::new(ROOT).join("src")).unwrap();
    rel.parent().map(|p| p.to_string_lossy().replace('\\', "/")).unwrap_or_default()
}

/// The module path of a file: `src/router/pair/retry.rs` -> [router, pair, retry].
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(Path::new(ROOT).join("src")).unwrap();
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib" || p == "main") {
        parts.pop();
    }
    parts
}

/// The folders the module path `path` (as written in `file`) points into, longest first.
fn target_folder(file: &Path, path: &[&str], folders: &BTreeSet<String>) -> Option<String> {
    let mut module = module_of(file);
    let mut segs = path.to_vec();
    match segs.first().copied() {
        Some("crate") => {
            module.clear();
            segs.remove(0);
        }
        Some("super") => {
            while segs.first() == Some(&"super") {
                module.pop();
                segs.remove(0);
            }
        }
        Some("self") => {
            segs.remove(0);
        }
        _ => return None,
    }
    let mut full: Vec<String> = module;
    full.extend(segs.iter().map(|s| s.to_string()));
    // The longest prefix that is a folder.
    (1..=full.len()).rev().map(|n| full[..n].join("/")).find(|p| folders.contains(p))
}

/// Every `crate::`/`super::` path in the file's code (comments skipped).
fn paths_in(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let bytes = code.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if !code.is_char_boundary(i) {
                i += 1;
                continue;
            }
            let rest = &code[i..];
            let starts = rest.starts_with("crate::") || rest.starts_with("super::");
            let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_' || bytes[i - 1] == b':');
            if starts && boundary {
                let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
                let path: Vec<String> = rest[..end].split("::").filter(|s| !s.is_empty()).map(str::to_owned).collect();
                out.push(path);
                i += end.max(1);
            } else {
                i += 1;
            }
        }
    }
    out
}

/// The files the map in docs/ARCHITECTURE.md places under `src/`: its first code block
/// is a tree, two spaces a level, folders ending in `/`; lines indented deeper than one
/// level below the last entry continue a description.
fn files_in_map(map: &str) -> BTreeSet<String> {
    let block = map.split("```").nth(1).expect("docs/ARCHITECTURE.md has a code block");
    let mut stack: Vec<String> = Vec::new();
    let mut files = BTreeSet::new();
    for line in block.lines() {
        let indent = line.len() - line.trim_start().len();
        let Some(name) = line.split_whitespace().next() else { continue };
        let depth = indent / 2;
        let entry = indent % 2 == 0
            && depth <= stack.len()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
            && (name.ends_with('/') || name.contains('.'));
        if !entry {
            continue;
        }
        stack.truncate(depth);
        if let Some(folder) = name.strip_suffix('/') {
            stack.push(folder.to_string());
        } else {
            files.insert(stack.iter().map(|f| format!("{f}/")).collect::<String>() + name);
        }
    }
    files
}

#[test]
fn every_file_under_src_is_in_architecture_md_at_its_place() {
    let map = std::fs::read_to_string(Path::new(ROOT).join("docs/ARCHITECTURE.md")).unwrap();
    let listed = files_in_map(&map);
    let present: BTreeSet<String> =
        src_files().iter().map(|f| f.strip_prefix(ROOT).unwrap().to_string_lossy().trim_start_matches('/').replace('\\', "/")).collect();
    let missing: Vec<&String> = present.difference(&listed).collect();
    let stale: Vec<&String> = listed.difference(&present).collect();
    assert!(missing.is_empty(), "docs/ARCHITECTURE.md's map does not place: {missing:?}");
    assert!(stale.is_empty(), "docs/ARCHITECTURE.md's map names files that are not there: {stale:?}");
}

#[test]
fn no_file_runs_past_600_lines() {
    let long: Vec<String> = src_files()
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "rs"))
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > 600).then(|| format!("{} ({n})", f.strip_prefix(ROOT).unwrap().display()))
        })
        .collect();
    assert!(long.is_empty(), "files over 600 lines: {long:?}");
}

#[test]
fn no_folder_imports_a_folder_that_imports_it_back() {
    let files: Vec<PathBuf> = src_files().into_iter().filter(|f| f.extension().is_some_and(|e| e == "rs")).collect();
    let folders: BTreeSet<String> = files.iter().map(|f| folder_of(f)).filter(|f| !f.is_empty()).collect();
    let mut edges: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for f in &files {
        let from = folder_of(f);
        let text = std::fs::read_to_string(f).unwrap();
        for path in paths_in(&text) {
            let segs: Vec<&str> = path.iter().map(String::as_str).collect();
            let Some(to) = target_folder(f, &segs, &folders) else { continue };
            if to == from {
                continue;
            }
            let shown = format!("{} uses {}", f.strip_prefix(ROOT).unwrap().display(), path.join("::"));
            edges.entry(from.clone()).or_default().entry(to).or_insert(shown);
        }
    }
    // A circle is a path from a folder back to itself; report the first of each.
    let mut circles = Vec::new();
    for start in edges.keys() {
        let mut stack: Vec<(String, Vec<String>)> = vec![(start.clone(), vec![])];
        let mut seen = BTreeSet::new();
        while let Some((at, trail)) = stack.pop() {
            for (next, why) in edges.get(&at).into_iter().flatten() {
                let mut t = trail.clone();
                t.push(why.clone());
                if next == start {
                    circles.push(t.join("; "));
                } else if seen.insert(next.clone()) {
                    stack.push((next.clone(), t));
                }
            }
        }
    }
    circles.sort();
    circles.dedup();
    assert!(circles.is_empty(), "folders that import each other round a circle:\n{}", circles.join("\n"));
}

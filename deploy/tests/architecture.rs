//! `.docs/ARCHITECTURE.md` matches the tree: it names every workspace crate, and every path
//! it names exists. (This crate checks what the repository ships besides code.)

use std::collections::BTreeSet;
use std::path::Path;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The `members` of the workspace manifest, plus the fuzz crate outside it.
fn crate_dirs() -> Vec<String> {
    let manifest = read("Cargo.toml");
    let members = manifest
        .split_once("members = [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| list)
        .unwrap_or_default();
    let mut dirs: Vec<String> = members
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect();
    dirs.push("proxy/fuzz".into());
    dirs
}

fn package_name(dir: &str) -> String {
    read(&format!("{dir}/Cargo.toml"))
        .lines()
        .find_map(|l| l.strip_prefix("name = "))
        .map(|n| n.trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("{dir}/Cargo.toml has no name"))
}

#[test]
fn every_crate_is_in_the_table_at_its_path() {
    let doc = read(".docs/ARCHITECTURE.md");
    for dir in crate_dirs() {
        let name = package_name(&dir);
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{name}` |")))
            .unwrap_or_else(|| panic!("{name} ({dir}) is missing from ARCHITECTURE.md"));
        assert!(
            row.contains(&format!("`{dir}/`")),
            "ARCHITECTURE.md puts {name} elsewhere than {dir}/: {row}"
        );
    }
}

#[test]
fn every_path_it_names_exists() {
    let doc = read(".docs/ARCHITECTURE.md");
    let mut paths = BTreeSet::new();
    for quoted in doc.split('`').skip(1).step_by(2) {
        let looks_like_path = [
            "proxy/", "agent/", "wrapper/", "benches/", "deploy/", ".docs/",
        ]
        .iter()
        .any(|top| quoted.starts_with(top))
            && !quoted.contains(' ');
        if looks_like_path {
            paths.insert(quoted.trim_end_matches('/').to_string());
        }
    }
    assert!(paths.len() >= 10, "few paths found: {paths:?}");
    for p in paths {
        assert!(
            root().join(&p).exists(),
            "ARCHITECTURE.md names {p}, which does not exist"
        );
    }
}

#[test]
fn the_readme_points_to_it() {
    assert!(read("README.md").contains("(.docs/ARCHITECTURE.md)"));
}

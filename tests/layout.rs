//! The source layout keeps the data's way readable (docs/ARCHITECTURE.md): no import loops
//! between modules or between the top-level components, and no stage imports a command. Read
//! from the source text, so a change that breaks a rule fails here with the path that breaks it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`stream::sink`) → the modules it refers to.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn module_of(file: &Path, src: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    match parts.as_slice() {
        [only] if only == "lib" || only == "main" => None,
        _ => Some(parts.join("::")),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `a::b::c` style paths that follow `prefix` in `text` (`crate::`, `super::`, or a child module
/// name at the start of a `use`).
fn paths_after<'a>(text: &'a str, prefix: &'a str) -> impl Iterator<Item = Vec<&'a str>> + 'a {
    text.match_indices(prefix).filter_map(move |(i, _)| {
        let before = text[..i].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            return None; // part of a longer path or name
        }
        let rest = &text[i + prefix.len()..];
        let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
        Some(rest[..end].split("::").filter(|s| !s.is_empty()).collect())
    })
}

/// The longest known module that `segments` (relative to the crate root) names.
fn resolve(segments: &[&str], modules: &BTreeSet<String>) -> Option<String> {
    (1..=segments.len()).rev().map(|n| segments[..n].join("::")).find(|m| modules.contains(m))
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(f, &src)).collect();
    let mut graph = Graph::new();
    for file in &files {
        let Some(module) = module_of(file, &src) else { continue };
        let text = std::fs::read_to_string(file).unwrap();
        // Unit tests may reach anywhere; comments are not imports.
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        let code: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
        let is_mod_rs = file.file_name().is_some_and(|n| n == "mod.rs");
        let mut targets = BTreeSet::new();
        for path in paths_after(&code, "crate::") {
            targets.extend(resolve(&path, &modules));
        }
        // `super` of `a::b` (a/b.rs) is `a`; of `a` (a/mod.rs) it is the crate root.
        let parts: Vec<&str> = module.split("::").collect();
        for path in paths_after(&code, "super::") {
            let full: Vec<&str> = parts[..parts.len() - 1].iter().copied().chain(path).collect();
            targets.extend(resolve(&full, &modules));
        }
        // `use child::Item;` inside a folder's mod.rs.
        if is_mod_rs {
            for line in code.lines().map(str::trim).filter(|l| l.starts_with("use ") || l.starts_with("pub use ")) {
                let path = line.trim_start_matches("pub ").trim_start_matches("use ");
                let first = path.split("::").next().unwrap_or_default();
                let child = format!("{module}::{first}");
                if modules.contains(&child) {
                    targets.insert(child);
                }
            }
        }
        targets.remove(&module);
        graph.insert(module, targets);
    }
    graph
}

/// Every cycle's modules, found by depth-first search (each reported once, as a path).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    fn visit(node: &str, graph: &Graph, stack: &mut Vec<String>, done: &mut BTreeSet<String>, found: &mut Vec<Vec<String>>) {
        if let Some(i) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(node.to_string());
            found.push(cycle);
            return;
        }
        if done.contains(node) {
            return;
        }
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, stack, done, found);
        }
        stack.pop();
        done.insert(node.to_string());
    }
    let (mut done, mut found) = (BTreeSet::new(), Vec::new());
    for node in graph.keys() {
        visit(node, graph, &mut Vec::new(), &mut done, &mut found);
    }
    found
}

fn component(module: &str) -> String {
    module.split("::").next().unwrap_or_default().to_string()
}

#[test]
fn the_module_graph_has_no_import_loop() {
    let graph = graph();
    assert!(graph.contains_key("stream::sink") && graph["stream::sink"].contains("delivery"), "the scan sees imports: {graph:#?}");
    let found = cycles(&graph);
    assert!(found.is_empty(), "import loops between modules:\n{}", found.iter().map(|c| c.join(" → ")).collect::<Vec<_>>().join("\n"));
}

#[test]
fn the_components_depend_on_each_other_without_loops() {
    let mut components = Graph::new();
    for (from, targets) in graph() {
        let entry = components.entry(component(&from)).or_default();
        entry.extend(targets.iter().map(|t| component(t)).filter(|t| *t != component(&from)));
    }
    let found = cycles(&components);
    assert!(found.is_empty(), "loops between top-level components:\n{}", found.iter().map(|c| c.join(" → ")).collect::<Vec<_>>().join("\n"));
}

#[test]
fn no_stage_imports_a_command() {
    let offenders: Vec<String> = graph()
        .into_iter()
        .filter(|(from, _)| component(from) != "cli")
        .filter(|(_, targets)| targets.iter().any(|t| component(t) == "cli"))
        .map(|(from, _)| from)
        .collect();
    assert!(offenders.is_empty(), "modules outside cli/ that import a command: {offenders:?}");
}

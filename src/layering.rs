//! The layers of this crate, and the test that holds the code to them.
//!
//! Each top-level module is a layer and may use only the layers below it
//! (and the core crate, which is below them all):
//!
//! | layer | module | may use |
//! |---|---|---|
//! | 1 | `config` | the core crate |
//! | 2 | `net` | `config` |
//! | 3 | `store` | `config`, `net` |
//! | 4 | `service` | the layers above this row |
//! | 5 | `http` | the layers above this row |
//! | 6 | `app` | everything |
//!
//! Inside a layer, its files may use each other, but without a cycle (a
//! file may always name its own parent module, which declares it). The
//! test reads `crate::` and `super::` paths in the source, as a newcomer
//! would; it also checks that the core crate depends on nothing that does
//! I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules, lowest layer first.
const LAYERS: &[&str] = &["config", "net", "store", "service", "http", "app"];

/// Crates that do I/O: none may be a dependency of the core crate.
const IO_CRATES: &[&str] = &[
    "tokio",
    "tokio-rustls",
    "rustls",
    "hyper",
    "hyper-util",
    "http",
    "http-body-util",
    "rocksdb",
    "mio",
    "reqwest",
    "metrics",
    "tracing",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("src is readable") {
        let p = e.expect("a directory entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The text without comments and string literals: only code names
/// modules.
fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// The module path of a file under `src`: `store/journal.rs` is
/// `store::journal`, `store/mod.rs` is `store`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// Every module path named by `crate::a::b…` or `super::…` in `code`,
/// as written (the longest run of lower-case segments).
fn named_paths(module: &[String], code: &str, is_mod_rs: bool) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let words: Vec<&str> = code
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':' || c == '{'))
        .collect();
    for w in words {
        let segs: Vec<&str> = w.split("::").collect();
        let (mut base, rest): (Vec<String>, &[&str]) = match segs.first() {
            Some(&"crate") => (Vec::new(), &segs[1..]),
            Some(&"super") => {
                // `super` of a `mod.rs` is the directory's parent.
                let mut b = module.to_vec();
                if !is_mod_rs || !b.is_empty() {
                    b.pop();
                }
                let mut r = &segs[1..];
                while r.first() == Some(&"super") {
                    b.pop();
                    r = &r[1..];
                }
                (b, r)
            }
            _ => continue,
        };
        for s in rest {
            let s = s.trim_start_matches('{');
            if s.is_empty() || !s.starts_with(|c: char| c.is_ascii_lowercase()) {
                break;
            }
            base.push(s.to_owned());
        }
        out.push(base);
    }
    // `use crate::{a, b::c}` and `crate::x::{a, b}`: the group's names.
    let mut rest = code;
    while let Some(at) = rest.find("::{") {
        let head_start = rest[..at]
            .rfind(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .map_or(0, |i| i + 1);
        let head = &rest[head_start..at];
        let end = rest[at..].find('}').map_or(rest.len(), |e| at + e);
        let group = &rest[at + 3..end];
        if head == "crate" || head.starts_with("crate::") || head.starts_with("super") {
            for name in group.split(',') {
                let name = name.trim().split("::").next().unwrap_or("").trim();
                if name.starts_with(|c: char| c.is_ascii_lowercase()) && name != "self" {
                    out.extend(named_paths(module, &format!(" {head}::{name} "), is_mod_rs));
                }
            }
        }
        rest = &rest[at + 3..];
    }
    out
}

struct Crate {
    /// Module path → the modules it names (resolved to existing modules).
    uses: BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
}

fn read_crate(src: &Path) -> Crate {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(src, f)).collect();
    let mut uses = BTreeMap::new();
    for f in &files {
        let m = module_of(src, f);
        let is_mod_rs = f.file_name().is_some_and(|n| n == "mod.rs");
        let code = code_of(&std::fs::read_to_string(f).expect("a source file"));
        let mut named = BTreeSet::new();
        for mut p in named_paths(&m, &code, is_mod_rs) {
            // The longest prefix that is a module of this crate.
            while !p.is_empty() && !modules.contains(&p) {
                p.pop();
            }
            if !p.is_empty() && p != m {
                named.insert(p);
            }
        }
        uses.insert(m, named);
    }
    Crate { uses }
}

fn layer(module: &[String]) -> Option<usize> {
    LAYERS
        .iter()
        .position(|l| module.first().is_some_and(|m| m == l))
}

/// `a` is `b` or one of its ancestors.
fn is_ancestor(a: &[String], b: &[String]) -> bool {
    b.starts_with(a)
}

/// The cycles among `nodes` (strongly connected components of more than
/// one), by Tarjan's algorithm.
fn cycles(edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<Vec<String>>> {
    struct T<'a> {
        edges: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<&'a [String], usize>,
        low: BTreeMap<&'a [String], usize>,
        stack: Vec<&'a [String]>,
        on: BTreeSet<&'a [String]>,
        out: Vec<Vec<Vec<String>>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a [String]) {
        let i = t.index.len();
        t.index.insert(v, i);
        t.low.insert(v, i);
        t.stack.push(v);
        t.on.insert(v);
        if let Some(ws) = t.edges.get(v) {
            for w in ws {
                let w: &'a [String] = w.as_slice();
                if !t.index.contains_key(w) {
                    visit(t, w);
                    let l = t.low[w].min(t.low[v]);
                    t.low.insert(v, l);
                } else if t.on.contains(w) {
                    let l = t.index[w].min(t.low[v]);
                    t.low.insert(v, l);
                }
            }
        }
        if t.low[v] == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                scc.push(w.to_vec());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                t.out.push(scc);
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v.as_slice()) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn every_module_belongs_to_a_layer_and_looks_only_down() {
    let src = src_dir();
    let c = read_crate(&src);
    let mut wrong = Vec::new();
    for (m, named) in &c.uses {
        let top = m.first().map(String::as_str).unwrap_or("");
        if matches!(top, "lib" | "main" | "layering") {
            continue;
        }
        let Some(own) = layer(m) else {
            wrong.push(format!("{} is in no layer", m.join("::")));
            continue;
        };
        for n in named {
            match layer(n) {
                Some(l) if l <= own => {}
                _ => wrong.push(format!(
                    "{} (layer {}) uses {} (layer {})",
                    m.join("::"),
                    own + 1,
                    n.join("::"),
                    layer(n).map_or("none".into(), |l| (l + 1).to_string())
                )),
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn no_module_imports_another_in_a_cycle() {
    let c = read_crate(&src_dir());
    // A module may name its ancestors (they declare it); every other
    // use is an edge.
    let edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = c
        .uses
        .iter()
        .map(|(m, named)| {
            let e = named
                .iter()
                .filter(|n| !is_ancestor(n, m))
                .cloned()
                .collect();
            (m.clone(), e)
        })
        .collect();
    let found = cycles(&edges);
    let shown: Vec<String> = found
        .iter()
        .map(|scc| {
            scc.iter()
                .map(|m| m.join("::"))
                .collect::<Vec<_>>()
                .join(" ↔ ")
        })
        .collect();
    assert!(found.is_empty(), "import cycles:\n{}", shown.join("\n"));
}

#[test]
fn the_layering_test_sees_a_layer_broken_and_a_cycle() {
    // A store module naming a service, and two modules naming each other.
    let m = |s: &str| s.split("::").map(str::to_owned).collect::<Vec<_>>();
    let code =
        code_of("use crate::service::gateway::Gateway; // crate::app\nlet s = \"crate::http\";");
    let named = named_paths(&m("store::cards"), &code, false);
    assert_eq!(named, vec![m("service::gateway::Gateway")[..2].to_vec()]);
    assert!(layer(&m("service::gateway")) > layer(&m("store::cards")));
    let group = named_paths(&m("app"), "use crate::{config, store::Cf};", true);
    assert!(
        group.contains(&m("config")) && group.contains(&m("store")),
        "{group:?}"
    );
    let sup = named_paths(&m("store::journal"), "use super::idem::key;", false);
    assert_eq!(sup, vec![m("store::idem::key")]);
    let mut edges = BTreeMap::new();
    edges.insert(m("a"), BTreeSet::from([m("b")]));
    edges.insert(m("b"), BTreeSet::from([m("a")]));
    edges.insert(m("c"), BTreeSet::from([m("a")]));
    assert_eq!(cycles(&edges).len(), 1);
}

#[test]
fn the_core_crate_depends_on_nothing_that_does_io() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/onecard-core/Cargo.toml");
    let text = std::fs::read_to_string(manifest).expect("the core crate's Cargo.toml");
    let deps = text
        .split("\n[")
        .find(|s| s.starts_with("dependencies]"))
        .expect("a [dependencies] table");
    let names: Vec<&str> = deps
        .lines()
        .skip(1)
        .filter_map(|l| l.split('=').next())
        .map(str::trim)
        .filter(|n| !n.is_empty() && !n.starts_with('#'))
        .collect();
    assert!(names.contains(&"serde"), "read the table: {names:?}");
    let io: Vec<_> = names.iter().filter(|n| IO_CRATES.contains(n)).collect();
    assert!(
        io.is_empty(),
        "the core crate depends on I/O crates: {io:?}"
    );
}

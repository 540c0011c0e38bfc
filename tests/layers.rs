//! The engine's modules import each other in one direction only: no import circle between any two of its files.
//!
//! Reads `src/` as text: every file is a module (`src/a/b.rs` and `src/a/b/mod.rs` are `a::b`); a path in code
//! (`crate::a::b::Item`, `super::x`, `self::x`, or a child module named from its parent, `b::Item`) is an arrow to
//! the longest module it names. Comments and the trailing `#[cfg(test)]` module are left out; the crate root
//! (`lib.rs`, which only declares and re-exports) is not a node. A circle fails the test, named file by file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`a::b`) -> file.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src/") {
            let path = entry.expect("dir entry").path();
            let rel = path.strip_prefix(src).expect("under src/").to_path_buf();
            if path.is_dir() {
                // Binaries are crates of their own.
                if rel != Path::new("bin") {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let mut parts: Vec<String> = rel
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().map(String::as_str) == Some("mod") {
                parts.pop();
            }
            let name = parts.join("::");
            if name == "lib" || name == "main" {
                continue;
            }
            out.insert(name, path);
        }
    }
    out
}

/// The code of a file without comments and without its trailing test module.
fn code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        let line = match line.find(" //") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path `a::b::c` in the code, as its segments, with grouped imports (`x::{a, b::c}`) expanded.
fn paths(code: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts =
            is_ident(chars[i]) && (i == 0 || !(is_ident(chars[i - 1]) || chars[i - 1] == ':'));
        if !starts {
            i += 1;
            continue;
        }
        let mut segs = Vec::new();
        let mut j = i;
        loop {
            let s = j;
            while j < chars.len() && is_ident(chars[j]) {
                j += 1;
            }
            segs.push(chars[s..j].iter().collect::<String>());
            if j + 2 < chars.len() && chars[j] == ':' && chars[j + 1] == ':' {
                j += 2;
                if chars[j] == '{' {
                    // A group: each top-level item continues the prefix.
                    let mut depth = 0;
                    let mut k = j;
                    while k < chars.len() {
                        match chars[k] {
                            '{' => depth += 1,
                            '}' => {
                                depth -= 1;
                                if depth == 0 {
                                    break;
                                }
                            }
                            _ => {}
                        }
                        k += 1;
                    }
                    let inner: String = chars[j + 1..k.min(chars.len())].iter().collect();
                    for item in split_top(&inner) {
                        let item = item.trim();
                        // `d` or `d as e`: a one-segment item names a module too.
                        let head: String = item.chars().take_while(|c| is_ident(*c)).collect();
                        let mut found = paths(item);
                        if found.is_empty() && !head.is_empty() {
                            found.push(vec![head]);
                        }
                        for mut p in found {
                            let mut full = segs.clone();
                            full.append(&mut p);
                            out.push(full);
                        }
                    }
                    j = k;
                    break;
                }
                if j < chars.len() && is_ident(chars[j]) {
                    continue;
                }
            }
            break;
        }
        if segs.len() > 1 {
            out.push(segs);
        }
        i = j.max(i + 1);
    }
    out
}

fn split_top(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0);
    for c in s.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out
}

/// The module a path names from inside `module`, if any.
fn target(module: &str, segs: &[String], known: &BTreeMap<String, PathBuf>) -> Option<String> {
    let here: Vec<&str> = module.split("::").collect();
    let (base, rest): (Vec<String>, &[String]) = match segs[0].as_str() {
        "crate" => (Vec::new(), &segs[1..]),
        "self" => (here.iter().map(|s| s.to_string()).collect(), &segs[1..]),
        "super" => {
            let mut b: Vec<String> = here.iter().map(|s| s.to_string()).collect();
            let mut r = segs;
            while r.first().map(String::as_str) == Some("super") {
                b.pop();
                r = &r[1..];
            }
            (b, r)
        }
        // A child module named from its parent.
        _ => (here.iter().map(|s| s.to_string()).collect(), segs),
    };
    let mut best = None;
    let mut cur = base.clone();
    for s in rest {
        cur.push(s.clone());
        let name = cur.join("::");
        if known.contains_key(&name) {
            best = Some(name);
        }
    }
    if best.is_none() && segs[0] == "super" && !base.is_empty() {
        best = Some(base.join("::")).filter(|n| known.contains_key(n));
    }
    best.filter(|b| b != module)
}

/// Strongly connected components of more than one module (Tarjan).
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        let g = t.g;
        for w in g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let l = t.low[w].min(t.low[v]);
                t.low.insert(v, l);
            } else if t.on.contains(w) {
                let l = t.index[w].min(t.low[v]);
                t.low.insert(v, l);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g: graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let known = modules(src);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in &known {
        let text = std::fs::read_to_string(file).expect("read a source file");
        let arrows = graph.entry(module.clone()).or_default();
        for p in paths(&code(&text)) {
            if let Some(t) = target(module, &p, &known) {
                arrows.insert(t);
            }
        }
    }
    graph
}

/// The same graph with each module folded into its top-level module (`session::token` into `session`): a circle
/// through two folders (a -> b::x, b::y -> a) is a circle too.
fn folded(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, BTreeSet<String>> {
    let top = |m: &str| m.split("::").next().unwrap_or(m).to_string();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, arrows) in graph {
        let from = top(m);
        let targets: Vec<String> = arrows
            .iter()
            .map(|t| top(t))
            .filter(|t| *t != from)
            .collect();
        out.entry(from).or_default().extend(targets);
    }
    out
}

/// Fails naming every circle and its arrows.
fn check(graph: &BTreeMap<String, BTreeSet<String>>) {
    let found = circles(graph);
    let explain: Vec<String> = found
        .iter()
        .map(|c| {
            let arrows: Vec<String> = c
                .iter()
                .flat_map(|m| {
                    graph[m]
                        .iter()
                        .filter(|t| c.contains(t))
                        .map(move |t| format!("{m} -> {t}"))
                })
                .collect();
            format!("[{}]: {}", c.join(", "), arrows.join("; "))
        })
        .collect();
    assert!(found.is_empty(), "import circles:\n{}", explain.join("\n"));
}

#[test]
fn no_import_circle_in_any_crate_of_the_workspace() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let engine = graph(&root.join("src"));
    assert!(
        engine.contains_key("session::token") && engine.contains_key("hub"),
        "{engine:?}"
    );
    for src in ["src", "commands/src", "fixtures/src", "bench/src"] {
        let g = graph(&root.join(src));
        check(&g);
        check(&folded(&g));
    }
}

/// The checker itself finds a circle, through `crate::`, `super::` and a parent naming its child.
#[test]
fn the_checker_sees_circles() {
    let dir = std::env::temp_dir().join(format!("tabhub-layers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::write(dir.join("a/mod.rs"), "mod b;\nuse b::Thing;\n").unwrap();
    std::fs::write(
        dir.join("a/b.rs"),
        "use super::Other; // a comment crate::c\n",
    )
    .unwrap();
    std::fs::write(dir.join("c.rs"), "use crate::{a::b::Thing, d};\n").unwrap();
    std::fs::write(
        dir.join("d.rs"),
        "// crate::c only in a comment\nfn f() { crate::c::g() }\n",
    )
    .unwrap();
    // e -> f::g and f::h -> e: no circle between files, one between the folders.
    std::fs::create_dir_all(dir.join("f")).unwrap();
    std::fs::write(dir.join("e.rs"), "use crate::f::g::G;\n").unwrap();
    std::fs::write(dir.join("f/mod.rs"), "pub mod g;\npub mod h;\n").unwrap();
    std::fs::write(dir.join("f/g.rs"), "pub struct G;\n").unwrap();
    std::fs::write(dir.join("f/h.rs"), "fn f() { crate::e::x() }\n").unwrap();
    let g = graph(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let mut found = circles(&g);
    found.sort();
    // Folded, `a`'s inner circle is out of sight (the unfolded check sees it); `c`/`d` stay; `e`/`f` appear.
    let mut folded_found = circles(&folded(&g));
    folded_found.sort();
    assert_eq!(
        folded_found,
        vec![
            vec!["c".to_string(), "d".to_string()],
            vec!["e".to_string(), "f".to_string()]
        ]
    );
    assert_eq!(
        found,
        vec![
            vec!["a".to_string(), "a::b".to_string()],
            vec!["c".to_string(), "d".to_string()]
        ],
        "{g:?}"
    );
}

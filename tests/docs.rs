//! The documentation must not drift from the code: the commands table of `docs/protocol.md` against the registry,
//! its close-code table against `close_codes::ALL`, the configuration block of `docs/configuration.md` against
//! `Config::default()`, the load-balancer configurations quoted in `docs/deployment.md` against `deploy/`, and every
//! relative link of `README.md` and `docs/*.md` against the files (and headings) it points to.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// The lines of the section under the heading `heading` (e.g. `## Commands`), up to the next heading of the same
/// or a higher level.
fn section<'a>(doc: &'a str, file: &str, heading: &str) -> Vec<&'a str> {
    let level = heading.chars().take_while(|c| *c == '#').count();
    let mut lines = doc.lines().skip_while(|l| l.trim_end() != heading);
    assert!(
        lines.next().is_some(),
        "{file} has no heading {heading:?} (tests/docs.rs looks for it)"
    );
    let mut fenced = false;
    lines
        .take_while(|l| {
            if l.starts_with("```") {
                fenced = !fenced;
            }
            let hashes = l.chars().take_while(|c| *c == '#').count();
            fenced || hashes == 0 || hashes > level || !l[hashes..].starts_with(' ')
        })
        .collect()
}

/// The body rows of the first table in `lines`, as cells (header and separator skipped).
fn table_rows(lines: &[&str], what: &str) -> Vec<Vec<String>> {
    let rows: Vec<Vec<String>> = lines
        .iter()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect();
    assert!(rows.len() > 2, "{what}: no table found");
    rows.into_iter().skip(2).collect()
}

/// The `code spans` of a cell.
fn code_spans(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

#[test]
fn commands_table_matches_the_registry() {
    let doc = read("docs/protocol.md");
    let rows = table_rows(
        &section(&doc, "docs/protocol.md", "## Commands"),
        "docs/protocol.md, ## Commands",
    );
    // name -> (required, optional), from the doc.
    let mut documented: BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
    for row in &rows {
        let [name] = code_spans(&row[0])[..] else {
            panic!(
                "docs/protocol.md commands table: first cell {:?} is not one `command`",
                row[0]
            );
        };
        let mut params = (BTreeSet::new(), BTreeSet::new());
        for p in code_spans(row.get(1).map_or("", String::as_str)) {
            match p.strip_suffix('?') {
                Some(optional) => params.1.insert(optional.to_owned()),
                None => params.0.insert(p.to_owned()),
            };
        }
        assert!(
            documented.insert(name.to_owned(), params).is_none(),
            "docs/protocol.md commands table lists `{name}` twice"
        );
    }

    let registry = tabhub::commands::builtin().describe();
    let registered: BTreeSet<&str> = registry.iter().map(|c| c.name).collect();
    for name in documented.keys() {
        assert!(
            registered.contains(name.as_str()),
            "docs/protocol.md documents command `{name}`, which the registry does not have \
             (registered: {registered:?})"
        );
    }
    for info in &registry {
        let Some((required, optional)) = documented.get(info.name) else {
            panic!(
                "command `{}` is registered but missing from the commands table of docs/protocol.md \
                 (add a row: | `{}` | {} | ... |)",
                info.name,
                info.name,
                info.required
                    .iter()
                    .map(|p| format!("`{p}`"))
                    .chain(info.optional.iter().map(|p| format!("`{p}?`")))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        let want = |ps: &[&str]| ps.iter().map(|p| (*p).to_owned()).collect::<BTreeSet<_>>();
        assert_eq!(
            required,
            &want(info.required),
            "docs/protocol.md: required parameters of `{}` differ from the registry's",
            info.name
        );
        assert_eq!(
            optional,
            &want(info.optional),
            "docs/protocol.md: optional parameters (`name?`) of `{}` differ from the registry's",
            info.name
        );
    }
}

#[test]
fn close_code_table_matches_the_close_codes() {
    let doc = read("docs/protocol.md");
    let rows = table_rows(
        &section(&doc, "docs/protocol.md", "## Close codes"),
        "docs/protocol.md, ## Close codes",
    );
    let mut documented = BTreeSet::new();
    for row in &rows {
        let code: u16 = row[0].parse().unwrap_or_else(|_| {
            panic!(
                "docs/protocol.md close-code table: {:?} is not a code",
                row[0]
            )
        });
        assert!(
            documented.insert(code),
            "docs/protocol.md close-code table lists {code} twice"
        );
    }
    let sent: BTreeSet<u16> = tabhub::close_codes::ALL.iter().map(|c| c.code).collect();
    for code in &documented {
        assert!(
            sent.contains(code),
            "docs/protocol.md documents close code {code}, which tabhub::close_codes::ALL does not have"
        );
    }
    for c in tabhub::close_codes::ALL {
        assert!(
            documented.contains(&c.code),
            "close code {} ({}) is missing from the close-code table of docs/protocol.md",
            c.code,
            c.name
        );
    }
}

/// The body of the first fenced block of language `lang` in `lines`.
fn fenced_block(lines: &[&str], lang: &str, what: &str) -> String {
    let open = format!("```{lang}");
    let mut it = lines.iter().skip_while(|l| l.trim_end() != open);
    assert!(it.next().is_some(), "{what}: no {open} block");
    let body: Vec<&str> = it.take_while(|l| !l.starts_with("```")).copied().collect();
    body.iter().map(|l| format!("{l}\n")).collect()
}

/// Every difference between two TOML values, by dotted key, in key order.
fn toml_diff(path: &str, doc: &toml::Value, code: &toml::Value, out: &mut Vec<String>) {
    use toml::Value::Table;
    match (doc, code) {
        (Table(d), Table(c)) => {
            let keys: BTreeSet<&String> = d.keys().chain(c.keys()).collect();
            for k in keys {
                let key = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match (d.get(k), c.get(k)) {
                    (Some(dv), Some(cv)) => toml_diff(&key, dv, cv, out),
                    (Some(dv), None) => out.push(format!(
                        "`{key}` = {dv} is in the doc, but Config::default() has no such key"
                    )),
                    (None, Some(cv)) => out.push(format!(
                        "`{key}` is missing from the doc; Config::default() has {cv}"
                    )),
                    (None, None) => unreachable!(),
                }
            }
        }
        (d, c) if d != c => out.push(format!(
            "`{path}`: the doc says {d}, Config::default() has {c}"
        )),
        _ => {}
    }
}

#[test]
fn configuration_block_matches_the_defaults() {
    let file = "docs/configuration.md";
    let doc = read(file);
    let heading = "## Every key and its default";
    let block = fenced_block(&section(&doc, file, heading), "toml", file);
    let documented: toml::Table = toml::from_str(&block)
        .unwrap_or_else(|e| panic!("{file}, {heading}: the toml block does not parse: {e}"));
    let defaults = toml::to_string(&tabhub::Config::default()).expect("serialize the defaults");
    let defaults: toml::Table = toml::from_str(&defaults).expect("parse the serialized defaults");

    let mut diffs = Vec::new();
    toml_diff(
        "",
        &toml::Value::Table(documented),
        &toml::Value::Table(defaults),
        &mut diffs,
    );
    assert!(
        diffs.is_empty(),
        "{file} ({heading}) differs from Config::default(): first {}\n(all differences:\n  {})",
        diffs[0],
        diffs.join("\n  ")
    );
    // It is also a configuration file tabhub accepts (no key unknown to Config).
    toml::from_str::<tabhub::Config>(&block)
        .unwrap_or_else(|e| panic!("{file}: the default block is not a valid configuration: {e}"));
}

#[test]
fn quoted_load_balancer_configurations_are_the_files() {
    let file = "docs/deployment.md";
    let doc = read(file);
    for (heading, lang, path) in [
        ("## nginx", "nginx", "deploy/nginx/tabhub.conf"),
        ("## HAProxy", "haproxy", "deploy/haproxy/tabhub.cfg"),
    ] {
        let quoted = fenced_block(&section(&doc, file, heading), lang, file);
        let actual = read(path);
        if quoted.trim_end() != actual.trim_end() {
            let (n, (q, a)) = quoted
                .lines()
                .zip(actual.lines())
                .enumerate()
                .find(|(_, (q, a))| q != a)
                .map(|(i, p)| (i + 1, p))
                .unwrap_or((
                    quoted.lines().count().min(actual.lines().count()) + 1,
                    ("", ""),
                ));
            panic!(
                "{file} ({heading}) quotes {path}, but they differ from line {n}:\n  doc:  {q:?}\n  file: {a:?}"
            );
        }
    }
}

/// GitHub's anchor for a heading: lower case, punctuation dropped (but `-` and `_`), spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a markdown file's headings (repeated headings get `-1`, `-2`, ...), fenced code skipped.
fn anchors(doc: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    let mut fenced = false;
    for line in doc.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if fenced || hashes == 0 || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(&line[hashes..]);
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

/// The targets of the inline links `[text](target)` of a markdown file, outside code spans and fenced blocks.
fn links(doc: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in doc.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Outside code spans: the even-numbered pieces between backticks, joined back with a placeholder.
        let prose: String = line
            .split('`')
            .enumerate()
            .map(|(i, s)| if i % 2 == 0 { s } else { "code" })
            .collect();
        let mut rest = prose.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let end = rest.find(')').unwrap_or(rest.len());
            out.push(rest[..end].trim().to_owned());
            rest = &rest[end..];
        }
    }
    out
}

#[test]
fn relative_links_resolve() {
    let mut files = vec![PathBuf::from("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .map(|p| p.strip_prefix(root()).expect("under the root").to_owned())
        .collect();
    docs.sort();
    assert!(!docs.is_empty(), "docs/ holds no .md file");
    files.extend(docs);

    let mut broken = Vec::new();
    for file in &files {
        let text = read(&file.to_string_lossy());
        let dir = file.parent().unwrap_or(Path::new(""));
        for target in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                dir.join(path)
            };
            let abs = root().join(&resolved);
            if !abs.exists() {
                broken.push(format!(
                    "{}: ({target}) -> {} does not exist",
                    file.display(),
                    resolved.display()
                ));
                continue;
            }
            if let Some(anchor) = anchor {
                let is_md = abs.extension().is_some_and(|x| x == "md");
                if is_md
                    && !anchors(&std::fs::read_to_string(&abs).unwrap_or_default()).contains(anchor)
                {
                    broken.push(format!(
                        "{}: ({target}) -> {} has no heading #{anchor}",
                        file.display(),
                        resolved.display()
                    ));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "broken links:\n  {}",
        broken.join("\n  ")
    );
}

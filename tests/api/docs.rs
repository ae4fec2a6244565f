//! The documentation holds: every relative link in README.md and docs/
//! resolves (a file, and a heading when it names one), the configuration
//! page is what `--help` says, and no two source files import each other
//! (ARCHITECTURE.md's module graph has no circles).
//!
//! `UPDATE_DOCS=1 cargo test --test api docs::` rewrites the generated part
//! of docs/configuration.md from the settings' definitions.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::helpers::repo;

/// The Markdown files whose links are checked.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![
        repo().join("README.md"),
        repo().join("ARCHITECTURE.md"),
        repo().join("DEVELOPMENT_ROADMAP.md"),
    ];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    assert!(docs.len() >= 8, "docs/ has only {docs:?}");
    pages.extend(docs);
    pages
}

/// The page's text outside fenced code blocks and inline code spans.
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Drop inline code: `[x](y)` in backticks is not a link.
        let mut in_code = false;
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
            } else if !in_code {
                out.push(c);
            }
        }
        out.push('\n');
    }
    out
}

/// Every `[text](target)` and `![alt](target)` target of a page.
fn links(text: &str) -> Vec<String> {
    let prose = prose(text);
    let mut found = Vec::new();
    let mut rest = prose.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let Some(end) = after.find(')') else { break };
        found.push(after[..end].trim().to_string());
        rest = &after[end..];
    }
    found
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces
/// made hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut all = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let base = anchor(line.trim_start_matches('#'));
        // A repeated heading gets -1, -2, … as on GitHub.
        let n = seen.entry(base.clone()).or_default();
        all.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    all
}

/// What is wrong with one link of `page`, if anything.
fn broken(page: &Path, target: &str) -> Option<String> {
    if target.starts_with("http://")
        || target.starts_with("https://")
        || target.starts_with("mailto:")
    {
        return None;
    }
    let (path, fragment) = match target.split_once('#') {
        Some((path, fragment)) => (path, Some(fragment)),
        None => (target, None),
    };
    let file = if path.is_empty() {
        page.to_path_buf()
    } else {
        page.parent().unwrap().join(path)
    };
    if !file.exists() {
        return Some(format!("{target}: {} does not exist", file.display()));
    }
    if let Some(fragment) = fragment {
        if file.extension().is_some_and(|e| e == "md") {
            let text = std::fs::read_to_string(&file).unwrap();
            if !anchors(&text).contains(fragment) {
                return Some(format!(
                    "{target}: {} has no heading #{fragment}",
                    file.display()
                ));
            }
        }
    }
    None
}

#[test]
fn every_relative_link_in_the_readme_and_docs_resolves() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for target in links(&text) {
            checked += 1;
            if let Some(problem) = broken(&page, &target) {
                problems.push(format!("{}: {problem}", page.display()));
            }
        }
    }
    assert!(
        checked > 40,
        "only {checked} links found: the parser lost them"
    );
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_link_check_can_fail() {
    let page = repo().join("README.md");
    assert_eq!(broken(&page, "docs/api.md"), None);
    assert_eq!(
        broken(&page, "docs/api.md#the-contract-get-openapijson"),
        None
    );
    assert!(broken(&page, "docs/no-such-page.md").is_some());
    assert!(broken(&page, "docs/api.md#no-such-heading").is_some());
    assert!(broken(&page, "#no-such-heading").is_some());
    assert_eq!(
        links("see [a](b.md), `[c](d.md)` and ![e](f.svg)\n```\n[g](h)\n```\n"),
        ["b.md", "f.svg"]
    );
}

// ---- the configuration page ----

const BEGIN: &str = "<!-- generated from the settings' definitions: begin -->";
const END: &str = "<!-- generated: end -->";

/// One table row per setting, in `--help`'s order: the variable, the flag,
/// the default and the help text, with the values an enum takes.
fn table(command: &clap::Command) -> String {
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let mut out = String::from("| variable | flag | default | what it sets |\n|---|---|---|---|\n");
    for arg in command.get_arguments() {
        let Some(env) = arg.get_env() else { continue };
        if arg.is_hide_set() {
            continue;
        }
        let flag = arg
            .get_long()
            .map(|long| format!("`--{long}`"))
            .unwrap_or_default();
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| format!("`{}`", v.to_string_lossy()))
            .collect();
        let default = if defaults.is_empty() {
            "unset".to_string()
        } else {
            defaults.join(", ")
        };
        let mut help = arg
            .get_long_help()
            .or_else(|| arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let values: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| format!("`{}`", v.get_name()))
            .collect();
        if !values.is_empty() && !arg.is_hide_possible_values_set() {
            help = format!(
                "{}; one of {}",
                help.trim_end_matches('.'),
                values.join(", ")
            );
        }
        out.push_str(&format!(
            "| `{}` | {flag} | {default} | {} |\n",
            env.to_string_lossy(),
            cell(help.trim())
        ));
    }
    out
}

fn generated() -> String {
    let service = reliability_lab::config::Config::command();
    let provider = reliability_lab::provider::ProviderConfig::command();
    format!(
        "{BEGIN}\n\n## The service: `reliability-lab`\n\n{}\n## The provider: `reliability-lab provider`\n\n{}\n{END}",
        table(&service),
        table(&provider)
    )
}

#[test]
fn the_configuration_page_is_what_help_prints() {
    let path = repo().join("docs/configuration.md");
    let page = std::fs::read_to_string(&path).unwrap();
    let (Some(begin), Some(end)) = (page.find(BEGIN), page.find(END)) else {
        panic!("docs/configuration.md has lost its markers {BEGIN} … {END}");
    };
    let current = &page[begin..end + END.len()];
    let expected = generated();
    if current != expected {
        if std::env::var_os("UPDATE_DOCS").is_some() {
            let page = format!("{}{expected}{}", &page[..begin], &page[end + END.len()..]);
            std::fs::write(&path, page).unwrap();
            return;
        }
        let first = current
            .lines()
            .zip(expected.lines())
            .find(|(a, b)| a != b)
            .map(|(a, b)| format!("page:   {a}\n--help: {b}"))
            .unwrap_or_else(|| "one is longer".into());
        panic!(
            "docs/configuration.md differs from the settings' definitions (what --help prints); \
             regenerate it with UPDATE_DOCS=1 cargo test --test api docs::\nfirst difference:\n{first}"
        );
    }
}

#[test]
fn the_configuration_table_names_what_help_prints() {
    // The table is built from the same definitions as --help: each variable
    // and default it lists appears in the help the binary prints.
    let help = reliability_lab::config::Config::command()
        .render_long_help()
        .to_string();
    let table = table(&reliability_lab::config::Config::command());
    let rows: Vec<&str> = table.lines().skip(2).collect();
    assert!(rows.len() > 60, "{} rows", rows.len());
    for row in rows {
        let variable = row.split('`').nth(1).unwrap();
        assert!(help.contains(&format!("env: {variable}")), "{variable}");
    }
    assert!(table.contains("| `RETRY_MAX_ATTEMPTS` | `--retry-max-attempts` | `3` |"));
    assert!(table.contains("| `DATABASE_URL` | `--database-url` | unset |"));
}

// ---- the module graph ----

/// Each source file's module path (`orders::postgres`), from src/.
fn modules() -> BTreeMap<Vec<String>, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let src = repo().join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files
        .into_iter()
        .map(|file| {
            let relative = file.strip_prefix(&src).unwrap().with_extension("");
            let mut parts: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") || parts == ["lib"] || parts == ["main"] {
                parts.pop();
            }
            (parts, file)
        })
        .filter(|(parts, file)| !(parts.is_empty() && file.ends_with("main.rs")))
        .collect()
}

/// The modules a file names through `crate::…`, `super::…` or `self::…`
/// paths outside its tests, each resolved to the longest path that is a
/// file (`crate::orders::postgres::Lease` is `orders::postgres`). A grouped
/// `use super::{…}` names the parent, which does not count (below).
fn imports(
    module: &[String],
    file: &Path,
    all: &BTreeMap<Vec<String>, PathBuf>,
) -> BTreeSet<Vec<String>> {
    let text = std::fs::read_to_string(file).unwrap();
    let code = text.split("#[cfg(test)]").next().unwrap();
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut found = BTreeSet::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap();
        for root in ["crate::", "super::", "self::"] {
            for (at, _) in line.match_indices(root) {
                if line[..at].ends_with(|c: char| ident(c) || c == ':') {
                    continue;
                }
                let path: String = line[at..]
                    .chars()
                    .take_while(|&c| ident(c) || c == ':')
                    .collect();
                let mut segments = path.split("::").filter(|s| !s.is_empty());
                let mut base: Vec<String> = match segments.next() {
                    Some("crate") => Vec::new(),
                    Some("self") => module.to_vec(),
                    _ => module[..module.len().saturating_sub(1)].to_vec(),
                };
                for segment in segments {
                    if segment == "super" {
                        base.pop();
                    } else {
                        base.push(segment.to_string());
                    }
                }
                while !base.is_empty() && !all.contains_key(&base) {
                    base.pop();
                }
                if base != module {
                    found.insert(base);
                }
            }
        }
    }
    found
}

fn circles(all: &BTreeMap<Vec<String>, PathBuf>) -> Vec<String> {
    let edges: BTreeMap<&Vec<String>, BTreeSet<Vec<String>>> = all
        .iter()
        .map(|(module, file)| (module, imports(module, file, all)))
        .collect();
    let mut pairs = Vec::new();
    for (a, targets) in &edges {
        for b in targets {
            // A parent and its child name each other by design (`mod`,
            // `pub use`, `super::`); siblings and strangers must not.
            let related = a.starts_with(b) || b.starts_with(a);
            if *a < b && !related && edges.get(b).is_some_and(|t| t.contains(*a)) {
                pairs.push(format!("{} <-> {}", a.join("::"), b.join("::")));
            }
        }
    }
    pairs
}

#[test]
fn no_two_source_files_import_each_other() {
    let all = modules();
    assert!(all.contains_key(&vec!["orders".to_string(), "postgres".to_string()]));
    let pairs = circles(&all);
    assert!(pairs.is_empty(), "files that import each other: {pairs:?}");
}

#[test]
fn the_circle_check_can_fail() {
    // Two modules of the real tree, made to name each other.
    let dir = std::env::temp_dir().join(format!("reliability-lab-circles-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("orders")).unwrap();
    let a = dir.join("orders/postgres.rs");
    let b = dir.join("orders/group_commit.rs");
    std::fs::write(&a, "use super::group_commit::GroupCommit;\n").unwrap();
    std::fs::write(
        &b,
        "fn f(_: crate::orders::postgres::Lease) {}\n#[cfg(test)]\nuse crate::x;\n",
    )
    .unwrap();
    let mut all = BTreeMap::new();
    all.insert(vec!["orders".to_string()], dir.join("orders/mod.rs"));
    all.insert(vec!["orders".to_string(), "postgres".to_string()], a);
    all.insert(vec!["orders".to_string(), "group_commit".to_string()], b);
    std::fs::write(dir.join("orders/mod.rs"), "pub mod postgres;\n").unwrap();
    let pairs = circles(&all);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(pairs, ["orders::group_commit <-> orders::postgres"]);
}

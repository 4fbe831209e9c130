//! The crate's top-level modules form layers: no two import each other (test code aside), so
//! each can be read, changed and tested from its dependencies down. ARCHITECTURE.md lists the
//! modules; this keeps the rule from eroding.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `text` without line comments and without its inline test module.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules `code` names: `crate::x` paths, and the first segment of each item of
/// `use crate::{...}` groups.
fn named_modules(code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        found.insert(ident(&group[j..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.retain(|m| modules.contains(m));
    found
}

#[test]
fn no_two_top_level_modules_import_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules: BTreeSet<String> = fs::read_dir(&src)
        .expect("read src")
        .map(|e| e.expect("entry").path())
        .filter_map(|p| {
            let name = p.file_stem()?.to_str()?.to_owned();
            (p.is_dir() || p.extension().is_some_and(|e| e == "rs")).then_some(name)
        })
        .filter(|m| !["lib", "main", "bin"].contains(&m.as_str()))
        .collect();
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut imports: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|s| s.trim_end_matches(".rs").to_owned())
            .expect("top-level module");
        if !modules.contains(&top) || rel.ends_with("tests.rs") {
            continue;
        }
        let code = code_of(&fs::read_to_string(&file).expect("read source"));
        for m in named_modules(&code, &modules) {
            if m != top {
                imports
                    .entry(top.clone())
                    .or_default()
                    .entry(m)
                    .or_default()
                    .insert(rel.display().to_string());
            }
        }
    }
    let mut cycles = Vec::new();
    for (a, deps) in &imports {
        for (b, files) in deps {
            if a < b
                && let Some(back) = imports.get(b).and_then(|d| d.get(a))
            {
                cycles.push(format!("{a} <-> {b} ({files:?} / {back:?})"));
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules importing each other (move the shared part down a layer):\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_import_scanner_sees_grouped_and_plain_paths() {
    let modules: BTreeSet<String> = ["config", "proxy", "tls", "state"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let code = code_of(
        "use crate::{config::Config, proxy::{self, copy}, tls};\n\
         fn f() { crate::state::x(); } // crate::nothing\n",
    );
    assert_eq!(
        named_modules(&code, &modules),
        modules,
        "every module named once"
    );
}

//! Every ```` ```toml ```` block of `README.md` and `docs/*.md` is parsed with `fulcrum::config::parse_without_files`,
//! so the documentation cannot drift from the code.
//!
//! A block is checked according to its first lines (the convention is documented in
//! `docs/configuration.md`, "Examples in these docs are tested"):
//!
//! * no marker: the block is a whole configuration and must be valid;
//! * `# fragment: top level`: top-level keys and tables; the block is added to a small base
//!   configuration (one listener, one pool) and the result must be valid. Its `[[listeners]]` and
//!   `[[pools]]` come before the base's, so error key paths count from the block's own tables;
//! * `# fragment: inside [[pools]]`: keys of one `[[pools]]` table (inline tables only); they are set on a
//!   pool `name = "fragment"` that has one server unless the block sets `servers` or `dns_srv`;
//! * `# fragment: inside [[listeners]]`: keys of one `[[listeners]]` table (inline tables only); they are
//!   set on a listener `name = "fragment"`, `bind = "127.0.0.1:0"`, `protocol = "http"`, `pool = "base"`;
//! * `# invalid: TEXT` (first line, or second after a `# fragment:` line): the block, whole or spliced as
//!   its fragment line says, must be **refused**, with an error that contains TEXT.
//!
//! `parse_without_files` validates everything but the files a configuration names (TLS certificates and
//! keys, which `parse` reads), without binding a port or resolving a name, so examples may name
//! addresses, certificates and hosts that do not exist here.

use std::path::{Path, PathBuf};

use toml::{Table, Value};

/// The repository root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The base configuration fragments are added to.
const BASE: &str = r#"
[[listeners]]
name = "base"
bind = "127.0.0.1:0"
protocol = "http"
pool = "base"

[[pools]]
name = "base"
servers = [{ address = "127.0.0.1:9" }]
"#;

/// One ```` ```toml ```` block: its file, the line of its opening fence, and its text.
struct Block {
    file: String,
    line: usize,
    text: String,
}

impl Block {
    /// `file:line` of the opening fence.
    fn at(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
}

/// The TOML blocks of one Markdown file.
fn blocks(path: &Path, shown: &str) -> Vec<Block> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{shown}: {e}"));
    let mut found = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start();
        match &mut open {
            None if fence.starts_with("```toml") => open = Some((i + 1, String::new())),
            None => {}
            Some((start, body)) => {
                if fence.starts_with("```") {
                    found.push(Block {
                        file: shown.to_owned(),
                        line: *start,
                        text: std::mem::take(body),
                    });
                    open = None;
                } else {
                    body.push_str(line);
                    body.push('\n');
                }
            }
        }
    }
    assert!(open.is_none(), "{shown}: a ```toml block is never closed");
    found
}

/// Where a fragment goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Whole,
    TopLevel,
    InPool,
    InListener,
}

/// Reads the markers of a block: its kind and, for an invalid one, the text its error must contain.
fn markers(text: &str) -> Result<(Kind, Option<String>), String> {
    let mut kind = Kind::Whole;
    let mut invalid = None;
    for line in text.lines().take(2) {
        let line = line.trim();
        if let Some(place) = line.strip_prefix("# fragment:") {
            kind = match place.trim() {
                "top level" => Kind::TopLevel,
                "inside [[pools]]" => Kind::InPool,
                "inside [[listeners]]" => Kind::InListener,
                other => return Err(format!("unknown fragment place {other:?}")),
            };
        } else if let Some(why) = line.strip_prefix("# invalid:") {
            let why = why.trim();
            if why.is_empty() {
                return Err("`# invalid:` must say what the error contains".into());
            }
            invalid = Some(why.to_owned());
        }
    }
    Ok((kind, invalid))
}

fn table(text: &str, what: &str) -> Result<Table, String> {
    text.parse::<Table>()
        .map_err(|e| format!("{what} is not valid TOML: {e}"))
}

/// The configuration a block stands for, as TOML text.
fn configuration(kind: Kind, text: &str) -> Result<String, String> {
    if kind == Kind::Whole {
        return Ok(text.to_owned());
    }
    let fragment = table(text, "the fragment")?;
    let mut base = table(BASE, "the base")?;
    match kind {
        Kind::Whole => unreachable!(),
        Kind::TopLevel => {
            for (key, value) in fragment {
                match (value, base.remove(&key)) {
                    // The fragment's tables first, so error key paths count from them.
                    (Value::Array(mut mine), Some(Value::Array(theirs))) => {
                        mine.extend(theirs);
                        base.insert(key, Value::Array(mine));
                    }
                    (value, _) => {
                        base.insert(key, value);
                    }
                }
            }
        }
        Kind::InPool => {
            let mut pool = Table::new();
            pool.insert("name".into(), "fragment".into());
            if !fragment.contains_key("servers") && !fragment.contains_key("dns_srv") {
                pool.insert("servers".into(), table_list("address = \"127.0.0.1:10\""));
            }
            pool.extend(fragment);
            push(&mut base, "pools", pool);
        }
        Kind::InListener => {
            let mut listener = table(
                "name = \"fragment\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"base\"",
                "the listener",
            )?;
            listener.extend(fragment);
            push(&mut base, "listeners", listener);
        }
    }
    toml::to_string(&base).map_err(|e| format!("cannot write the spliced configuration: {e}"))
}

/// `[{ KEYS }]`.
fn table_list(keys: &str) -> Value {
    Value::Array(vec![Value::Table(keys.parse().expect("valid keys"))])
}

/// Appends `item` to the array of tables `key` of `config`.
fn push(config: &mut Table, key: &str, item: Table) {
    match config.get_mut(key) {
        Some(Value::Array(items)) => items.push(Value::Table(item)),
        _ => panic!("the base configuration has no `{key}` array"),
    }
}

/// Checks one block; an error says where and why it fails.
fn check(block: &Block) -> Result<(), String> {
    let at = block.at();
    let (kind, invalid) = markers(&block.text).map_err(|e| format!("{at}: {e}"))?;
    let config = configuration(kind, &block.text).map_err(|e| format!("{at}: {e}"))?;
    let parsed = fulcrum::config::parse_without_files(&config, &block.file).map_err(|mut e| {
        match (kind, e.line) {
            // A whole block: the error's line in the Markdown file.
            (Kind::Whole, Some(line)) => e.line = Some(block.line + line),
            (Kind::Whole, None) => e.origin = at.clone(),
            // A spliced fragment: lines of the spliced text mean nothing to a reader.
            _ => {
                e.origin = format!("{at} (as spliced)");
                (e.line, e.column) = (None, None);
            }
        }
        e.to_string()
    });
    match (parsed, invalid) {
        (Ok(_), None) => Ok(()),
        (Err(e), None) if kind == Kind::Whole => Err(format!(
            "{e}\n  (a fragment needs `# fragment: …`, an invalid example `# invalid: …`)"
        )),
        (Err(e), None) => Err(e),
        (Ok(_), Some(why)) => Err(format!("{at}: marked `# invalid: {why}`, but it is valid")),
        (Err(e), Some(why)) if e.contains(&why) => Ok(()),
        (Err(e), Some(why)) => Err(format!(
            "{at}: refused as it should be, but the error does not contain {why:?}: {e}"
        )),
    }
}

#[test]
fn every_toml_block_of_the_docs_parses() {
    let root = root();
    let mut files = vec![(root.join("README.md"), "README.md".to_owned())];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    for path in docs {
        let shown = format!("docs/{}", path.file_name().unwrap().to_string_lossy());
        files.push((path, shown));
    }

    let mut checked = 0;
    let mut failures = Vec::new();
    for (path, shown) in &files {
        for block in blocks(path, shown) {
            checked += 1;
            if let Err(why) = check(&block) {
                failures.push(why);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} TOML blocks in the docs fail:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    // Guards against a wrong path or fence pattern making the test vacuous.
    assert!(checked >= 8, "only {checked} TOML blocks found");
}

/// The checker itself: each rule accepts what it should and refuses what it should.
#[test]
fn the_rules_catch_what_they_should() {
    let block = |text: &str| Block {
        file: "test.md".into(),
        line: 1,
        text: text.into(),
    };
    // A whole configuration.
    assert!(check(&block(BASE)).is_ok());
    // An unmarked fragment fails, and says how to mark it.
    let err = check(&block("slow_start = \"10s\"\n")).unwrap_err();
    assert!(err.contains("# fragment:"), "{err}");
    // Fragments, spliced.
    assert!(check(&block(
        "# fragment: inside [[pools]]\nslow_start = \"10s\"\n"
    ))
    .is_ok());
    assert!(check(&block(
        "# fragment: inside [[pools]]\ndns_srv = \"_http._tcp.app.internal\"\n"
    ))
    .is_ok());
    assert!(check(&block(
        "# fragment: inside [[listeners]]\nmax_connections = 10\n"
    ))
    .is_ok());
    assert!(check(&block(
        "# fragment: top level\nshutdown_timeout = \"5s\"\n[admin]\nbind = \"127.0.0.1:9090\"\n"
    ))
    .is_ok());
    // A fragment with a bad value fails.
    assert!(check(&block("# fragment: inside [[pools]]\nretries = 11\n")).is_err());
    // Invalid examples must fail, and for the reason given.
    assert!(check(&block(
        "# fragment: inside [[listeners]]\n# invalid: at least 1\nmax_connections = 0\n"
    ))
    .is_ok());
    assert!(check(&block(
        "# invalid: is not supported yet\n# fragment: inside [[listeners]]\nmax_connections = 0\n"
    ))
    .is_err());
    assert!(check(&block("# invalid: anything\n")).is_err());
    assert!(check(&block(&format!("# invalid: anything\n{BASE}"))).is_err());
    // Unknown markers are errors.
    assert!(check(&block("# fragment: somewhere\nx = 1\n")).is_err());
}

//! [`ConfigError`], and how an error is placed in the file.
//!
//! Three kinds of error reach the user, all with a position:
//! - syntax errors from the TOML parser carry a byte span, turned into line and column;
//! - serde errors (unknown key, wrong type, missing key) carry the span of the key or value; the key path is
//!   found by walking the span-carrying [`toml_edit::ImDocument`] down to that span;
//! - validation errors carry a [`KeyPath`]; the line is found by walking the document along the path.

use std::fmt;
use std::ops::Range;

use toml_edit::{ImDocument, Item, Table, Value};

/// Why a configuration could not be loaded, and where in the file.
///
/// Displayed as `fulcrum.toml:12:5: pools[0].servers[1].weight: must be at least 1`, leaving out the
/// parts that are unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the configuration came from: the file name, as given to `load` or `parse`.
    pub origin: String,
    /// The key path of the offending setting, e.g. `pools[0].servers[1].weight`, when there is one.
    pub key: Option<String>,
    /// The 1-based line of the offending key (or of the syntax error).
    pub line: Option<usize>,
    /// The 1-based column, counted in characters.
    pub column: Option<usize>,
    /// What is wrong, e.g. `must be at least 1`.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// A TOML syntax error at byte `span` of `text`.
    pub(crate) fn syntax(
        origin: &str,
        text: &str,
        message: &str,
        span: Option<Range<usize>>,
    ) -> Self {
        let (line, column) = position(text, span);
        ConfigError {
            origin: origin.to_owned(),
            key: None,
            line,
            column,
            message: one_line(message),
        }
    }

    /// An error from deserializing the raw types: unknown key, wrong type, missing key, unknown enum value.
    pub(crate) fn from_serde(
        origin: &str,
        doc: &ImDocument<&str>,
        error: &toml::de::Error,
    ) -> Self {
        let span = error.span();
        let path = span
            .as_ref()
            .and_then(|s| path_at(doc.as_table(), s.start))
            .filter(|p| !p.is_empty());
        let (line, column) = position(doc.raw(), span);
        ConfigError {
            origin: origin.to_owned(),
            key: path.map(|p| p.to_string()),
            line,
            column,
            message: serde_message(error.message()),
        }
    }

    /// A validation error about the key at `path`, placed at that key (or its closest existing ancestor,
    /// when the key itself is absent).
    pub(crate) fn at_path(
        origin: &str,
        doc: &ImDocument<&str>,
        path: KeyPath,
        message: String,
    ) -> Self {
        let (line, column) = position(doc.raw(), span_of(doc.as_table(), &path));
        ConfigError {
            origin: origin.to_owned(),
            key: (!path.is_empty()).then(|| path.to_string()),
            line,
            column,
            message,
        }
    }
}

/// One step of a [`KeyPath`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Key(String),
    Index(usize),
}

/// The path of a key in the file, displayed as `pools[1].servers[0].weight`; keys that are not bare TOML
/// keys are quoted: `routes[0].headers."x version"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyPath(Vec<Segment>);

impl KeyPath {
    /// The path of a top-level key.
    pub(crate) fn root(key: &str) -> Self {
        KeyPath(vec![Segment::Key(key.to_owned())])
    }

    /// The path of `key` inside this table.
    pub(crate) fn key(&self, key: &str) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Key(key.to_owned()));
        path
    }

    /// The path of element `index` of this array.
    pub(crate) fn index(&self, index: usize) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Index(index));
        path
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Index(index) => write!(f, "[{index}]")?,
                Segment::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !key.is_empty()
                        && key
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if bare {
                        f.write_str(key)?;
                    } else {
                        write!(f, "{key:?}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The 1-based line and column (in characters) of the start of `span` in `text`.
fn position(text: &str, span: Option<Range<usize>>) -> (Option<usize>, Option<usize>) {
    let Some(span) = span else {
        return (None, None);
    };
    let mut at = span.start.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (Some(line), Some(column))
}

/// Parser messages span several lines ("invalid key\nexpected ..."); ours are one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Serde's messages speak of fields, variants and Rust types; the user wrote keys, values and TOML.
fn serde_message(message: &str) -> String {
    let message = one_line(message)
        .replacen("unknown field", "unknown key", 1)
        .replacen("missing field", "missing required key", 1)
        .replacen("unknown variant", "unknown value", 1)
        .replace("expected i64", "expected an integer")
        .replace("expected a sequence", "expected an array")
        .replace("invalid type: map", "invalid type: table")
        .replace("invalid type: sequence", "invalid type: array")
        .replace("wanted string or table", "expected a string");
    // `expected struct RawServer` / `expected enum Protocol` name our types, not the user's.
    if let Some(at) = message.find("expected struct ") {
        return format!("{}expected a table", &message[..at]);
    }
    if let Some(at) = message.find("expected enum ") {
        return format!("{}expected a string", &message[..at]);
    }
    message
}

fn contains(span: Option<Range<usize>>, at: usize) -> bool {
    span.is_some_and(|s| s.start <= at && (at < s.end || s.is_empty() && at == s.start))
}

/// The key path of the deepest key or value whose span contains byte `at`; `Some(empty)` means the root.
fn path_at(root: &Table, at: usize) -> Option<KeyPath> {
    // The helpers build the path leaf first; it is reversed once at the end.
    fn in_table(table: &Table, at: usize) -> Option<Vec<Segment>> {
        for (name, item) in table.iter() {
            let key_span = table.key(name).and_then(|k| k.span());
            let found = if contains(key_span, at) {
                Some(Vec::new())
            } else {
                in_item(item, at)
            };
            if let Some(mut segments) = found {
                segments.push(Segment::Key(name.to_owned()));
                return Some(segments);
            }
        }
        None
    }

    fn in_item(item: &Item, at: usize) -> Option<Vec<Segment>> {
        match item {
            Item::None => None,
            Item::Value(value) => in_value(value, at),
            // A table's span runs from its header to its last key-value; its sub-tables come after it.
            Item::Table(table) => {
                in_table(table, at).or_else(|| contains(table.span(), at).then(Vec::new))
            }
            Item::ArrayOfTables(tables) => tables.iter().enumerate().find_map(|(i, table)| {
                let mut segments =
                    in_table(table, at).or_else(|| contains(table.span(), at).then(Vec::new))?;
                segments.push(Segment::Index(i));
                Some(segments)
            }),
        }
    }

    fn in_value(value: &Value, at: usize) -> Option<Vec<Segment>> {
        if !contains(value.span(), at) {
            return None;
        }
        let inner = match value {
            Value::Array(array) => array.iter().enumerate().find_map(|(i, v)| {
                let mut segments = in_value(v, at)?;
                segments.push(Segment::Index(i));
                Some(segments)
            }),
            Value::InlineTable(table) => table.iter().find_map(|(name, v)| {
                let key_span = table.key(name).and_then(|k| k.span());
                let mut segments = if contains(key_span, at) {
                    Vec::new()
                } else {
                    in_value(v, at)?
                };
                segments.push(Segment::Key(name.to_owned()));
                Some(segments)
            }),
            _ => None,
        };
        Some(inner.unwrap_or_default())
    }

    let mut segments = in_table(root, at)?;
    segments.reverse();
    Some(KeyPath(segments))
}

/// A node of the document while walking a [`KeyPath`].
#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Table(&'a Table),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Item(item) => item.span(),
            Node::Table(table) => table.span(),
            Node::Value(value) => value.span(),
        }
    }

    /// The child `key` with the span of the key itself.
    fn get(self, key: &str) -> Option<(Option<Range<usize>>, Node<'a>)> {
        match self {
            Node::Item(Item::Table(table)) | Node::Table(table) => {
                let (k, item) = table.get_key_value(key)?;
                Some((k.span(), Node::Item(item)))
            }
            Node::Item(Item::Value(Value::InlineTable(table)))
            | Node::Value(Value::InlineTable(table)) => {
                let (k, item) = table.get_key_value(key)?;
                Some((k.span(), Node::Item(item)))
            }
            _ => None,
        }
    }

    fn at(self, index: usize) -> Option<Node<'a>> {
        match self {
            Node::Item(Item::ArrayOfTables(tables)) => tables.get(index).map(Node::Table),
            Node::Item(Item::Value(Value::Array(array))) | Node::Value(Value::Array(array)) => {
                array.get(index).map(Node::Value)
            }
            _ => None,
        }
    }
}

/// The span that best shows `path`: the key itself when the path ends with a key, the element when it
/// ends with an index, else (the key is absent, e.g. a missing required key) the closest ancestor.
fn span_of(root: &Table, path: &KeyPath) -> Option<Range<usize>> {
    let mut node = Node::Table(root);
    let mut best = None;
    for (i, segment) in path.0.iter().enumerate() {
        let last = i + 1 == path.0.len();
        match segment {
            Segment::Key(key) => {
                let Some((key_span, child)) = node.get(key) else {
                    break;
                };
                let span = if last {
                    key_span.or_else(|| child.span())
                } else {
                    child.span().or(key_span)
                };
                best = span.or(best);
                node = child;
            }
            Segment::Index(index) => {
                let Some(child) = node.at(*index) else {
                    break;
                };
                best = child.span().or(best);
                node = child;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> ImDocument<&str> {
        ImDocument::parse(text).unwrap()
    }

    #[test]
    fn key_path_display_quotes_non_bare_keys() {
        let path = KeyPath::root("listeners")
            .index(0)
            .key("routes")
            .index(2)
            .key("headers")
            .key("x version");
        assert_eq!(
            path.to_string(),
            "listeners[0].routes[2].headers.\"x version\""
        );
    }

    #[test]
    fn position_counts_lines_and_characters() {
        let text = "a = 1\nbé = 2\n";
        let at = text.find('2').unwrap();
        assert_eq!(position(text, Some(at..at + 1)), (Some(2), Some(6)));
        assert_eq!(position(text, None), (None, None));
    }

    #[test]
    fn span_of_finds_keys_in_tables_arrays_and_inline_tables() {
        let text = "[[pools]]\nname = \"a\"\n[[pools]]\nname = \"b\"\nservers = [\n  { address = \"x\" },\n  { address = \"y\", weight = 0 },\n]\n[pools.health_check]\nkind = \"http\"\n";
        let d = doc(text);
        let line = |path: KeyPath| position(text, span_of(d.as_table(), &path)).0;
        let pool = KeyPath::root("pools").index(1);
        assert_eq!(line(pool.clone()), Some(3));
        assert_eq!(line(pool.key("name")), Some(4));
        assert_eq!(line(pool.key("servers").index(1).key("weight")), Some(7));
        assert_eq!(line(pool.key("servers").index(1)), Some(7));
        assert_eq!(line(pool.key("health_check").key("kind")), Some(10));
        // An absent key is placed at its closest ancestor.
        assert_eq!(line(pool.key("health_check").key("path")), Some(9));
        assert_eq!(line(KeyPath::root("listeners")), None);
    }

    #[test]
    fn path_at_finds_the_deepest_node() {
        let text = "[[pools]]\nname = \"a\"\nservers = [{ address = \"x\", weight = \"2\" }]\n[pools.sticky]\nkind = 1\n";
        let d = doc(text);
        let path = |needle: &str| {
            path_at(d.as_table(), text.find(needle).unwrap())
                .unwrap()
                .to_string()
        };
        assert_eq!(path("\"2\""), "pools[0].servers[0].weight");
        assert_eq!(path("weight"), "pools[0].servers[0].weight");
        assert_eq!(path("kind"), "pools[0].sticky.kind");
        assert_eq!(path("[pools.sticky]"), "pools[0].sticky");
        assert_eq!(path("[[pools]]"), "pools[0]");
    }
}

//! Deny rules: attack patterns matched against a request's path, query and headers.
//!
//! A rule is a name, a [`Target`] and a [`Pattern`] (a regex, or a literal matched anywhere,
//! ignoring ASCII and Unicode case). [`DenyRules::check`] returns the name of the first rule, in
//! the order given, that matches; the owner answers `403` and the rule's hit counter goes up.
//!
//! ## Matching
//! - Patterns run over bytes (`regex::bytes`), so non-UTF-8 input is matched, not skipped. In a
//!   regex, `(?-u:\xc0)` matches a raw byte.
//! - The path and the query are matched as received **and** percent-decoded, so `%2e%2e%2f` is
//!   caught like `../`. Decoding runs twice when the first pass leaves a `%` (double encoding,
//!   `%252e`), turns only valid `%XX` triplets into bytes, leaves `+` alone, and covers the first
//!   [`MAX_DECODE`] bytes — more than any request line a listener accepts. It is the only
//!   allocation, and only for a path or query that contains `%`.
//! - Header values are matched as received, every value of a repeated header.
//! - The rules of a target are compiled into one `RegexSet`, so a request costs one pass per
//!   target (path, query, each named header; every header for `Any` rules) whatever the number
//!   of rules; finding *which* rule matched is done again only on a hit.
//!
//! ## Presets
//! [`RuleSpec::preset`] returns a small starter set, meant to be precise (almost no false positives
//! on ordinary sites), not complete: it is no web application firewall. Rules are named
//! `preset.rule` so metrics and logs say what was caught.
//!
//! | preset | rule | target | catches |
//! | --- | --- | --- | --- |
//! | `path_traversal` | `path_traversal.dotdot` | path, query | a `..` segment: `/../`, `..\`, `/..;/` (Tomcat), at the end of the path, after `=` or `&` in the query (`?file=../../x`), in any encoding (`%2e%2e%2f`, `%252e%252e/`); the overlong UTF-8 dot `%c0%ae` |
//! | | `path_traversal.system_files` | path, query | `/etc/passwd`, `/etc/shadow`, `/proc/self/environ` (and `cmdline`, `fd/`), `win.ini`, `boot.ini` |
//! | `scanners` | `scanners.vcs` | path | version-control metadata: `/.git/`, `/.svn/`, `/.hg/`, `/.bzr/` (not `/.github/`) |
//! | | `scanners.dotfiles` | path | secrets left in the web root: `/.env` (and `/.env.local`, `/.env.prod`…), `/.htaccess`, `/.htpasswd`, `/.DS_Store`, `/.aws/` |
//! | | `scanners.wordpress` | path | WordPress probes: `/wp-admin`, `/wp-login.php`, `/wp-config.php`, `/xmlrpc.php` — **do not use this preset in front of a WordPress site** |
//! | | `scanners.admin_tools` | path | `/phpmyadmin`, `/adminer.php`, `/cgi-bin/` |
//! | | `scanners.user_agent` | `User-Agent` | attack tools that announce themselves: sqlmap, Nikto, masscan, ZGrab, Nuclei, WPScan, DirBuster, Gobuster, Nmap Scripting Engine, Acunetix, Netsparker, Havij, fimap, w3af |
//! | `sql_injection` | `sql_injection.union_select` | query | `UNION SELECT`, `union all select`, with `+`, spaces or `/**/` between |
//! | | `sql_injection.tautology` | query | a quote closed then `or 1=1` / `and '1'='1` |
//! | | `sql_injection.probes` | query | `information_schema`, `sleep(5)`, `pg_sleep(`, `benchmark(`, `waitfor delay`, `xp_cmdshell`, `load_file(` |
//!
//! An unknown preset name is an error listing the known ones ([`PRESETS`]).

use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{HeaderMap, HeaderName, USER_AGENT};
use http::Uri;
use regex::bytes::{RegexBuilder, RegexSet, RegexSetBuilder};

use super::FilterError;

/// Bytes of a path or query that are percent-decoded.
pub const MAX_DECODE: usize = 64 * 1024;

/// Compiled-size limit of one rule's regex and of a target's set.
const REGEX_SIZE_LIMIT: usize = 8 << 20;

/// The names accepted by [`RuleSpec::preset`].
pub const PRESETS: &[&str] = &["path_traversal", "scanners", "sql_injection"];

/// What part of a request a rule looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The path, raw and percent-decoded.
    Path,
    /// The query string (without `?`), raw and percent-decoded.
    Query,
    /// Both the path and the query.
    Uri,
    /// Every value of this header.
    Header(HeaderName),
    /// The path, the query and every header value.
    Any,
}

/// How a rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// A regular expression (`regex` crate syntax), matched anywhere unless anchored.
    Regex(String),
    /// A string contained anywhere, ignoring case.
    Literal(String),
}

/// A deny rule as configured: plain values, compiled by [`DenyRules::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    /// Shown in logs and metrics; unique within a [`DenyRules`].
    pub name: String,
    /// Where to look.
    pub target: Target,
    /// What to look for.
    pub pattern: Pattern,
}

impl RuleSpec {
    /// A rule with a regex.
    pub fn regex(name: impl Into<String>, target: Target, regex: impl Into<String>) -> Self {
        RuleSpec {
            name: name.into(),
            target,
            pattern: Pattern::Regex(regex.into()),
        }
    }

    /// A rule with a case-insensitive literal.
    pub fn literal(name: impl Into<String>, target: Target, literal: impl Into<String>) -> Self {
        RuleSpec {
            name: name.into(),
            target,
            pattern: Pattern::Literal(literal.into()),
        }
    }

    /// The rules of a starter preset (see the module doc), to combine with others.
    pub fn preset(name: &str) -> Result<Vec<RuleSpec>, FilterError> {
        fn r(name: &str, target: Target, regex: impl Into<String>) -> RuleSpec {
            RuleSpec::regex(name, target, regex)
        }
        Ok(match name {
            "path_traversal" => vec![
                r(
                    "path_traversal.dotdot",
                    Target::Uri,
                    r"(?-u)(?:^|[/\\=&])\.\.(?:[/\\;]|$)|\xc0[\xae\xaf]",
                ),
                r(
                    "path_traversal.system_files",
                    Target::Uri,
                    r"(?i-u)/etc/(?:passwd|shadow)|/proc/self/(?:environ|cmdline|fd/)|[/\\](?:win|boot)\.ini",
                ),
            ],
            "scanners" => vec![
                r(
                    "scanners.vcs",
                    Target::Path,
                    r"(?-u)/\.(?:git|svn|hg|bzr)(?:/|$)",
                ),
                r(
                    "scanners.dotfiles",
                    Target::Path,
                    r"(?i-u)/\.(?:env(?:\.[a-z0-9_.-]+)?|htaccess|htpasswd|ds_store)$|/\.aws/",
                ),
                r(
                    "scanners.wordpress",
                    Target::Path,
                    r"(?i-u)/(?:wp-admin(?:/|$)|wp-login\.php|wp-config\.php|xmlrpc\.php)",
                ),
                r(
                    "scanners.admin_tools",
                    Target::Path,
                    r"(?i-u)/phpmyadmin|/adminer\.php|/cgi-bin/",
                ),
                r(
                    "scanners.user_agent",
                    Target::Header(USER_AGENT),
                    r"(?i-u)sqlmap|nikto|masscan|zgrab|nuclei|wpscan|dirbuster|gobuster|nmap scripting engine|acunetix|netsparker|havij|fimap|w3af",
                ),
            ],
            "sql_injection" => {
                // Separators SQL accepts where a space would be, as they arrive in a query.
                let sp = r"(?:\s|\+|/\*.*?\*/)";
                vec![
                    r(
                        "sql_injection.union_select",
                        Target::Query,
                        format!(r"(?i-u)\bunion{sp}+(?:all{sp}+)?select\b"),
                    ),
                    r(
                        "sql_injection.tautology",
                        Target::Query,
                        format!(r#"(?i-u)['"]{sp}*(?:or|and){sp}+['"]?1['"]?{sp}*={sp}*['"]?1"#),
                    ),
                    r(
                        "sql_injection.probes",
                        Target::Query,
                        format!(
                            r"(?i-u)information_schema|\bsleep{sp}*\({sp}*\d+{sp}*\)|pg_sleep{sp}*\(|\bbenchmark{sp}*\(|waitfor{sp}+delay|xp_cmdshell|load_file{sp}*\("
                        ),
                    ),
                ]
            }
            _ => {
                return Err(FilterError::UnknownPreset {
                    name: name.to_owned(),
                    known: PRESETS.join(", "),
                })
            }
        })
    }

    /// The regex source this rule compiles to.
    fn source(&self) -> String {
        match &self.pattern {
            Pattern::Regex(re) => re.clone(),
            Pattern::Literal(lit) => format!("(?i){}", regex::escape(lit)),
        }
    }
}

/// The rules of one target, compiled together.
#[derive(Debug)]
struct Group {
    set: RegexSet,
    /// Rule index of each pattern of `set`, ascending.
    rules: Vec<usize>,
}

impl Group {
    fn build(
        specs: &[RuleSpec],
        sources: &[String],
        applies: impl Fn(&Target) -> bool,
    ) -> Result<Option<Self>, FilterError> {
        let rules: Vec<usize> = (0..specs.len())
            .filter(|&i| applies(&specs[i].target))
            .collect();
        if rules.is_empty() {
            return Ok(None);
        }
        let set = RegexSetBuilder::new(rules.iter().map(|&i| &sources[i]))
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| FilterError::Rule {
                index: rules[0],
                name: specs[rules[0]].name.clone(),
                reason: format!("the rules of its target together are too large: {e}"),
            })?;
        Ok(Some(Group { set, rules }))
    }

    /// The first rule (lowest index) of this group matching `haystack`. Allocates only on a hit.
    #[inline]
    fn first(&self, haystack: &[u8]) -> Option<usize> {
        if !self.set.is_match(haystack) {
            return None;
        }
        self.set
            .matches(haystack)
            .iter()
            .next()
            .map(|p| self.rules[p])
    }
}

#[derive(Debug)]
struct Rule {
    spec: RuleSpec,
    hits: AtomicU64,
}

/// A compiled list of deny rules with a hit counter per rule. See the module doc.
#[derive(Debug, Default)]
pub struct DenyRules {
    rules: Vec<Rule>,
    path: Option<Group>,
    query: Option<Group>,
    /// One group per header name named by a rule.
    headers: Vec<(HeaderName, Group)>,
    /// `Any` rules, run over every header value.
    any_header: Option<Group>,
}

impl DenyRules {
    /// Compiles `specs`, in order (the first match wins). Errors name the rule and its position:
    /// an empty or duplicate name, an empty pattern (it would match every request), a regex that
    /// does not compile.
    pub fn new(specs: Vec<RuleSpec>) -> Result<Self, FilterError> {
        let err = |index: usize, name: &str, reason: String| FilterError::Rule {
            index,
            name: name.to_owned(),
            reason,
        };
        let mut sources = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            if spec.name.trim().is_empty() {
                return Err(err(i, &spec.name, "empty name".into()));
            }
            if specs[..i].iter().any(|s| s.name == spec.name) {
                return Err(err(i, &spec.name, "another rule has this name".into()));
            }
            let (Pattern::Regex(p) | Pattern::Literal(p)) = &spec.pattern;
            if p.is_empty() {
                return Err(err(i, &spec.name, "empty pattern".into()));
            }
            let source = spec.source();
            let re = RegexBuilder::new(&source)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| err(i, &spec.name, format!("invalid regex: {e}")))?;
            if re.is_match(b"") {
                return Err(err(
                    i,
                    &spec.name,
                    "the pattern matches the empty string, so every request".into(),
                ));
            }
            sources.push(source);
        }

        let path = Group::build(&specs, &sources, |t| {
            matches!(t, Target::Path | Target::Uri | Target::Any)
        })?;
        let query = Group::build(&specs, &sources, |t| {
            matches!(t, Target::Query | Target::Uri | Target::Any)
        })?;
        let mut names: Vec<HeaderName> = Vec::new();
        for spec in &specs {
            if let Target::Header(h) = &spec.target {
                if !names.contains(h) {
                    names.push(h.clone());
                }
            }
        }
        let mut headers = Vec::with_capacity(names.len());
        for name in names {
            let group = Group::build(
                &specs,
                &sources,
                |t| matches!(t, Target::Header(h) if *h == name),
            )?
            .expect("a rule names this header");
            headers.push((name, group));
        }
        let any_header = Group::build(&specs, &sources, |t| matches!(t, Target::Any))?;

        Ok(DenyRules {
            rules: specs
                .into_iter()
                .map(|spec| Rule {
                    spec,
                    hits: AtomicU64::new(0),
                })
                .collect(),
            path,
            query,
            headers,
            any_header,
        })
    }

    /// The rules of one preset alone (see [`RuleSpec::preset`] to combine presets and rules).
    pub fn preset(name: &str) -> Result<Self, FilterError> {
        Self::new(RuleSpec::preset(name)?)
    }

    /// Whether there is no rule (a caller may skip the check).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The name of the first rule (in the order given) matching this request, whose hit counter
    /// is then incremented; `None` if no rule matches.
    pub fn check(&self, uri: &Uri, headers: &HeaderMap) -> Option<&str> {
        let mut first: Option<usize> = None;
        let mut see = |hit: Option<usize>| {
            if let Some(i) = hit {
                first = Some(first.map_or(i, |f| f.min(i)));
            }
        };
        if let Some(g) = &self.path {
            see(first_in_url_part(g, uri.path().as_bytes()));
        }
        if let (Some(g), Some(q)) = (&self.query, uri.query()) {
            see(first_in_url_part(g, q.as_bytes()));
        }
        for (name, g) in &self.headers {
            for value in headers.get_all(name) {
                see(g.first(value.as_bytes()));
            }
        }
        if let Some(g) = &self.any_header {
            for value in headers.values() {
                see(g.first(value.as_bytes()));
            }
        }
        let rule = &self.rules[first?];
        rule.hits.fetch_add(1, Ordering::Relaxed);
        Some(&rule.spec.name)
    }

    /// Each rule's name and hit count, in order (for metrics).
    pub fn hits(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.rules
            .iter()
            .map(|r| (r.spec.name.as_str(), r.hits.load(Ordering::Relaxed)))
    }

    /// The rules as given (for the admin API).
    pub fn specs(&self) -> impl Iterator<Item = &RuleSpec> + '_ {
        self.rules.iter().map(|r| &r.spec)
    }
}

/// The first rule of `g` matching a path or query, raw or percent-decoded.
fn first_in_url_part(g: &Group, raw: &[u8]) -> Option<usize> {
    let in_raw = g.first(raw);
    if !raw.contains(&b'%') {
        return in_raw;
    }
    let decoded = percent_decode(raw);
    match (in_raw, g.first(&decoded)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Percent-decodes the first [`MAX_DECODE`] bytes of `raw`, twice if a `%` remains. Invalid
/// triplets stay as they are.
pub fn percent_decode(raw: &[u8]) -> Vec<u8> {
    let once = decode_once(&raw[..raw.len().min(MAX_DECODE)]);
    if once.contains(&b'%') {
        decode_once(&once)
    } else {
        once
    }
}

fn decode_once(input: &[u8]) -> Vec<u8> {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' && i + 2 < input.len() {
            if let (Some(h), Some(l)) = (hex(input[i + 1]), hex(input[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(input[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn req(uri: &str) -> Uri {
        uri.parse().unwrap()
    }

    fn none() -> HeaderMap {
        HeaderMap::new()
    }

    fn ua(agent: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(USER_AGENT, HeaderValue::from_str(agent).unwrap());
        h
    }

    fn all_presets() -> DenyRules {
        let mut specs = Vec::new();
        for p in PRESETS {
            specs.extend(RuleSpec::preset(p).unwrap());
        }
        DenyRules::new(specs).unwrap()
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode(b"/a%2e%2E%2fb"), b"/a../b");
        assert_eq!(percent_decode(b"%252e%252e%252f"), b"../");
        assert_eq!(percent_decode(b"%zz%2"), b"%zz%2");
        assert_eq!(percent_decode(b"%"), b"%");
        assert_eq!(percent_decode(b"100%"), b"100%");
        assert_eq!(percent_decode(b"%41%"), b"A%");
        assert_eq!(percent_decode(b"%c0%ae"), [0xc0, 0xae]);
        assert_eq!(percent_decode(b"a+b"), b"a+b");
        // Two passes at most.
        assert_eq!(percent_decode(b"%25252e"), b"%2e");
        // Bounded.
        let long = "%41".repeat(MAX_DECODE);
        assert_eq!(
            percent_decode(long.as_bytes()).len(),
            MAX_DECODE / 3 + MAX_DECODE % 3
        );
    }

    #[test]
    fn path_traversal_in_every_encoding() {
        let rules = DenyRules::preset("path_traversal").unwrap();
        for bad in [
            "/../etc/x",
            "/a/b/../../c",
            "/static/..",
            "/a/..;/b",
            "/a/%2e%2e/b",
            "/a/%2E%2E%2Fb",
            "/a/..%2fb",
            "/a/%252e%252e%252fb",
            "/a/..%5cb",
            "/a/%c0%ae%c0%ae/b",
            "/download?file=../../secret",
            "/download?file=..%2f..%2fsecret",
            "/d?x=1&path=a/../b",
            "/d?f=..%5c..%5cwindows",
        ] {
            assert_eq!(
                rules.check(&req(bad), &none()),
                Some("path_traversal.dotdot"),
                "{bad}"
            );
        }
        for bad in [
            "/cgi?f=/etc/passwd",
            "/x/%2Fetc%2Fshadow",
            "/a?p=/proc/self/environ",
            "/c:/windows/win.ini",
            "/q?f=c:%5cboot.ini",
        ] {
            assert_eq!(
                rules.check(&req(bad), &none()),
                Some("path_traversal.system_files"),
                "{bad}"
            );
        }
    }

    #[test]
    fn scanner_paths_and_agents() {
        let rules = DenyRules::preset("scanners").unwrap();
        let cases = [
            ("/.git/config", "scanners.vcs"),
            ("/.git", "scanners.vcs"),
            ("/app/.svn/entries", "scanners.vcs"),
            ("/.env", "scanners.dotfiles"),
            ("/api/.env.production", "scanners.dotfiles"),
            ("/.htpasswd", "scanners.dotfiles"),
            ("/.DS_Store", "scanners.dotfiles"),
            ("/.aws/credentials", "scanners.dotfiles"),
            ("/wp-admin/", "scanners.wordpress"),
            ("/blog/wp-login.php", "scanners.wordpress"),
            ("/xmlrpc.php", "scanners.wordpress"),
            ("/phpMyAdmin/index.php", "scanners.admin_tools"),
            ("/cgi-bin/test.cgi", "scanners.admin_tools"),
            ("/%2egit/HEAD", "scanners.vcs"),
        ];
        for (path, rule) in cases {
            assert_eq!(rules.check(&req(path), &none()), Some(rule), "{path}");
        }
        for agent in [
            "sqlmap/1.7.2#stable (https://sqlmap.org)",
            "Mozilla/5.00 (Nikto/2.1.6) (Evasions:None) (Test:000003)",
            "masscan/1.3 (https://github.com/robertdavidgraham/masscan)",
            "Mozilla/5.0 zgrab/0.x",
            "Mozilla/5.0 (compatible; Nmap Scripting Engine; https://nmap.org/book/nse.html)",
        ] {
            assert_eq!(
                rules.check(&req("/"), &ua(agent)),
                Some("scanners.user_agent"),
                "{agent}"
            );
        }
    }

    #[test]
    fn sql_injection_in_the_query() {
        let rules = DenyRules::preset("sql_injection").unwrap();
        let cases = [
            (
                "/p?id=1+UNION+SELECT+password+FROM+users",
                "sql_injection.union_select",
            ),
            (
                "/p?id=1%20union%20all%20select%201,2",
                "sql_injection.union_select",
            ),
            (
                "/p?id=1/**/UnIoN/**/SeLeCt/**/1",
                "sql_injection.union_select",
            ),
            ("/login?u=admin%27%20or%201=1--", "sql_injection.tautology"),
            ("/login?u=x'+OR+'1'='1", "sql_injection.tautology"),
            ("/p?id=1+and+sleep(5)", "sql_injection.probes"),
            (
                "/p?q=select+*+from+information_schema.tables",
                "sql_injection.probes",
            ),
            ("/p?id=1;waitfor%20delay%20'0:0:5'", "sql_injection.probes"),
        ];
        for (uri, rule) in cases {
            assert_eq!(rules.check(&req(uri), &none()), Some(rule), "{uri}");
        }
    }

    #[test]
    fn ordinary_requests_pass_every_preset() {
        let rules = all_presets();
        for ok in [
            "/",
            "/index.html",
            "/a/b/c.d",
            "/.well-known/acme-challenge/token",
            "/.github/workflows",
            "/static/app...js",
            "/files/..hidden",
            "/env",
            "/environment/.envoy",
            "/docs/etc/passwords-policy",
            "/wp-admin-guide.html",
            "/search?q=union+station+selection",
            "/search?q=it%27s+100%25+orange",
            "/search?q=o%27reilly+or+1+book",
            "/search?q=sleeping+beauty",
            "/api/v1/users?sort=-created&page=2",
            "/path%20with%20spaces",
            "/bad%zzescape",
            "/p?next=%2Fdashboard%2F..x",
        ] {
            assert_eq!(rules.check(&req(ok), &none()), None, "{ok}");
        }
        let mut h =
            ua("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36");
        h.insert(
            "referer",
            HeaderValue::from_static("https://example.com/../x"),
        );
        assert_eq!(rules.check(&req("/"), &h), None, "referer is not a target");
        assert!(rules.hits().all(|(_, n)| n == 0));
    }

    #[test]
    fn unknown_presets_are_errors() {
        let err = RuleSpec::preset("xss").unwrap_err();
        assert!(matches!(&err, FilterError::UnknownPreset { name, .. } if name == "xss"));
        assert!(
            err.to_string()
                .contains("path_traversal, scanners, sql_injection"),
            "{err}"
        );
        assert!(DenyRules::preset("").is_err());
    }

    #[test]
    fn the_first_rule_in_order_wins_and_hits_are_counted() {
        let rules = DenyRules::new(vec![
            RuleSpec::literal("admin", Target::Path, "/ADMIN"),
            RuleSpec::literal("bot", Target::Header(USER_AGENT), "badbot"),
            RuleSpec::regex("any-evil", Target::Any, "evil"),
            RuleSpec::regex("query-token", Target::Query, r"token=\w{3}"),
            RuleSpec::regex(
                "x-debug",
                Target::Header(HeaderName::from_static("x-debug")),
                "^1$",
            ),
        ])
        .unwrap();
        assert_eq!(rules.check(&req("/Admin/x"), &none()), Some("admin"));
        // Rule order, not target order, decides: "bot" (1) is before "any-evil" (2) though the
        // path is matched first.
        assert_eq!(rules.check(&req("/evil"), &ua("BadBot/1.0")), Some("bot"));
        assert_eq!(rules.check(&req("/evil"), &none()), Some("any-evil"));
        assert_eq!(rules.check(&req("/?a=evil"), &none()), Some("any-evil"));
        assert_eq!(rules.check(&req("/"), &ua("evil-agent")), Some("any-evil"));
        assert_eq!(
            rules.check(&req("/?token=abc"), &none()),
            Some("query-token")
        );
        assert_eq!(
            rules.check(&req("/token=abc"), &none()),
            None,
            "not in the path"
        );

        let mut h = HeaderMap::new();
        h.append("x-debug", HeaderValue::from_static("0"));
        h.append("x-debug", HeaderValue::from_static("1"));
        assert_eq!(rules.check(&req("/"), &h), Some("x-debug"), "every value");

        let hits: Vec<_> = rules.hits().collect();
        assert_eq!(
            hits,
            [
                ("admin", 1),
                ("bot", 1),
                ("any-evil", 3),
                ("query-token", 1),
                ("x-debug", 1)
            ]
        );
        assert_eq!(rules.specs().count(), 5);
    }

    #[test]
    fn literals_are_literal_and_case_insensitive() {
        let rules = DenyRules::new(vec![RuleSpec::literal("dots", Target::Path, "a.b(c")]).unwrap();
        assert_eq!(rules.check(&req("/x/A.B(C"), &none()), Some("dots"));
        assert_eq!(rules.check(&req("/x/axb(c"), &none()), None);
        assert_eq!(rules.check(&req("/x/a%2eb%28c"), &none()), Some("dots"));
    }

    #[test]
    fn non_utf8_bytes_are_matched() {
        let rules = DenyRules::new(vec![RuleSpec::regex(
            "nul",
            Target::Path,
            r"(?-u)\x00|\xff",
        )])
        .unwrap();
        assert_eq!(rules.check(&req("/a%00b"), &none()), Some("nul"));
        assert_eq!(rules.check(&req("/a%FF"), &none()), Some("nul"));
        assert_eq!(rules.check(&req("/a%41"), &none()), None);
        let mut h = HeaderMap::new();
        h.insert("x-bin", HeaderValue::from_bytes(b"\xff\xfe").unwrap());
        let any = DenyRules::new(vec![RuleSpec::regex("bin", Target::Any, r"(?-u)\xfe")]).unwrap();
        assert_eq!(any.check(&req("/"), &h), Some("bin"));
    }

    #[test]
    fn bad_rules_are_refused_with_their_name_and_index() {
        let ok = RuleSpec::literal("ok", Target::Path, "x");
        let cases = [
            (
                RuleSpec::regex("broken", Target::Path, "a("),
                "invalid regex",
            ),
            (RuleSpec::literal("", Target::Path, "x"), "empty name"),
            (RuleSpec::literal("ok", Target::Query, "y"), "another rule"),
            (
                RuleSpec::literal("blank", Target::Path, ""),
                "empty pattern",
            ),
            (
                RuleSpec::regex("everything", Target::Path, "x*"),
                "every request",
            ),
        ];
        for (bad, why) in cases {
            let name = bad.name.clone();
            let err = DenyRules::new(vec![ok.clone(), bad]).unwrap_err();
            assert!(
                matches!(&err, FilterError::Rule { index: 1, name: n, reason } if *n == name && reason.contains(why)),
                "{err}"
            );
        }
    }

    #[test]
    fn no_rules_match_nothing() {
        let rules = DenyRules::default();
        assert!(rules.is_empty());
        assert_eq!(rules.check(&req("/../x"), &ua("sqlmap")), None);
        assert!(DenyRules::new(Vec::new()).unwrap().is_empty());
    }
}

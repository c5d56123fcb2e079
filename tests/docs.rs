//! The shipped documentation against the program: man/throttlefs.1 names
//! every option, limit, alias and command that the help texts name, and
//! groff reads it without a warning; contrib/completions/ holds what
//! `throttlefs completions SHELL` prints; README.md stays a front page and
//! every relative link in it and in docs/*.md resolves.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use common::{run_unchecked, stdout_ok};
use throttlefs::ctl::COMMANDS;
use throttlefs::options::limit_aliases;

/// The committed completion scripts, by shell.
const COMPLETIONS: [(&str, &str); 3] = [
    ("bash", "contrib/completions/throttlefs.bash"),
    ("zsh", "contrib/completions/_throttlefs"),
    ("fish", "contrib/completions/throttlefs.fish"),
];

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The man page as text: font escapes dropped, `\-` as `-`.
fn man_text() -> String {
    let source = fs::read_to_string(repo_path("man/throttlefs.1")).unwrap();
    let mut text = source.replace("\\-", "-").replace("\\e", "\\");
    for font in ["\\fB", "\\fI", "\\fR", "\\fP"] {
        text = text.replace(font, "");
    }
    text
}

/// Whether `word` occurs in `text` not as part of a longer name.
fn names(text: &str, word: &str) -> bool {
    let part = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    text.match_indices(word).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(part) && !after.is_some_and(part)
    })
}

/// The options a clap help text names: every `--long`, and the `-x` that
/// start a line of its option list.
fn help_options(help: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in help.match_indices("--") {
        let name: String = help[at + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if !name.is_empty() {
            found.insert(format!("--{name}"));
        }
    }
    for line in help.lines() {
        let line = line.trim_start();
        let mut chars = line.chars();
        if let (Some('-'), Some(c)) = (chars.next(), chars.next())
            && c.is_ascii_alphanumeric()
        {
            found.insert(format!("-{c}"));
        }
    }
    found
}

/// The limit names the mount's help lists (`  NAME=VALUE  meaning`).
fn help_limits(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Limits, also settable"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.trim_start().split_once('=').map(|(n, _)| n.to_string()))
        .collect()
}

#[test]
fn man_page_names_every_option_limit_alias_and_command() {
    let man = man_text();
    let bin = common::binary();
    let mount_help = stdout_ok(bin, &["--help"]);
    let mut helps = vec![("throttlefs".to_string(), mount_help.clone())];
    for command in COMMANDS {
        helps.push((
            format!("throttlefs {command}"),
            stdout_ok(bin, &[command, "--help"]),
        ));
    }
    let mut missing = Vec::new();
    for (what, help) in &helps {
        for option in help_options(help) {
            if !names(&man, &option) {
                missing.push(format!("{option} (from {what} --help)"));
            }
        }
    }
    let limits = help_limits(&mount_help);
    assert_eq!(limits.len(), 37, "limits in --help: {limits:?}");
    for limit in limits {
        if !names(&man, &limit) {
            missing.push(format!("limit {limit}"));
        }
    }
    for (alias, canonical) in limit_aliases() {
        if !names(&man, &alias) {
            missing.push(format!("alias {alias} (of {canonical})"));
        }
    }
    for command in COMMANDS {
        if !man.contains(&format!("throttlefs {command}")) {
            missing.push(format!("command {command} in SYNOPSIS"));
        }
    }
    assert!(
        missing.is_empty(),
        "man/throttlefs.1 does not name: {missing:#?}"
    );
}

#[test]
fn groff_reads_the_man_page_without_warnings() {
    let page = repo_path("man/throttlefs.1");
    let out = run_unchecked("groff", &["-ww", "-z", "-man", page.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "groff failed ({:?}; .ci/run installs groff-base): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.is_empty(), "groff -ww -z -man warns:\n{said}");
}

#[test]
fn committed_completions_are_what_the_command_prints() {
    for (shell, file) in COMPLETIONS {
        let printed = stdout_ok(common::binary(), &["completions", shell]);
        let committed = fs::read_to_string(repo_path(file)).unwrap();
        assert!(
            printed == committed,
            "{file} is out of date; regenerate it with: \
             cargo run -q -- completions {shell} > {file}"
        );
        // Every command and the mount's options are in each script.
        for word in COMMANDS
            .iter()
            .chain(&["bps-rd", "io-threads", "foreground"])
        {
            assert!(printed.contains(word), "{shell} script lacks {word}");
        }
    }
    // Parsed by bash itself (zsh and fish are not installed in CI).
    let bash = repo_path(COMPLETIONS[0].1);
    let out = run_unchecked("bash", &["-n", bash.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bash_completion_offers_commands_and_each_commands_flags() {
    let script = repo_path(COMPLETIONS[0].1);
    // COMP_WORDS as bash sets it, then the function the script registers.
    let complete = |words: &[&str]| -> String {
        let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        let cword = words.len() - 1;
        let prog = format!(
            "source '{}'; COMP_WORDS=({}); COMP_CWORD={cword}; \
             _throttlefs throttlefs '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display(),
            quoted.join(" "),
            words[cword],
            words[cword - 1],
        );
        stdout_ok("bash", &["-c", &prog])
    };
    let offered = |words: &[&str]| -> BTreeSet<String> {
        complete(words).lines().map(str::to_string).collect()
    };
    assert_eq!(
        offered(&["throttlefs", "s"]),
        BTreeSet::from(["set".to_string(), "stat".to_string()])
    );
    assert!(offered(&["throttlefs", "--bps-"]).contains("--bps-wr"));
    assert!(offered(&["throttlefs", "--io"]).contains("--io-threads"));
    assert!(offered(&["throttlefs", "stat", "--"]).contains("--prometheus"));
    assert!(offered(&["throttlefs", "top", "--"]).contains("--delay"));
    assert!(offered(&["throttlefs", "set", "/x", "--g"]).contains("--group"));
    assert_eq!(
        offered(&["throttlefs", "completions", "f"]),
        BTreeSet::from(["fish".to_string()])
    );
}

/// The front page stays a front page: the rest lives in docs/.
const README_LINES_MAX: usize = 320;

#[test]
fn readme_stays_a_front_page() {
    let readme = fs::read_to_string(repo_path("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(
        lines <= README_LINES_MAX,
        "README.md has {lines} lines, more than {README_LINES_MAX}: move detail to docs/"
    );
}

/// README.md and every docs/*.md.
fn markdown_pages() -> Vec<PathBuf> {
    let mut pages = vec![repo_path("README.md")];
    let mut docs: Vec<PathBuf> = fs::read_dir(repo_path("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    assert!(!docs.is_empty(), "docs/ holds no .md page");
    pages.extend(docs);
    pages
}

/// Markdown without its fenced code blocks and code spans, where a `[x](y)`
/// is text, not a link.
fn prose(markdown: &str) -> String {
    let mut text = String::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            text.push_str(line);
            text.push('\n');
        }
    }
    // Code spans may wrap across lines; drop every one.
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(open) = rest.find('`') {
        out.push_str(&rest[..open]);
        let ticks = rest[open..].chars().take_while(|&c| c == '`').count();
        let fence = "`".repeat(ticks);
        let after = &rest[open + ticks..];
        match after.find(&fence) {
            Some(close) => rest = &after[close + ticks..],
            None => {
                out.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The targets of the inline links `[text](target)` of a page.
fn link_targets(markdown: &str) -> Vec<String> {
    let text = prose(markdown);
    text.match_indices("](")
        .filter_map(|(at, _)| {
            let target = &text[at + 2..];
            let end = target.find(')')?;
            Some(target[..end].trim().to_string())
        })
        .collect()
}

/// GitHub's anchor for a heading: lowercase, spaces to `-`, and every other
/// character that is not a letter, digit, `-` or `_` dropped; a repeated
/// anchor gets `-1`, `-2`, ...
fn heading_anchors(markdown: &str) -> BTreeSet<String> {
    let mut anchors = BTreeSet::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#');
        if !title.starts_with(' ') {
            continue;
        }
        let slug: String = title
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let mut anchor = slug.clone();
        let mut n = 0;
        while anchors.contains(&anchor) {
            n += 1;
            anchor = format!("{slug}-{n}");
        }
        anchors.insert(anchor);
    }
    anchors
}

#[test]
fn heading_anchors_follow_githubs_rules() {
    let anchors = heading_anchors(
        "# Watching and tuning: stat, top\n```\n# not a heading\n```\n\
         ## The I/O path\n## Order\n## Order\n#hashtag\n",
    );
    let want = [
        "watching-and-tuning-stat-top",
        "the-io-path",
        "order",
        "order-1",
    ];
    assert_eq!(anchors, want.iter().map(|s| s.to_string()).collect());
    assert_eq!(
        link_targets("[a](b.md) `[c](d.md)` and\n```\n[e](f.md)\n```\n[g](h.md#i)"),
        ["b.md", "h.md#i"]
    );
}

#[test]
fn relative_links_in_readme_and_docs_resolve() {
    let mut broken = Vec::new();
    for page in markdown_pages() {
        let text = fs::read_to_string(&page).unwrap();
        let dir = page.parent().unwrap();
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target.as_str(), None),
            };
            let file = if path.is_empty() {
                page.clone()
            } else {
                dir.join(path)
            };
            let name = page.strip_prefix(repo_path("")).unwrap_or(&page);
            let shown = format!("{}: {target}", name.display());
            if !file.exists() {
                broken.push(format!("{shown} (no such file)"));
                continue;
            }
            if let Some(anchor) = anchor {
                let headings = fs::read_to_string(&file)
                    .map(|t| heading_anchors(&t))
                    .unwrap_or_default();
                if !headings.contains(anchor) {
                    broken.push(format!("{shown} (no such heading; has {headings:?})"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links: {broken:#?}");
}

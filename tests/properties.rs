//! Property tests of the pure parts: value parsers, `-o`/argv parsing, the
//! `user.throttle.*` attribute helpers and the leaky-bucket maths.
//!
//! The issue asks for "no panic, no overflow, no wrap (u64::MAX limits, 0,
//! 1 B/s, enormous bursts, non-UTF-8 names and values)". Tests build with
//! overflow checks on, so any arithmetic that would wrap in a release build
//! panics here and fails the property. Beyond "no panic", every property
//! checks an oracle that a real bug would break: parsers against exact
//! integer arithmetic, round trips through the canonical text, throttle
//! deadlines that are exact (never early, never needing a second wait),
//! release times against a reference bucket model, and a greedy client's
//! dispatched bytes/ops against the leaky-bucket bound.
//!
//! Nothing here mounts: argv tests use paths that do not exist. Failures are
//! not persisted to files (`failure_persistence: None`). The `regression_*`
//! tests at the end pin the minimal counterexamples the properties found.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;
use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

use throttlefs::options::{
    apply_limit, format_limit, limit_names, parse_args, parse_count, parse_duration, parse_group,
    parse_size, valid_group_name,
};
use throttlefs::stats::{Effective, Origin};
use throttlefs::throttle::{
    BUCKET_WITHOUT_BURST, BURST_RATE_BUCKET, BucketKind, DEFAULT_BURST_LENGTH, Direction,
    LimitSpec, Limits, MAX_LIMIT_VALUE, ThrottleState,
};
use throttlefs::xattr::{self, Attr, OwnSet};

const MIB: u64 = 1024 * 1024;
const NANOS_PER_SEC: u128 = 1_000_000_000;
const ONE_NS: Duration = Duration::from_nanos(1);
const PREFIX: &str = "user.throttle.";
/// Positional paths that do not exist, so parse_args can never succeed.
const MISSING_SOURCE: &str = "/nonexistent-throttlefs-proptest/source";
const MISSING_MOUNTPOINT: &str = "/nonexistent-throttlefs-proptest/mnt";

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        // Keep a failing run short: shrinking stops after 5 s.
        max_shrink_time: 5000,
        ..ProptestConfig::default()
    }
}

fn later(t: Duration, d: Duration) -> Duration {
    t.checked_add(d).unwrap_or(Duration::MAX)
}

fn dirs() -> impl Strategy<Value = Direction> {
    prop_oneof![Just(Direction::Read), Just(Direction::Write)]
}

fn kinds() -> impl Strategy<Value = BucketKind> {
    select(BucketKind::ALL.to_vec())
}

fn names() -> impl Strategy<Value = String> {
    select(limit_names())
}

// ---------------------------------------------------------------------------
// Input generators for the parsers.
// ---------------------------------------------------------------------------

/// Strings that look like numbers, sizes, durations, or nothing at all:
/// arbitrary unicode (control characters included), huge digit strings,
/// signs, whitespace and suffix soup.
fn messy_string() -> BoxedStrategy<String> {
    prop_oneof![
        any::<String>(),
        "[0-9]{0,45}",
        "[-+ \t]{0,2}[0-9]{0,25}(\\.[0-9]{0,25})?[ \t\n]?[kKmMgGtTpPeEbBiIxX]{0,4}[\n\0]?",
        "[0-9]{1,22}(\\.[0-9]{0,12})?(ns|us|ms|s|m|h|d|w|M|y|years|sec|min|)( [0-9]{1,22}(ns|ms|s|m|h|d))?",
        "[0-9 .a-zA-Z_=,:]{0,30}",
        "\\PC{0,12}",
    ]
    .boxed()
}

/// Limit names: the real ones, near misses and random text.
fn any_limit_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => names(),
        1 => names().prop_map(|n| format!("{n}_max")),
        1 => names().prop_map(|n| format!("{n}_length")),
        1 => names().prop_map(|n| n.to_uppercase()),
        1 => messy_string(),
    ]
}

/// A value that is valid for `name` by construction.
fn valid_value(name: &str) -> BoxedStrategy<String> {
    if name.ends_with("_max_length") {
        prop_oneof![
            (any::<u64>(), 0..1_000_000_000u32)
                .prop_map(|(s, n)| format!("{s}.{n:09}"))
                .boxed(),
            any::<u64>().prop_map(|s| s.to_string()).boxed(),
            "[1-9][0-9]{0,5}(ns|us|ms|s|m|h|d)".boxed(),
            "0\\.[0-9]{1,30}".boxed(),
        ]
        .boxed()
    } else if name == "iops_size" || name.starts_with("bps") {
        prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            (
                0..=16383u64,
                select(vec!["K", "m", "GiB", "tb", "P", "B", ""])
            )
                .prop_map(|(n, s)| format!("{n}{s}")),
            (
                0..=1000u64,
                "[0-9]{1,20}",
                select(vec!["K", "M", "G", "T", "p"])
            )
                .prop_map(|(n, f, s)| format!("{n}.{f}{s}")),
            // Up to 15.99... EiB, just below 2^64.
            (0..=14u64, "[0-9]{1,20}").prop_map(|(n, f)| format!("{n}.{f}E")),
        ]
        .boxed()
    } else {
        prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            "0{0,3}[0-9]{1,19}"
        ]
        .boxed()
    }
}

fn name_and_valid_value() -> impl Strategy<Value = (String, String)> {
    names().prop_flat_map(|name| {
        let value = valid_value(&name);
        (Just(name), value)
    })
}

/// Attribute names: arbitrary bytes, and bytes behind our prefixes.
fn attr_name_bytes() -> impl Strategy<Value = Vec<u8>> {
    let tail = vec(any::<u8>(), 0..40);
    prop_oneof![
        vec(any::<u8>(), 0..40),
        tail.clone().prop_map(|t| [PREFIX.as_bytes(), &t].concat()),
        tail.clone()
            .prop_map(|t| [PREFIX.as_bytes(), b"group.", &t].concat()),
        (
            "[a-zA-Z0-9._-]{0,70}",
            names(),
            select(vec![".", "..", ".x."])
        )
            .prop_map(|(g, n, dot)| format!("{PREFIX}group.{g}{dot}{n}").into_bytes()),
        (
            "[a-zA-Z0-9._\\- ]{0,70}",
            select(vec!["stats", "effective", "bps"])
        )
            .prop_map(|(g, last)| format!("{PREFIX}group.{g}.{last}").into_bytes()),
        (names(), tail).prop_map(|(n, t)| [PREFIX.as_bytes(), n.as_bytes(), &t].concat()),
        names().prop_map(|n| format!("{PREFIX}{n}").into_bytes()),
    ]
}

/// Attribute values: arbitrary bytes (often not UTF-8) and messy text,
/// sometimes with the trailing newline or NUL that setfattr users leave.
fn attr_value_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..32),
        (messy_string(), select(vec!["", "\n", "\0", "\n\0", "\0\n"]))
            .prop_map(|(s, end)| format!("{s}{end}").into_bytes()),
        "[a-zA-Z0-9._-]{0,70}[\n\0]{0,2}".prop_map(String::into_bytes),
    ]
}

/// `--group` specs: mostly NAME:LIMIT=VALUE lists, sometimes junk.
fn group_spec() -> impl Strategy<Value = String> {
    let item = prop_oneof![
        3 => name_and_valid_value().prop_map(|(n, v)| format!("{n}={v}")),
        1 => (any_limit_name(), messy_string()).prop_map(|(n, v)| format!("{n}={v}")),
        1 => messy_string(),
    ];
    prop_oneof![
        4 => ("[a-zA-Z0-9._-]{0,66}", vec(item, 0..5))
            .prop_map(|(name, items)| format!("{name}:{}", items.join(","))),
        1 => messy_string(),
    ]
}

// ---------------------------------------------------------------------------
// 1. Parsers never panic on arbitrary input, and say something true.
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn parse_size_never_panics_and_accepts_only_digit_led_sizes(s in messy_string()) {
        if let Ok(n) = parse_size(&s) {
            // Whatever was accepted is a digit string with an optional
            // fraction and suffix, and its plain value parses back.
            prop_assert!(s.starts_with(|c: char| c.is_ascii_digit()), "{s:?} -> {n}");
            prop_assert_eq!(parse_size(&n.to_string()), Ok(n));
        }
    }

    #[test]
    fn parse_count_agrees_with_plain_decimal_parsing(s in messy_string()) {
        let plain_digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        match parse_count(&s) {
            Ok(n) => {
                prop_assert!(plain_digits, "{s:?} accepted as {n}");
                prop_assert_eq!(s.parse::<u64>(), Ok(n));
            }
            Err(msg) => {
                prop_assert!(!plain_digits || s.parse::<u64>().is_err(), "{s:?}: {msg}");
                prop_assert!(msg.contains("invalid count"), "{msg}");
            }
        }
    }

    #[test]
    fn parse_duration_never_panics(s in messy_string()) {
        if let Ok(d) = parse_duration(&s) {
            // The canonical text of an accepted duration parses to itself.
            let mut limits = Limits::default();
            limits.get_mut(BucketKind::BpsTotal).max_length = Some(d);
            let text = format_limit(&limits, "bps_max_length").unwrap();
            prop_assert_eq!(parse_duration(&text), Ok(d), "{:?} -> {:?}", s, text);
        }
    }

    #[test]
    fn apply_limit_never_panics_and_touches_only_the_named_field(
        name in any_limit_name(),
        value in messy_string(),
        start in any_limits(),
    ) {
        let mut limits = start;
        let known = limit_names().contains(&name);
        match apply_limit(&mut limits, &name, &value) {
            Ok(()) => {
                prop_assert!(known, "unknown name {name:?} accepted");
                // Everything but the named field is as before.
                let mut expected = start;
                let text = format_limit(&limits, &name).unwrap();
                apply_limit(&mut expected, &name, &text).unwrap();
                prop_assert_eq!(limits, expected);
            }
            Err(msg) => {
                prop_assert_eq!(limits, start, "failed apply changed limits: {}", msg);
                if known {
                    prop_assert!(msg.starts_with(&format!("{name}: ")), "{msg}");
                } else {
                    prop_assert_eq!(msg, format!("unknown limit {name}"));
                }
            }
        }
    }

    #[test]
    fn parse_group_never_panics_and_returns_only_valid_groups(spec in group_spec()) {
        if let Ok((name, limits)) = parse_group(&spec) {
            prop_assert!(valid_group_name(&name), "{name:?}");
            let prefix = format!("{name}:");
            prop_assert!(spec.starts_with(&prefix), "{spec:?}");
            prop_assert!(limits.validate().is_ok(), "{limits:?}");
        }
    }

    #[test]
    fn classify_never_panics_and_parses_names_exactly(name in attr_name_bytes()) {
        let attr = xattr::classify(&name);
        prop_assert_eq!(attr.is_none(), !name.starts_with(PREFIX.as_bytes()));
        let rebuilt = match &attr {
            None | Some(Attr::Unknown) => None,
            Some(Attr::Effective) => Some(format!("{PREFIX}effective")),
            Some(Attr::Stats) => Some(format!("{PREFIX}stats")),
            Some(Attr::Active) => Some(format!("{PREFIX}active")),
            Some(Attr::Group) => Some(format!("{PREFIX}group")),
            Some(Attr::ImageFormat) => Some(format!("{PREFIX}image_format")),
            Some(Attr::Qos(setting)) => {
                prop_assert!(throttlefs::qos::is_name(setting));
                Some(format!("{PREFIX}{setting}"))
            }
            Some(Attr::Limit(limit)) => {
                prop_assert!(limit_names().contains(limit));
                Some(format!("{PREFIX}{limit}"))
            }
            Some(Attr::GroupLimit { group, limit }) => {
                prop_assert!(valid_group_name(group));
                prop_assert!(limit_names().contains(limit));
                Some(format!("{PREFIX}group.{group}.{limit}"))
            }
            Some(Attr::GroupStats(group)) => {
                prop_assert!(valid_group_name(group));
                Some(format!("{PREFIX}group.{group}.stats"))
            }
        };
        if let Some(rebuilt) = rebuilt {
            prop_assert_eq!(rebuilt.as_bytes(), &name[..], "{:?}", attr);
        }
    }

    #[test]
    fn canonical_never_panics_and_is_idempotent(
        name in any_limit_name(),
        value in attr_value_bytes(),
    ) {
        if let Ok(text) = xattr::canonical(&name, &value) {
            prop_assert!(limit_names().contains(&name));
            prop_assert_eq!(xattr::canonical(&name, text.as_bytes()), Ok(text.clone()));
            prop_assert_eq!(
                xattr::canonical(&name, format!("{text}\n").as_bytes()),
                Ok(text)
            );
        }
    }

    #[test]
    fn group_name_never_panics_and_returns_valid_names(value in attr_value_bytes()) {
        if let Ok(name) = xattr::group_name(&value) {
            prop_assert!(valid_group_name(&name), "{name:?}");
            prop_assert!(value.starts_with(name.as_bytes()));
            prop_assert!(value[name.len()..].iter().all(|b| matches!(b, b'\n' | 0)));
        }
    }
}

// ---------------------------------------------------------------------------
// 2. Round trips.
// ---------------------------------------------------------------------------

/// Suffix spellings for 1024^k, k = 0..=6.
fn suffix_spellings(k: u32) -> Vec<String> {
    if k == 0 {
        return vec![String::new(), "B".into(), "b".into()];
    }
    let letter = ["K", "M", "G", "T", "P", "E"][k as usize - 1];
    let mut out = Vec::new();
    for tail in ["", "B", "iB"] {
        out.push(format!("{letter}{tail}"));
        out.push(format!("{letter}{tail}").to_lowercase());
    }
    out
}

fn size_with_suffix() -> impl Strategy<Value = (u64, u32, String)> {
    (0..=6u32).prop_flat_map(|k| {
        let n = prop_oneof![
            0..=1024u64,
            any::<u64>(),
            (0..=64u32).prop_map(|bits| 1u64.checked_shl(bits).unwrap_or(0).wrapping_sub(1)),
        ];
        (n, Just(k), select(suffix_spellings(k)))
    })
}

fn fractional_size() -> impl Strategy<Value = (u64, String, u32, String)> {
    (1..=6u32).prop_flat_map(|k| {
        let n = prop_oneof![0..=1024u64, 0..=(u64::MAX >> (10 * k)) + 1, any::<u64>()];
        (n, "[0-9]{1,25}", Just(k), select(suffix_spellings(k)))
    })
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn every_u64_round_trips_through_size_and_count(n in any::<u64>(), zeros in 0..3usize) {
        let text = format!("{}{n}", "0".repeat(zeros));
        prop_assert_eq!(parse_size(&text), Ok(n));
        prop_assert_eq!(parse_count(&text), Ok(n));
        prop_assert_eq!(parse_size(&n.to_string()), Ok(n));
        prop_assert_eq!(parse_count(&n.to_string()), Ok(n));
    }

    #[test]
    fn suffixed_sizes_multiply_exactly_or_fail_without_wrapping(
        (n, k, suffix) in size_with_suffix()
    ) {
        let text = format!("{n}{suffix}");
        let exact = u128::from(n) << (10 * k);
        match u64::try_from(exact) {
            Ok(expected) => prop_assert_eq!(parse_size(&text), Ok(expected), "{}", text),
            Err(_) => {
                let err = parse_size(&text).unwrap_err();
                prop_assert!(err.contains("too large"), "{text}: {err}");
            }
        }
    }

    #[test]
    fn fractional_sizes_round_down_exactly_or_fail_without_wrapping(
        (n, frac, k, suffix) in fractional_size()
    ) {
        let text = format!("{n}.{frac}{suffix}");
        let result = parse_size(&text);
        if frac.len() > 20 {
            prop_assert!(result.is_err(), "{text} -> {result:?}");
            return Ok(());
        }
        // floor((n + 0.frac) * 1024^k), in exact integers.
        let whole = u128::from(n) << (10 * k);
        let part = (frac.parse::<u128>().unwrap() << (10 * k)) / 10u128.pow(frac.len() as u32);
        match u64::try_from(whole + part) {
            Ok(expected) => prop_assert_eq!(result, Ok(expected), "{}", text),
            Err(_) => {
                let err = result.unwrap_err();
                prop_assert!(err.contains("too large"), "{text}: {err}");
            }
        }
    }

    #[test]
    fn plain_fractions_of_seconds_parse_exactly(secs in any::<u64>(), nanos in 0..1_000_000_000u32, extra in "[0-9]{0,5}") {
        let text = format!("{secs}.{nanos:09}{extra}");
        prop_assert_eq!(parse_duration(&text), Ok(Duration::new(secs, nanos)));
    }

    #[test]
    fn format_limit_after_apply_limit_parses_to_the_same_field(
        (name, value) in name_and_valid_value()
    ) {
        let mut limits = Limits::default();
        apply_limit(&mut limits, &name, &value)
            .map_err(|e| TestCaseError::fail(format!("valid value refused: {e}")))?;
        let text = format_limit(&limits, &name).unwrap();
        let mut again = Limits::default();
        apply_limit(&mut again, &name, &text).unwrap();
        prop_assert_eq!(again, limits, "{} -> {}", value, text);
        prop_assert_eq!(format_limit(&again, &name), Some(text));
    }

    #[test]
    fn canonical_of_a_valid_value_is_idempotent(
        (name, value) in name_and_valid_value(),
        end in select(vec!["", "\n", "\0", "\n\0"]),
    ) {
        let raw = format!("{value}{end}");
        let text = xattr::canonical(&name, raw.as_bytes())
            .map_err(|e| TestCaseError::fail(format!("valid value refused: {e}")))?;
        prop_assert_eq!(xattr::canonical(&name, text.as_bytes()), Ok(text.clone()));
        // And it means the same as what was written.
        let (mut a, mut b) = (Limits::default(), Limits::default());
        apply_limit(&mut a, &name, &value).unwrap();
        apply_limit(&mut b, &name, &text).unwrap();
        prop_assert_eq!(a, b);
    }
}

// ---------------------------------------------------------------------------
// 3. argv parsing.
// ---------------------------------------------------------------------------

fn flag_token() -> impl Strategy<Value = String> {
    select(vec![
        "--bps",
        "--bps-rd",
        "--bps-wr",
        "--iops",
        "--iops-rd",
        "--iops-wr",
        "--io-threads",
        "--group",
        "-o",
        "-o",
        "-o",
        "-v",
        "-vv",
        "--",
        "--help",
        "-h",
        "--version",
        "-V",
        "--bps=1M",
        "-obps=1M",
        "--unknown",
        "-x",
    ])
    .prop_map(String::from)
}

fn value_token() -> impl Strategy<Value = String> {
    let option_item = prop_oneof![
        name_and_valid_value().prop_map(|(n, v)| format!("{n}={v}")),
        select(vec![
            "allow_other",
            "ro",
            "noatime",
            "fsname=x",
            "subtype=",
            "io_threads=4",
            "io_threads=0",
            "bps",
            "nonempty",
        ])
        .prop_map(String::from),
        messy_string(),
    ];
    prop_oneof![
        2 => select(vec![
            "1M", "0", "1", "-1", "10", "1.5G", "18446744073709551615", "1M\n", "a\nb",
        ])
        .prop_map(String::from),
        2 => vec(option_item, 1..4).prop_map(|items| items.join(",")),
        2 => group_spec(),
        2 => messy_string(),
    ]
}

fn not_an_existing_path(s: &OsString) -> bool {
    !Path::new(s).exists()
}

fn arg_token() -> impl Strategy<Value = OsString> {
    prop_oneof![
        4 => flag_token().prop_map(OsString::from),
        4 => value_token().prop_map(OsString::from),
        1 => any::<String>().prop_map(OsString::from),
        1 => vec(any::<u8>(), 0..16).prop_map(OsString::from_vec),
    ]
    .prop_filter("existing paths could be mounted on", not_an_existing_path)
}

fn argv() -> impl Strategy<Value = Vec<OsString>> {
    (vec(arg_token(), 0..8), any::<bool>()).prop_map(|(tokens, with_paths)| {
        let mut argv = vec![OsString::from("throttlefs")];
        argv.extend(tokens);
        if with_paths {
            argv.push(MISSING_SOURCE.into());
            argv.push(MISSING_MOUNTPOINT.into());
        }
        argv
    })
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn parse_args_never_panics_and_errors_are_one_line(argv in argv()) {
        let result = parse_args(argv.clone());
        let Err((msg, code)) = result else {
            return Err(TestCaseError::fail(format!("{argv:?} parsed although paths do not exist")));
        };
        prop_assert!(code == 2 || code == 0, "{argv:?}: code {code}: {msg}");
        prop_assert!(!msg.is_empty(), "{argv:?}");
        if code == 2 {
            prop_assert!(!msg.contains('\n'), "{argv:?}: not one line: {msg:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// Limit generators.
// ---------------------------------------------------------------------------

fn interesting_u64() -> BoxedStrategy<u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX - 1),
        Just(MAX_LIMIT_VALUE),
        Just(MAX_LIMIT_VALUE + 1),
        1..=1000u64,
        any::<u64>(),
    ]
    .boxed()
}

fn any_duration() -> BoxedStrategy<Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(ONE_NS),
        Just(Duration::MAX),
        Just(Duration::from_secs(u64::MAX)),
        (0..=10_000_000_000u64).prop_map(Duration::from_nanos),
        any::<u64>().prop_map(Duration::from_nanos),
        (any::<u64>(), 0..1_000_000_000u32).prop_map(|(s, n)| Duration::new(s, n)),
    ]
    .boxed()
}

/// Any spec the types allow, valid or not.
fn any_spec() -> BoxedStrategy<LimitSpec> {
    (
        interesting_u64(),
        interesting_u64(),
        prop_oneof![Just(None), any_duration().prop_map(Some)],
    )
        .prop_map(|(avg, max, max_length)| LimitSpec {
            avg,
            max,
            max_length,
        })
        .boxed()
}

fn any_limits() -> BoxedStrategy<Limits> {
    (proptest::array::uniform6(any_spec()), interesting_u64())
        .prop_map(|(buckets, iops_size)| Limits {
            buckets,
            iops_size,
            ..Limits::default()
        })
        .boxed()
}

/// Arbitrary limits with max 0 or >= avg (the brief's "arbitrary limits"
/// for the throttle maths; not necessarily validated).
fn wild_spec() -> BoxedStrategy<LimitSpec> {
    (
        interesting_u64(),
        prop_oneof![Just(None), any_duration().prop_map(Some)],
    )
        .prop_flat_map(|(avg, max_length)| {
            let max = prop_oneof![Just(0u64), Just(avg), avg..=u64::MAX, Just(u64::MAX)];
            (Just(avg), max, Just(max_length))
        })
        .prop_map(|(avg, max, max_length)| LimitSpec {
            avg,
            max,
            max_length,
        })
        .boxed()
}

fn wild_limits() -> BoxedStrategy<Limits> {
    (proptest::array::uniform6(wild_spec()), interesting_u64())
        .prop_map(|(buckets, iops_size)| Limits {
            buckets,
            iops_size,
            ..Limits::default()
        })
        .boxed()
}

/// A spec within the validated value range, any burst length a user could
/// type that validate can judge (up to ~136 years).
fn in_range_spec() -> BoxedStrategy<LimitSpec> {
    let value = prop_oneof![
        Just(0u64),
        Just(1),
        Just(MAX_LIMIT_VALUE),
        1..=1000u64,
        0..=MAX_LIMIT_VALUE
    ];
    let length = prop_oneof![
        Just(None),
        Just(Some(Duration::ZERO)),
        Just(Some(ONE_NS)),
        (0..=u64::from(u32::MAX), 0..1_000_000_000u32).prop_map(|(s, n)| Some(Duration::new(s, n))),
        (1..=10_000_000_000u64).prop_map(|n| Some(Duration::from_nanos(n))),
    ];
    (value.clone(), value, length)
        .prop_map(|(avg, max, max_length)| LimitSpec {
            avg,
            max,
            max_length,
        })
        .boxed()
}

/// Limits that pass validate, built family by family (bps, iops) as
/// either nothing, a total, or a read/write split.
fn validated_limits(spec: fn() -> BoxedStrategy<LimitSpec>) -> impl Strategy<Value = Limits> {
    let family = move || {
        prop_oneof![
            Just([LimitSpec::default(); 3]).boxed(),
            spec()
                .prop_map(|t| [t, LimitSpec::default(), LimitSpec::default()])
                .boxed(),
            (spec(), spec())
                .prop_map(|(r, w)| [LimitSpec::default(), r, w])
                .boxed(),
        ]
    };
    let iops_size = prop_oneof![Just(0u64), 1..=MIB, 0..=MAX_LIMIT_VALUE];
    (family(), family(), iops_size)
        .prop_map(|(bps, iops, iops_size)| Limits {
            buckets: [bps[0], bps[1], bps[2], iops[0], iops[1], iops[2]],
            iops_size,
            ..Limits::default()
        })
        .prop_filter("validate must accept", |l| l.validate().is_ok())
}

/// A valid spec in the full value range (0 = unset, or avg with a burst).
fn full_range_valid_spec() -> BoxedStrategy<LimitSpec> {
    let avg = prop_oneof![
        Just(0u64),
        Just(1),
        Just(MAX_LIMIT_VALUE),
        1..=MAX_LIMIT_VALUE
    ];
    avg.prop_flat_map(|avg| {
        let burst = if avg == 0 {
            Just(None).boxed()
        } else {
            prop_oneof![
                Just(None),
                (avg..=MAX_LIMIT_VALUE).prop_map(|max| Some((max, None))),
                (avg..=MAX_LIMIT_VALUE, 1..=1_000_000_000_000u64)
                    .prop_map(|(max, ns)| Some((max, Some(Duration::from_nanos(ns))))),
            ]
            .boxed()
        };
        (Just(avg), burst)
    })
    .prop_map(|(avg, burst)| {
        let (max, max_length) = burst.unwrap_or((0, None));
        LimitSpec {
            avg,
            max,
            max_length,
        }
    })
    .boxed()
}

/// A valid spec at rates a test can simulate: avg 1..=1e9 (biased small),
/// no burst or max in avg..=10*avg with a length of 1 ms..=10 s.
fn sane_spec() -> BoxedStrategy<LimitSpec> {
    let avg = prop_oneof![1..=10u64, 1..=100_000u64, 1..=1_000_000_000u64];
    avg.prop_flat_map(|avg| {
        let max = prop_oneof![Just(0u64), Just(avg), avg..=avg * 10];
        let length = prop_oneof![
            Just(None),
            (1_000_000..=10_000_000_000u64).prop_map(|n| Some(Duration::from_nanos(n))),
        ];
        (Just(avg), max, length)
    })
    .prop_map(|(avg, max, max_length)| LimitSpec {
        avg,
        max,
        max_length: if max == 0 { None } else { max_length },
    })
    .boxed()
}

// ---------------------------------------------------------------------------
// 4. Throttle maths never panic.
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Step {
    Forward(Duration),
    Back(Duration),
    ToMax,
    ToZero,
}

#[derive(Clone, Debug)]
enum Op {
    Wait(Direction),
    Account(Direction, u64),
    Refund(Direction, u64),
    Leak,
    SetLimits(Box<Limits>),
}

fn step() -> BoxedStrategy<Step> {
    prop_oneof![
        4 => any_duration().prop_map(Step::Forward),
        1 => any_duration().prop_map(Step::Back),
        1 => Just(Step::ToMax),
        1 => Just(Step::ToZero),
    ]
    .boxed()
}

fn any_bytes() -> BoxedStrategy<u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        any::<u64>(),
        0..=16 * MIB
    ]
    .boxed()
}

fn op(limits: BoxedStrategy<Limits>) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => dirs().prop_map(Op::Wait),
        4 => (dirs(), any_bytes()).prop_map(|(d, b)| Op::Account(d, b)),
        1 => (dirs(), any_bytes()).prop_map(|(d, b)| Op::Refund(d, b)),
        1 => Just(Op::Leak),
        1 => limits.prop_map(|l| Op::SetLimits(Box::new(l))),
    ]
}

/// Run `ops` against a fresh state; every wait must be zero where nothing
/// limits the direction, and `limits()` must report what was set.
fn run_ops(limits: Limits, start: Duration, ops: &[(Step, Op)]) -> Result<(), TestCaseError> {
    let mut state = ThrottleState::new(limits, start);
    let mut now = start;
    let mut current = limits;
    for (step, op) in ops {
        now = match step {
            Step::Forward(d) => later(now, *d),
            Step::Back(d) => now.saturating_sub(*d),
            Step::ToMax => Duration::MAX,
            Step::ToZero => Duration::ZERO,
        };
        match op {
            Op::Wait(dir) => {
                let w = state.wait(*dir, now);
                let metered = BucketKind::ALL
                    .iter()
                    .any(|k| k.applies_to(*dir) && current.get(*k).avg != 0);
                if !metered {
                    prop_assert_eq!(w, Duration::ZERO);
                }
            }
            Op::Account(dir, bytes) => state.account(*dir, *bytes, now),
            Op::Refund(dir, bytes) => state.refund(*dir, *bytes, now),
            Op::Leak => state.leak(now),
            Op::SetLimits(l) => {
                state.set_limits(**l, now);
                current = **l;
            }
        }
        prop_assert_eq!(state.limits(), &current);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(1000))]

    /// The brief's property 4: arbitrary (not necessarily validated)
    /// limits, arbitrary sizes, time jumping to Duration::MAX and back.
    #[test]
    fn throttle_never_panics_with_arbitrary_limits(
        limits in wild_limits(),
        start in any_duration(),
        ops in vec((step(), op(wild_limits().boxed())), 0..40),
    ) {
        run_ops(limits, start, &ops)?;
    }

    /// The same with limits that validate accepts over the whole value
    /// range (u64::MAX bytes, Duration::MAX time, 1 B/s, 10^15 bursts).
    #[test]
    fn throttle_never_panics_with_validated_limits(
        limits in validated_limits(full_range_valid_spec),
        start in any_duration(),
        ops in vec((step(), op(validated_limits(full_range_valid_spec).boxed())), 0..40),
    ) {
        run_ops(limits, start, &ops)?;
    }
}

// ---------------------------------------------------------------------------
// 5. Throttle correctness.
// ---------------------------------------------------------------------------

/// One request of the simulated client: direction, size, idle time before
/// it arrives, bytes refunded after it (a short read), and sometimes new
/// limits applied when it arrives.
#[derive(Clone, Debug)]
struct Request {
    dir: Direction,
    bytes: u64,
    idle: Duration,
    refund: u64,
    new_limits: Option<Limits>,
}

fn request_size() -> impl Strategy<Value = u64> {
    prop_oneof![1..=16u64, 1..=4096u64, 1..=16 * MIB]
}

fn request(limits: BoxedStrategy<Limits>) -> impl Strategy<Value = Request> {
    (
        dirs(),
        request_size(),
        prop_oneof![
            Just(Duration::ZERO),
            (0..=3_000_000_000u64).prop_map(Duration::from_nanos),
        ],
        prop_oneof![3 => Just(0u64), 1 => request_size()],
        prop_oneof![10 => Just(None), 1 => limits.prop_map(Some)],
    )
        .prop_map(|(dir, bytes, idle, refund, new_limits)| Request {
            dir,
            bytes,
            idle,
            refund: refund.min(bytes),
            new_limits,
        })
}

/// Deadlines are exact: after `w = wait(t)`, `wait(t + w)` is zero (no
/// second wait), and `wait(t + w - 1ns)` is not (never early).
fn check_deadline(
    state: &ThrottleState,
    dir: Direction,
    t: Duration,
) -> Result<Duration, TestCaseError> {
    let w = state.clone().wait(dir, t);
    let deadline = t + w;
    if !w.is_zero() {
        let early = state.clone().wait(dir, deadline - ONE_NS);
        prop_assert!(
            !early.is_zero(),
            "released early: wait({:?}) = {:?} but wait 1ns before the deadline is zero",
            t,
            w
        );
    }
    let again = state.clone().wait(dir, deadline);
    prop_assert!(
        again.is_zero(),
        "deadline needs a second wait: wait({:?}) = {:?}, then wait(deadline) = {:?} (limits {:?})",
        t,
        w,
        again,
        state.limits()
    );
    Ok(deadline)
}

/// Charge of one request to a bucket of `kind`, in nano-units: bytes, or
/// operations (size/iops_size when larger, never rounded down).
fn nano_charge(kind: BucketKind, iops_size: u64, bytes: u64) -> u128 {
    if kind.counts_bytes() {
        u128::from(bytes) * NANOS_PER_SEC
    } else if iops_size != 0 && bytes > iops_size {
        (u128::from(bytes) * NANOS_PER_SEC).div_ceil(u128::from(iops_size))
    } else {
        NANOS_PER_SEC
    }
}

fn single_limit() -> impl Strategy<Value = (BucketKind, LimitSpec, u64)> {
    (
        kinds(),
        sane_spec(),
        prop_oneof![Just(0u64), 512..=MIB, 1..=16 * MIB],
    )
}

/// Reference model of one bucket, written from QEMU's description: the
/// main level leaks at avg and may hold avg*0.1s (no burst) or
/// max*max_length (burst); with a burst a second level leaks at max and
/// may hold max*0.1s. Levels in nano-units, leaking avg (or max) per ns.
#[derive(Clone, Debug)]
struct ModelBucket {
    avg: u128,
    max: u128,
    capacity: u128,
    burst_capacity: u128,
    main: u128,
    burst: u128,
    last: Duration,
}

impl ModelBucket {
    fn new(spec: &LimitSpec) -> ModelBucket {
        let avg = u128::from(spec.avg);
        let max = u128::from(spec.max);
        ModelBucket {
            avg,
            max,
            capacity: if max == 0 {
                avg * BUCKET_WITHOUT_BURST.as_nanos()
            } else {
                max * spec.max_length.unwrap_or(DEFAULT_BURST_LENGTH).as_nanos()
            },
            burst_capacity: max * BURST_RATE_BUCKET.as_nanos(),
            main: 0,
            burst: 0,
            last: Duration::ZERO,
        }
    }

    /// The bucket as it is at `t` (not before the last change).
    fn at(&self, t: Duration) -> ModelBucket {
        let dt = (t - self.last).as_nanos();
        ModelBucket {
            main: self.main.saturating_sub(self.avg * dt),
            burst: self.burst.saturating_sub(self.max * dt),
            last: t,
            ..self.clone()
        }
    }

    fn has_room(&self) -> bool {
        self.main <= self.capacity && (self.max == 0 || self.burst <= self.burst_capacity)
    }

    fn add(&mut self, charge: u128) {
        self.main += charge;
        if self.max != 0 {
            self.burst += charge;
        }
    }
}

/// Dispatches per greedy-client case: enough to fill and drain buckets.
const GREEDY_DISPATCHES: usize = 400;

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn wait_deadlines_are_exact_never_early_and_final(
        limits in validated_limits(sane_spec),
        requests in vec(request(validated_limits(sane_spec).boxed()), 1..40),
    ) {
        let mut state = ThrottleState::new(limits, Duration::ZERO);
        let mut t = Duration::ZERO;
        for req in &requests {
            t += req.idle;
            if let Some(l) = req.new_limits {
                state.set_limits(l, t);
            }
            let deadline = check_deadline(&state, req.dir, t)?;
            t = deadline;
            // Dispatch at the deadline (as a scheduler would, re-checking).
            let mut rounds = 0;
            loop {
                let w = state.wait(req.dir, t);
                if w.is_zero() {
                    break;
                }
                rounds += 1;
                prop_assert!(rounds < 8, "no release after 8 deadlines");
                t += w;
            }
            state.account(req.dir, req.bytes, t);
            check_deadline(&state, req.dir, t)?;
            if req.refund != 0 {
                state.refund(req.dir, req.refund, t);
            }
        }
    }

    /// A greedy client dispatches whenever wait() is zero, jumping its
    /// clock to each deadline. At every dispatch time t the units metered
    /// by the one limit set must satisfy
    ///   units <= avg*t + capacity + largest request
    /// with capacity avg*0.1s (no burst) or max*max_length (burst), and
    /// with a burst also units <= max*t + max*0.1s + largest request.
    /// Directions the limit does not meter must never wait.
    #[test]
    fn greedy_client_never_exceeds_the_limit(
        (kind, spec, iops_size) in single_limit(),
        requests in vec((dirs(), request_size()), 1..20),
    ) {
        let mut limits = Limits { iops_size, ..Limits::default() };
        *limits.get_mut(kind) = spec;
        prop_assert!(limits.validate().is_ok());
        let avg = u128::from(spec.avg);
        let max = u128::from(spec.max);
        let capacity = if spec.max == 0 {
            avg * BUCKET_WITHOUT_BURST.as_nanos()
        } else {
            max * spec.max_length.unwrap_or(DEFAULT_BURST_LENGTH).as_nanos()
        };
        let mut state = ThrottleState::new(limits, Duration::ZERO);
        let mut t = Duration::ZERO;
        let mut units: u128 = 0;
        let mut largest: u128 = 0;
        for &(dir, bytes) in requests.iter().cycle().take(GREEDY_DISPATCHES) {
            let mut rounds = 0;
            loop {
                let w = state.wait(dir, t);
                if w.is_zero() {
                    break;
                }
                prop_assert!(kind.applies_to(dir), "{dir:?} waits {w:?} though {kind:?} does not meter it");
                rounds += 1;
                prop_assert!(rounds < 8, "no release after 8 deadlines");
                t += w;
            }
            state.account(dir, bytes, t);
            if !kind.applies_to(dir) {
                continue;
            }
            let charge = nano_charge(kind, iops_size, bytes);
            units += charge;
            largest = largest.max(charge);
            let t_ns = t.as_nanos();
            prop_assert!(
                units <= avg * t_ns + capacity + largest,
                "{kind:?} {spec:?} iops_size {iops_size}: {units} nano-units dispatched by {t:?}, bound {}",
                avg * t_ns + capacity + largest
            );
            if spec.max != 0 {
                let burst_bound = max * t_ns + max * BURST_RATE_BUCKET.as_nanos() + largest;
                prop_assert!(
                    units <= burst_bound,
                    "{kind:?} {spec:?}: burst rate exceeded: {units} nano-units by {t:?}, bound {burst_bound}"
                );
            }
        }
    }

    /// Release times are exact against a reference model of the one
    /// bucket set: at each release every level is within its capacity
    /// (never early), and one nanosecond before a delayed release some
    /// level is not (never late).
    #[test]
    fn release_times_match_a_reference_bucket_model(
        (kind, spec, iops_size) in single_limit(),
        requests in vec(
            (
                dirs(),
                request_size(),
                prop_oneof![
                    3 => Just(Duration::ZERO),
                    1 => (0..=2_000_000_000u64).prop_map(Duration::from_nanos),
                ],
            ),
            1..20,
        ),
    ) {
        let mut limits = Limits { iops_size, ..Limits::default() };
        *limits.get_mut(kind) = spec;
        let mut state = ThrottleState::new(limits, Duration::ZERO);
        let mut model = ModelBucket::new(&spec);
        let mut t = Duration::ZERO;
        for &(dir, bytes, idle) in requests.iter().cycle().take(GREEDY_DISPATCHES / 2) {
            t += idle;
            let arrival = t;
            let mut rounds = 0;
            loop {
                let w = state.wait(dir, t);
                if w.is_zero() {
                    break;
                }
                rounds += 1;
                prop_assert!(rounds < 8, "no release after 8 deadlines");
                t += w;
            }
            state.account(dir, bytes, t);
            if !kind.applies_to(dir) {
                prop_assert_eq!(t, arrival);
                continue;
            }
            prop_assert!(
                model.at(t).has_room(),
                "{:?} {:?}: released early at {:?}: {:?}",
                kind,
                spec,
                t,
                model.at(t)
            );
            if t > arrival {
                prop_assert!(
                    !model.at(t - ONE_NS).has_room(),
                    "{:?} {:?}: released late at {:?}: room already 1ns before",
                    kind,
                    spec,
                    t
                );
            }
            model = model.at(t);
            model.add(nano_charge(kind, iops_size, bytes));
        }
    }

    /// Refunds never lengthen a wait, and iops buckets ignore them.
    #[test]
    fn refund_never_lengthens_a_wait(
        limits in validated_limits(sane_spec),
        history in vec((dirs(), request_size()), 1..10),
        (dir, refund) in (dirs(), any_bytes()),
        probe in (0..=2_000_000_000u64).prop_map(Duration::from_nanos),
    ) {
        let mut state = ThrottleState::new(limits, Duration::ZERO);
        for &(d, bytes) in &history {
            state.account(d, bytes, Duration::ZERO);
        }
        let before = state.clone().wait(dir, probe);
        let mut refunded = state.clone();
        refunded.refund(dir, refund, Duration::ZERO);
        let after = refunded.clone().wait(dir, probe);
        prop_assert!(after <= before, "refund made {dir:?} wait {after:?} instead of {before:?}");
        // With only iops limits, a refund changes nothing.
        let mut iops_only = limits;
        for kind in [BucketKind::BpsTotal, BucketKind::BpsRead, BucketKind::BpsWrite] {
            *iops_only.get_mut(kind) = LimitSpec::default();
        }
        let mut a = ThrottleState::new(iops_only, Duration::ZERO);
        for &(d, bytes) in &history {
            a.account(d, bytes, Duration::ZERO);
        }
        let mut b = a.clone();
        b.refund(dir, refund, Duration::ZERO);
        prop_assert_eq!(a.wait(dir, probe), b.wait(dir, probe));
    }
}

// ---------------------------------------------------------------------------
// 6. Validation.
// ---------------------------------------------------------------------------

/// One arbitrary spec in one bucket (so the total/split rule does not
/// end validation early) and an arbitrary iops_size.
fn sparse_limits() -> BoxedStrategy<Limits> {
    (kinds(), any_spec(), interesting_u64())
        .prop_map(|(kind, spec, iops_size)| {
            let mut limits = Limits {
                iops_size,
                ..Limits::default()
            };
            *limits.get_mut(kind) = spec;
            limits
        })
        .boxed()
}

/// Whether `msg` names one of the limits (as a whole word).
fn names_a_limit(msg: &str) -> bool {
    let names = limit_names();
    msg.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|word| names.iter().any(|n| n == word))
}

/// Parse back what `set_limits` lists.
fn limits_from_pairs(pairs: &[(String, String)]) -> Result<Limits, String> {
    let mut limits = Limits::default();
    for (name, value) in pairs {
        apply_limit(&mut limits, name, value)?;
    }
    Ok(limits)
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn validate_never_panics_and_errors_name_a_limit(
        limits in prop_oneof![any_limits(), sparse_limits()]
    ) {
        if let Err(e) = limits.validate() {
            prop_assert!(names_a_limit(&e.0), "message names no limit: {:?}", e.0);
            prop_assert!(!e.0.contains('\n'), "{:?}", e.0);
        }
    }

    #[test]
    fn validate_never_panics_on_in_range_values(
        buckets in proptest::array::uniform6(in_range_spec()),
        iops_size in interesting_u64(),
    ) {
        let limits = Limits {
            buckets,
            iops_size,
            ..Limits::default()
        };
        if let Err(e) = limits.validate() {
            prop_assert!(names_a_limit(&e.0), "message names no limit: {:?}", e.0);
        }
    }

    #[test]
    fn valid_limits_round_trip_through_their_attribute_text(
        limits in prop_oneof![
            validated_limits(full_range_valid_spec).boxed(),
            (proptest::array::uniform6(in_range_spec()), interesting_u64())
                .prop_map(|(buckets, iops_size)| Limits {
            buckets,
            iops_size,
            ..Limits::default()
        })
                .boxed(),
        ]
    ) {
        if limits.validate().is_err() {
            return Ok(());
        }
        let pairs = xattr::set_limits(&limits);
        prop_assert_eq!(limits_from_pairs(&pairs), Ok(limits));
        // The same values stored as a file's own attributes.
        let own = OwnSet { values: pairs.iter().cloned().collect() };
        prop_assert_eq!(own.limits(), Ok(limits));
        // And the lines of user.throttle.effective.
        let text = xattr::render_effective(
            &Effective {
                limits,
                origin: Origin::Mount,
                group: None,
                qos: Default::default(),
                sizing: None,
                image_format: (Default::default(), Origin::Mount),
            },
            0,
        );
        let mut lines = text.lines();
        prop_assert_eq!(lines.next(), Some("source=mount"));
        let parsed: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once('=').unwrap();
                (n.to_string(), v.to_string())
            })
            .collect();
        prop_assert_eq!(&parsed, &pairs);
        // Every canonical value is a fixed point of canonical().
        for (name, value) in &pairs {
            prop_assert_eq!(xattr::canonical(name, value.as_bytes()), Ok(value.clone()));
        }
    }
}

// ---------------------------------------------------------------------------
// Plain regression tests for counterexamples the properties found.
// ---------------------------------------------------------------------------

/// `max * max_length` in validate is a u128 product that overflows for
/// burst lengths of millions of years (reachable from `-o`): a panic with
/// overflow checks, a silent wrap in release. Here max = 2^49 (512T, within
/// MAX_LIMIT_VALUE) and max_length = 2^79 ns, so the product is exactly
/// 2^128: it wraps to 0, passes the bound, and wait() then computes the
/// same wrapped burst capacity of 0.
#[test]
fn regression_validate_burst_product_overflow() {
    let mut limits = Limits::default();
    apply_limit(&mut limits, "bps", "1").unwrap();
    apply_limit(&mut limits, "bps_max", "512T").unwrap();
    apply_limit(&mut limits, "bps_max_length", "604462909807314.587353088").unwrap();
    assert_eq!(
        limits.get(BucketKind::BpsTotal).max_length,
        Some(Duration::from_nanos(1 << 62) * (1 << 17))
    );
    let err = limits.validate().unwrap_err();
    assert!(err.0.contains("bps_max_length"), "{err}");
}

/// With a burst, wait() returns the main bucket's wait *or* the burst
/// bucket's, not the longer of both: at the main deadline the burst bucket
/// can still be over its capacity, so the request must wait again.
#[test]
fn regression_burst_deadline_needs_no_second_wait() {
    let mut limits = Limits::default();
    *limits.get_mut(BucketKind::BpsRead) = LimitSpec {
        avg: 1,
        max: 1,
        max_length: None,
    };
    limits.validate().unwrap();
    let mut state = ThrottleState::new(limits, Duration::ZERO);
    state.account(Direction::Read, 2, Duration::ZERO);
    let w = state.clone().wait(Direction::Read, Duration::ZERO);
    assert_eq!(
        state.wait(Direction::Read, w),
        Duration::ZERO,
        "first wait {w:?}"
    );
}
/// The same overflow through the command line: parse_args must refuse
/// the burst, not panic (or, in release, accept a wrapped capacity of 0).
#[test]
fn regression_parse_args_burst_product_overflow() {
    let result = std::panic::catch_unwind(|| {
        parse_args([
            "throttlefs",
            "-o",
            "bps=1,bps_max=512T,bps_max_length=604462909807314.587353088",
            MISSING_SOURCE,
            MISSING_MOUNTPOINT,
        ])
        .map(|_| ())
    });
    let (msg, code) = result.expect("parse_args panicked").unwrap_err();
    assert_eq!(code, 2);
    assert!(msg.contains("bps_max_length"), "{msg}");
}

/// ThrottleState with limits validate must refuse (max = u64::MAX, a burst
/// length of u64::MAX seconds) overflows in wait() computing the burst
/// capacity max * max_length.
#[test]
fn regression_wait_with_unvalidated_huge_burst() {
    let mut limits = Limits::default();
    *limits.get_mut(BucketKind::BpsTotal) = LimitSpec {
        avg: 1,
        max: u64::MAX,
        max_length: Some(Duration::from_secs(u64::MAX)),
    };
    let mut state = ThrottleState::new(limits, Duration::ZERO);
    assert_eq!(state.wait(Direction::Read, Duration::ZERO), Duration::ZERO);
}

/// parse_args promises one-line errors, but values (and paths) are echoed
/// verbatim, so a value with a newline (as `echo` output in `$(...)` can
/// carry, or "1M\n" copied from an xattr) gives a two-line message.
#[test]
fn regression_usage_errors_stay_one_line() {
    for argv in [
        [
            "throttlefs",
            "--bps",
            "1M\n",
            MISSING_SOURCE,
            MISSING_MOUNTPOINT,
        ],
        [
            "throttlefs",
            "-o",
            "x\ny",
            MISSING_SOURCE,
            MISSING_MOUNTPOINT,
        ],
        ["throttlefs", "-v", "-v", "src\n", MISSING_MOUNTPOINT],
    ] {
        let (msg, code) = parse_args(argv).unwrap_err();
        assert_eq!(code, 2);
        assert!(!msg.contains('\n'), "{argv:?}: {msg:?}");
    }
}

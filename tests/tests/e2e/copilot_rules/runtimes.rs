//! The Lambda runtimes of the functions Copilot generates, against Lambda's own dates.
//!
//! Lambda retires a runtime in three steps (the Lambda Developer Guide, "Lambda
//! runtimes", its table of deprecated runtimes): on the deprecation date it stops
//! patching the runtime; from a later date it refuses to create functions on it (a
//! stack that creates one fails); from a later one still, to update them (a stack
//! that changes one fails). The dates are data here, a row per runtime; where Lambda
//! has not announced a date yet it is `None`, and the deprecation date is the bound
//! known today. A function is a problem from its runtime's deprecation on, and the
//! message says which of the three steps have come and when the next ones come.

use super::*;

/// A civil date: year, month, day.
pub(super) type Date = (i32, u32, u32);

/// One of Lambda's Node.js runtimes and the dates of its retirement.
#[derive(Debug, Clone, Copy)]
pub(super) struct Runtime {
    pub(super) id: &'static str,
    /// No more security patches from this day.
    pub(super) deprecated: Date,
    /// No new function on it from this day; `None`: not announced.
    pub(super) create_blocked: Option<Date>,
    /// No update of a function on it from this day; `None`: not announced.
    pub(super) update_blocked: Option<Date>,
}

/// Lambda's table for the runtimes Copilot's functions run on or may be patched to.
/// When Lambda announces a date, it goes here; the rule below stays.
pub(super) const NODE_RUNTIMES: [Runtime; 3] = [
    Runtime {
        id: "nodejs20.x",
        deprecated: (2026, 4, 30),
        create_blocked: Some((2027, 2, 1)),
        update_blocked: Some((2027, 3, 3)),
    },
    Runtime {
        id: "nodejs22.x",
        deprecated: (2027, 4, 30),
        create_blocked: Some((2027, 6, 1)),
        update_blocked: None,
    },
    Runtime {
        id: "nodejs24.x",
        deprecated: (2028, 4, 30),
        create_blocked: None,
        update_blocked: None,
    },
];

/// Days since 1970-01-01 of a civil date: Howard Hinnant's `days_from_civil`.
pub(super) fn day_number((year, month, day): Date) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date (UTC) of a time: Howard Hinnant's `civil_from_days`.
pub(super) fn civil(time: SystemTime) -> Date {
    let days = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs() / 86_400).unwrap_or(0));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        i32::try_from(year).unwrap_or(i32::MAX),
        u32::try_from(month).unwrap_or(1),
        u32::try_from(day).unwrap_or(1),
    )
}

fn show((y, m, d): Date) -> String {
    format!("{y:04}-{m:02}-{d:02}")
}

/// "in N days (date)", "today (date)" or "N days ago (date)".
fn when(date: Date, today: Date) -> String {
    let days = day_number(date) - day_number(today);
    match days {
        0 => format!("today ({})", show(date)),
        d if d > 0 => format!("in {d} days ({})", show(date)),
        d => format!("{} days ago ({})", -d, show(date)),
    }
}

pub(super) fn runtime(id: &str) -> Result<Runtime, String> {
    NODE_RUNTIMES
        .iter()
        .find(|r| r.id == id)
        .copied()
        .ok_or_else(|| format!("{id} is not a Node.js runtime these checks know"))
}

/// What the three steps of `runtime`'s retirement are, seen from `today`: one line.
pub(super) fn schedule(r: &Runtime, today: Date) -> String {
    let step = |date: Option<Date>| match date {
        Some(d) => when(d, today),
        None => format!("not announced (after {})", show(r.deprecated)),
    };
    format!(
        "{}: deprecated {}; creation blocked {}; updates blocked {}",
        r.id,
        when(r.deprecated, today),
        step(r.create_blocked),
        step(r.update_blocked)
    )
}

/// Whether `runtime` is deprecated on `today`; an unknown runtime is an error.
pub(super) fn deprecated(id: &str, today: Date) -> Result<bool, String> {
    runtime(id).map(|r| day_number(r.deprecated) <= day_number(today))
}

/// The runtime each function ends on: its template's, or the value of the one
/// `op: replace` on its `Runtime` (patch.go).
fn patched_runtime(f: &Function, patches: &[Patch]) -> Result<String, String> {
    let path = format!("/Resources/{}/Properties/Runtime", f.id);
    let set: Vec<&Patch> = patches.iter().filter(|p| p.path == path).collect();
    match set.as_slice() {
        [] => Ok(f.runtime.to_owned()),
        [one] if one.op == "replace" => Ok(one.value.as_ref().and_then(text).unwrap_or_default()),
        more => Err(format!(
            "{}: expected one `op: replace` on {path}, found {:?}",
            f.id,
            more.iter().map(|p| p.op.as_str()).collect::<Vec<_>>()
        )),
    }
}

/// For one stack: each function must end on a runtime Lambda has not deprecated on
/// `today`; the message says what each step of the retirement means for it.
pub(super) fn runtime_problems(
    functions: &[Function],
    patches: &[Patch],
    today: Date,
) -> Vec<String> {
    let mut problems = Vec::new();
    for f in functions {
        let id = match patched_runtime(f, patches) {
            Ok(id) => id,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        let r = match runtime(&id) {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!("{}: {e}", f.id));
                continue;
            }
        };
        let past = |d: Option<Date>| d.is_some_and(|d| day_number(d) <= day_number(today));
        let consequence = if past(r.update_blocked) {
            "a stack can neither create nor update it"
        } else if past(r.create_blocked) {
            "a new stack cannot create it, an existing one can still update it"
        } else {
            "it gets no security patches, and can still be created"
        };
        if day_number(r.deprecated) <= day_number(today) {
            problems.push(format!(
                "{} ({TEMPLATES}/{}) runs on {}: {consequence}; patch /Resources/{}/Properties/Runtime with op: replace",
                f.id,
                f.source,
                schedule(&r, today),
                f.id
            ));
        }
    }
    problems
}

#[test]
fn every_lambda_function_copilot_generates_runs_on_a_supported_runtime() {
    let today = civil(SystemTime::now());
    let mut problems = Vec::new();
    let mut in_use = BTreeSet::new();
    for service in SERVICES {
        let manifest = manifest_of(service);
        let kind = Kind::of(&manifest).expect("a known workload type");
        let patches = patches(&format!("copilot/{service}/overrides/cfn.patches.yml"));
        for env in environments(&manifest) {
            let functions = generated_functions(kind, &in_environment(&manifest, &env));
            for f in &functions {
                in_use.extend(patched_runtime(f, &patches).ok());
            }
            for p in runtime_problems(&functions, &patches, today) {
                problems.push(format!("{service} in {env}: {p}"));
            }
        }
        // A runtime patch on a function the stack does not have fails the deployment
        // (patch.go: replace needs its path); the patch test covers that, and this
        // names the functions such a patch may target.
        let generated: BTreeSet<&str> = environments(&manifest)
            .iter()
            .flat_map(|env| generated_functions(kind, &in_environment(&manifest, env)))
            .map(|f| f.id)
            .collect();
        for p in &patches {
            if let Some(id) = p
                .path
                .strip_prefix("/Resources/")
                .and_then(|rest| rest.strip_suffix("/Properties/Runtime"))
                && !generated.contains(id)
            {
                problems.push(format!(
                    "{service}: the runtime patch names {id}, which Copilot does not generate for this service"
                ));
            }
        }
    }
    // The environment stacks' own functions, through the environments' overrides.
    let env_patches = patches(ENVIRONMENT_PATCHES);
    for env in SHIPPED_ENVIRONMENTS {
        let functions = environment_functions(&environment_manifest(env));
        for f in &functions {
            in_use.extend(patched_runtime(f, &env_patches).ok());
        }
        for p in runtime_problems(&functions, &env_patches, today) {
            problems.push(format!("environment {env}: {p}"));
        }
    }
    // How long each runtime in use has left, whatever the outcome.
    for id in &in_use {
        if let Ok(r) = runtime(id) {
            eprintln!("{}", schedule(&r, today));
        }
    }
    report("Lambda functions on a deprecated runtime", &problems);
}

#[test]
fn the_runtime_rule_reads_each_step_of_the_retirement() {
    // The functions as Copilot generates them, unpatched, against the dates.
    let manifest = manifest_of("websocket");
    let functions = generated_functions(
        Kind::LoadBalancedWebService,
        &in_environment(&manifest, "test"),
    );
    let ids: Vec<&str> = functions.iter().map(|f| f.id).collect();
    assert_eq!(
        ids,
        [
            "EnvControllerFunction",
            "RulePriorityFunction",
            "DynamicDesiredCountFunction"
        ]
    );
    assert!(runtime_problems(&functions, &[], (2026, 4, 29)).is_empty());
    let deprecated_only = runtime_problems(&functions, &[], (2026, 12, 2));
    assert_eq!(deprecated_only.len(), 3);
    assert!(
        deprecated_only[0].contains("can still be created")
            && deprecated_only[0].contains("creation blocked in 61 days (2027-02-01)"),
        "{deprecated_only:?}"
    );
    let blocked = runtime_problems(&functions, &[], (2027, 2, 1));
    assert!(
        blocked[0].contains("a new stack cannot create it"),
        "{blocked:?}"
    );
    let frozen = runtime_problems(&functions, &[], (2027, 3, 3));
    assert!(
        frozen[0].contains("neither create nor update"),
        "{frozen:?}"
    );

    // nodejs22.x would need replacing again in 2027; nodejs24.x runs to 2028.
    assert_eq!(deprecated("nodejs22.x", (2026, 12, 2)), Ok(false));
    assert_eq!(deprecated("nodejs22.x", (2027, 4, 30)), Ok(true));
    assert_eq!(deprecated("nodejs24.x", (2028, 4, 29)), Ok(false));
    assert!(deprecated("python3.13", (2026, 12, 2)).is_err());
    let r = runtime("nodejs24.x").expect("nodejs24.x is known");
    assert_eq!(
        schedule(&r, (2027, 4, 30)),
        "nodejs24.x: deprecated in 366 days (2028-04-30); creation blocked not announced (after 2028-04-30); updates blocked not announced (after 2028-04-30)"
    );

    // The calendar.
    assert_eq!(
        civil(UNIX_EPOCH + Duration::from_secs(1_796_169_600)),
        (2026, 12, 2)
    );
    assert_eq!(civil(UNIX_EPOCH), (1970, 1, 1));
    assert_eq!(day_number((1970, 1, 1)), 0);
    assert_eq!(day_number((2026, 12, 2)), 1_796_169_600 / 86_400);
    assert_eq!(day_number((2028, 3, 1)) - day_number((2028, 2, 28)), 2);
}

"""Mutations of the drain's rules: when a task may leave, which one, what a decision
costs, and what keeps a task from flapping. Each is a rule the tests must defend.

    scripts/mutate scripts/mutations/drain.py"""
T = "cargo nextest run -p task-protection --no-fail-fast 2>&1"
E = ("cargo nextest run -p task-protection --no-fail-fast 2>&1 && "
     "cargo nextest run -p e2e --test e2e --no-fail-fast -E 'test(/^drain_store::/)' 2>&1")
DE = "crates/task-protection/src/drain/decide/mod.rs"
DP = "crates/task-protection/src/drain/decide/deploy.rs"
PK = "crates/task-protection/src/drain/decide/pick.rs"
R = "crates/task-protection/src/drain/record.rs"
W = "crates/task-protection/src/drain/watch.rs"
G = "crates/task-protection/src/drain/gather.rs"
ST = "crates/task-protection/src/drain/store.rs"
DY = "crates/task-protection/src/drain/dynamo.rs"
MUTATIONS = [
 # Ready means healthy, settled, and not failing.
 ("ready-ignores-health", DE,
  "            _ => !self.checked,\n", "            _ => true,\n", T),
 ("ready-ignores-settle", DE,
  "        healthy && self.settled(task)", "        healthy", T),
 ("failing-primary-counts-as-ready", DP,
  "        let ready = if failing {", "        let ready = if false {", T),
 ("failed-rollout-lets-old-go", DP,
  "        if primary.rollout == Rollout::Failed {\n            // The circuit breaker",
  "        if false {\n            // The circuit breaker", T),
 ("stall-ignores-unready-primary", DP,
  "            && primary_tasks.iter().all(|t| self.ready(t))\n", "\n", T),
 ("stall-below-ecs-floor", DP,
  "            let batch = desired.div_ceil(10).max(1).min(room);",
  "            let batch = desired.div_ceil(10).max(1);", T),
 ("no-stall-at-maximum-percent", DP,
  "        if stalled {", "        if false {", T),
 ("traffic-shift-before-clean-up", DP,
  "                .is_some_and(crate::drain::facts::ShiftFacts::old_side_released)",
  "                .is_some()", T),
 ("clean-up-while-rolling-back", "crates/task-protection/src/drain/facts.rs",
  "        !rolling_back && (", "        (", T),
 # The surplus, and ECS's own starts.
 ("young-tasks-count-as-surplus", DE,
  "            .saturating_sub(self.young())", "", T),
 # A task that has let go stays gone, kept so twice: the rules count those already
 # leaving among the ones they pick, and keep() carries every earlier leave over.
 # Breaking one alone changes no decision; these break both.
 ("leaver-not-kept-in-a-scale-in", "*", [
   (DE, "            .max(sticky.min(surplus));", ";"),
   (DE, "            if !recall && !surplus_gone {\n                leaving.insert(id, Leave { seen: at, ..leave });",
        "            if false {\n                leaving.insert(id, Leave { seen: at, ..leave });")], None, T),
 ("leaver-not-kept-in-a-deployment", "*", [
   (DP, "        let count = allowed.max(sticky);", "        let count = allowed.max(sticky * 0);"),
   (DE, "            if !recall && !surplus_gone {\n                leaving.insert(id, Leave { seen: at, ..leave });",
        "            if false {\n                leaving.insert(id, Leave { seen: at, ..leave });")], None, T),
 ("unlisted-leaver-forgotten-at-once", DE,
  "        } else if time(leave.seen) + FORGET_AFTER > now {",
  "        } else if false {", T),
 ("pick-ignores-health", PK,
  "            task.health != Health::Unhealthy,", "            false,", T),
 ("pick-ignores-zones", PK,
  "            Reverse(zones.get(&task.zone.as_deref()).copied().unwrap_or(0)),",
  "            Reverse(0),", T),
 ("pick-not-sticky-first", PK,
  "        for sticky_first in [true, false] {", "        for sticky_first in [false] {", T),
 ("controller-not-off", DE,
  "        Controller::Ecs => return None,\n        Controller::CodeDeploy => \"CODE_DEPLOY\",",
  "        Controller::Ecs | Controller::CodeDeploy => return None,", T),
 # What a task makes of a record.
 ("stopping-not-told", R,
  "        if stopping.binary_search(&digest(task_id)).is_ok() {",
  "        if stopping.is_empty() && stopping.binary_search(&digest(task_id)).is_ok() {", T),
 ("stopping-not-sticky", W,
  "            if *m == membership || *m == Membership::Leaving(LeaveReason::Stopping) {",
  "            if *m == membership {", T),
 ("denied-leaves-is-on", W,
  "        self.out.on.send_replace(false);", "", T),
 ("throttling-drops-the-verdict", W,
  "                Some(Record {\n                    due_at: millis(now + wait),\n                    throttled,\n                    ..prev.clone()\n                })",
  "                Some(Record {\n                    due_at: millis(now + wait),\n                    throttled,\n                    verdict: super::record::Verdict::default(),\n                    ..prev.clone()\n                })", T),
 ("throttling-not-backed-off", W,
  "        let factor = 2u32.saturating_pow(throttled).min(THROTTLED_MAX_FACTOR);",
  "        let factor = 1;", T),
 # What a decision costs.
 ("always-list", G,
  "        || !needs_listing(&facts.service, prev, relist_after, now)\n", "\n", T),
 ("local-lists-any-size", G,
  "    limit.is_some_and(|limit| size > limit)", "    limit.is_some_and(|limit| size > limit * 1_000)", T),
 # The store's claim is conditional, so without this check one task still decides;
 # what it saves is every other task's failed conditional write. No test counts those
 # yet: this one survives, with the table's tests too.
 ("shared-decides-per-task", W,
  "            && stored.as_ref().is_none_or(|s| s.claim_free(millis(now)));",
  "            ;", E),
 ("local-claim-ignores-version", ST,
  "        if stored.version != version || !stored.claim_free(now) {",
  "        if !stored.claim_free(now) {", T),
 ("dynamo-claim-ignores-claims", DY,
  "                \"{} AND (attribute_not_exists(claim_until) OR claim_until < :now)\",",
  "                \"{} AND (attribute_not_exists(claim_until) OR claim_until < :now OR claim_until >= :now)\",", E),
 ("dynamo-publish-without-claim", DY,
  "            .condition_expression(format!(\"claim_owner = :me AND {}\", at_version(version)))",
  "            .condition_expression(format!(\"(claim_owner = :me OR attribute_exists(claim_owner) OR attribute_not_exists(claim_owner)) AND {}\", at_version(version)))", E),
]

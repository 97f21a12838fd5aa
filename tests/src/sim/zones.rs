//! Where tasks run: Availability Zones and EC2 container instances. New tasks go to
//! the zone with the fewest of the service's tasks, and scale-in stops tasks in the
//! zone with the most (UpdateService's API reference describes both); zone
//! rebalancing moves a task from an over-served zone to an under-served one once the
//! service is steady; a DRAINING container instance's tasks are replaced.

use std::collections::BTreeMap;

use super::effect::Effect;
use super::lifecycle;
use super::model::{InstanceStatus, Model, Replacing, SERVICE, StartReason, StopReason, Task};
use super::settings::{InstanceDraining, Launch, RebalancingWithProtection};

/// Tasks of the service the scheduler counts in a zone: wanted, and not on their way
/// out after a replacement.
fn staying(t: &Task) -> bool {
    t.wanted() && t.replacing.as_ref().is_none_or(|r| r.by.is_none())
}

/// The service's staying tasks per zone, every zone listed.
fn per_zone(m: &Model) -> BTreeMap<String, u32> {
    let mut counts: BTreeMap<String, u32> =
        m.settings.zones.iter().map(|z| (z.clone(), 0)).collect();
    for t in m.tasks.iter().filter(|t| staying(t)) {
        *counts.entry(t.zone.clone()).or_default() += 1;
    }
    counts
}

/// Where a new task goes: the zone with the fewest of the service's tasks (the first
/// of equals, in the settings' order), or `zone` when given; on EC2, the ACTIVE
/// container instance there with the fewest. `None` when no instance can take it.
#[must_use]
pub(super) fn place(m: &Model, zone: Option<&str>) -> Option<(String, Option<String>)> {
    let counts = per_zone(m);
    let usable = |z: &str| match m.settings.launch {
        Launch::Fargate => true,
        Launch::Ec2 { .. } => m
            .instances
            .iter()
            .any(|i| i.zone == z && i.status == InstanceStatus::Active),
    };
    let chosen = match zone {
        Some(z) => usable(z).then(|| z.to_owned())?,
        None => m
            .settings
            .zones
            .iter()
            .filter(|z| usable(z))
            .min_by_key(|z| counts.get(*z).copied().unwrap_or(0))?
            .clone(),
    };
    let instance = match m.settings.launch {
        Launch::Fargate => None,
        Launch::Ec2 { .. } => Some(
            m.instances
                .iter()
                .filter(|i| i.zone == chosen && i.status == InstanceStatus::Active)
                .min_by_key(|i| {
                    m.tasks
                        .iter()
                        .filter(|t| staying(t) && t.instance.as_deref() == Some(&i.arn))
                        .count()
                })?
                .arn
                .clone(),
        ),
    };
    Some((chosen, instance))
}

/// Which `n` of `candidates` a scale-in stops: one at a time from the zone with the
/// most of the service's tasks, tasks being replaced first, then those not yet
/// RUNNING, then the oldest (the order within a zone is not documented).
#[must_use]
pub(super) fn scale_in_order(m: &Model, candidates: &[&Task], n: usize) -> Vec<String> {
    let mut counts = per_zone(m);
    let mut left: Vec<&Task> = candidates.to_vec();
    let mut out = Vec::new();
    while out.len() < n && !left.is_empty() {
        let best = left
            .iter()
            .enumerate()
            .max_by(|(_, a), (_, b)| {
                let za = counts.get(&a.zone).copied().unwrap_or(0);
                let zb = counts.get(&b.zone).copied().unwrap_or(0);
                za.cmp(&zb)
                    .then_with(|| a.replacing.is_some().cmp(&b.replacing.is_some()))
                    .then_with(|| b.running().cmp(&a.running()))
                    .then_with(|| b.created_at.cmp(&a.created_at))
                    .then_with(|| b.id.cmp(&a.id))
            })
            .map(|(i, _)| i);
        let Some(i) = best else {
            break;
        };
        let t = left.remove(i);
        if let Some(c) = counts.get_mut(&t.zone) {
            *c = c.saturating_sub(1);
        }
        out.push(t.id.clone());
    }
    out
}

/// Availability Zone rebalancing, for a service that allows it (REPLICA,
/// maximumPercent above 100) once it is steady: a task starts in the zone with the
/// fewest tasks, and once it is RUNNING and healthy one stops in the zone with the
/// most (an unprotected one). Whether a task is started when every task it could stop
/// is protected is a setting.
pub(super) fn rebalance(m: &mut Model, fx: &mut Vec<Effect>) {
    if !m.settings.rebalancing || m.settings.maximum_percent <= 100 || m.settings.zones.len() < 2 {
        return;
    }
    let now = m.now;
    // One rebalancing at a time: the victim waits for its replacement.
    if m.tasks.iter().any(|t| {
        t.wanted()
            && t.replacing
                .as_ref()
                .is_some_and(|r| r.reason == StopReason::Rebalancing)
    }) {
        return;
    }
    let steady = m.primary().completed()
        && m.live_deployments().count() == 1
        && m.wanted().count() == usize::try_from(m.desired).unwrap_or(usize::MAX)
        && m.wanted().all(|t| m.is_healthy(t));
    if !steady {
        return;
    }
    // Balanced: no zone has more than one task over another (the remainder of an
    // uneven count may sit in any zone).
    let counts = per_zone(m);
    let over = counts
        .iter()
        .max_by_key(|(_, c)| **c)
        .map(|(z, c)| (z.clone(), *c));
    let under = counts
        .iter()
        .min_by_key(|(_, c)| **c)
        .map(|(z, c)| (z.clone(), *c));
    let (Some((over, most)), Some((under, fewest))) = (over, under) else {
        return;
    };
    if most <= fewest + 1 {
        return;
    }
    let victim = m
        .wanted()
        .filter(|t| t.zone == over && t.running() && !t.protected(now))
        .min_by_key(|t| t.created_at)
        .map(|t| t.id.clone());
    let victim = match (victim, m.settings.unknowns.rebalancing_with_protection) {
        (Some(v), _) => v,
        (None, RebalancingWithProtection::ChecksFirst) => {
            m.event(format!(
                "(service {SERVICE}) is not AZ balanced; AZ Rebalancing stopped: tasks under protection"
            ));
            return;
        }
        (None, RebalancingWithProtection::StartsAnyway) => {
            // The oldest in the over-served zone; it goes once unprotected.
            let Some(v) = m
                .wanted()
                .filter(|t| t.zone == over && t.running())
                .min_by_key(|t| t.created_at)
                .map(|t| t.id.clone())
            else {
                return;
            };
            v
        }
    };
    let Some(place) = place(m, Some(&under)) else {
        return;
    };
    m.event(format!(
        "(service {SERVICE}) is not AZ balanced with tasks {counts:?}. AZ Rebalancing in progress."
    ));
    let primary = m.primary.clone();
    let new = lifecycle::start_task(m, &primary, StartReason::Rebalancing, place, fx);
    if let Some(t) = m.task_mut(&victim) {
        t.replacing = Some(Replacing {
            reason: StopReason::Rebalancing,
            by: Some(new),
        });
    }
}

/// A DRAINING container instance: its PENDING service tasks stop at once, its RUNNING
/// ones are marked for replacement (the scheduler replaces them within minimum
/// healthy and maximum percent). Whether protection holds them back is a setting.
pub(super) fn drain_instances(m: &mut Model, fx: &mut Vec<Effect>) {
    let draining: Vec<String> = m
        .instances
        .iter()
        .filter(|i| i.status == InstanceStatus::Draining)
        .map(|i| i.arn.clone())
        .collect();
    if draining.is_empty() {
        return;
    }
    let now = m.now;
    let waits = m.settings.unknowns.instance_draining == InstanceDraining::WaitsForProtection;
    let mut pending = Vec::new();
    for t in &mut m.tasks {
        if !t.wanted() || !t.instance.as_ref().is_some_and(|i| draining.contains(i)) {
            continue;
        }
        if !t.running() {
            pending.push(t.id.clone());
        } else if t.replacing.is_none() && !(waits && t.protected(now)) {
            t.replacing = Some(Replacing {
                reason: StopReason::InstanceDraining,
                by: None,
            });
        }
    }
    for id in pending {
        lifecycle::stop_task(m, &id, StopReason::InstanceDraining, fx);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::sim::settings::Settings;

    fn model(zones: &[&str]) -> Model {
        let mut s = Settings::websocket(0);
        s.zones = zones.iter().map(|z| (*z).to_owned()).collect();
        Model::new(s, UNIX_EPOCH)
    }

    fn add(m: &mut Model, zone: &str, age: u64) -> String {
        let primary = m.primary.clone();
        let mut fx = Vec::new();
        m.now = Duration::from_secs(age);
        let id = lifecycle::start_task(
            m,
            &primary,
            StartReason::Desired,
            (zone.to_owned(), None),
            &mut fx,
        );
        m.task_ready(&id, Duration::from_secs(age));
        id
    }

    #[test]
    fn new_tasks_go_to_the_zone_with_the_fewest() {
        let mut m = model(&["a", "b", "c"]);
        add(&mut m, "a", 0);
        add(&mut m, "c", 0);
        assert_eq!(place(&m, None).unwrap().0, "b");
        add(&mut m, "b", 0);
        assert_eq!(place(&m, None).unwrap().0, "a");
    }

    #[test]
    fn scale_in_stops_in_the_zone_with_the_most_then_the_oldest() {
        let mut m = model(&["a", "b"]);
        let a1 = add(&mut m, "a", 1);
        let a2 = add(&mut m, "a", 2);
        let b1 = add(&mut m, "b", 0);
        let b2 = add(&mut m, "b", 3);
        let a3 = add(&mut m, "a", 4);
        let all: Vec<&Task> = m.tasks.iter().collect();
        // a has three, b two: the oldest in a first, then a and b are even.
        let order = scale_in_order(&m, &all, 5);
        assert_eq!(order[0], a1);
        assert_eq!(order[1], b1);
        assert_eq!(order[2], a2);
        assert_eq!(order[3], b2);
        assert_eq!(order[4], a3);
    }
}

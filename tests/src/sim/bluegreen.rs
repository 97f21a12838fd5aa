//! Deployments side by side: ECS's own blue/green strategy and the task sets of the
//! CODE_DEPLOY and EXTERNAL controllers. The new (green) side is brought to 100 % of
//! the desired count in the alternate target group, without production traffic; the
//! listener then shifts production traffic to it (PRODUCTION_TRAFFIC_SHIFT), both
//! sides run for the bake time, and the old (blue) side is cleaned up, its protected
//! tasks waited for. A rollback before the clean-up shifts traffic back to blue and
//! stops green. The lifecycle stages are those of `DescribeServiceDeployments`
//! (the ECS developer guide, "Amazon ECS blue/green service deployments workflow").

use super::effect::Effect;
use super::health::TargetGroupRole;
use super::lifecycle;
use super::model::{Model, Progress, RollbackInfo, Rollout, SERVICE, Stage, StopReason, count};
use super::settings::{Controller, Strategy};

/// How long a stage that waits on nothing lasts, and the bake time.
fn timings(m: &Model) -> (std::time::Duration, std::time::Duration) {
    match m.settings.strategy {
        Strategy::BlueGreen { bake, stage } => (stage, bake),
        Strategy::Rolling => (std::time::Duration::from_secs(1), std::time::Duration::ZERO),
    }
}

/// The deployment that has production traffic: the newest whose traffic has shifted
/// (and that is not being rolled back), else the oldest live one.
#[must_use]
pub(super) fn production(m: &Model) -> String {
    m.live_deployments()
        .filter(|d| {
            d.progress != Progress::RollbackInProgress
                && d.progress != Progress::RollbackSuccessful
                && d.stage
                    .is_none_or(|(s, _)| s >= Stage::ProductionTrafficShift)
        })
        .map(|d| d.id.clone())
        .last()
        .unwrap_or_else(|| m.primary.clone())
}

/// The target group a deployment's targets belong in.
#[must_use]
pub(super) fn group_of(m: &Model, deployment: &str) -> TargetGroupRole {
    if !super::deployments::side_by_side(&m.settings) || production(m) == deployment {
        TargetGroupRole::Production
    } else {
        TargetGroupRole::Alternate
    }
}

/// The sides kept at the desired count: the production one, and a green one from its
/// scale-up until its bake time ends (unless it is being rolled back).
#[must_use]
pub(super) fn kept_sides(m: &Model) -> Vec<String> {
    let production = production(m);
    let mut sides: Vec<String> = m
        .live_deployments()
        .filter(|d| {
            d.progress == Progress::InProgress
                && d.stage
                    .is_some_and(|(s, _)| (Stage::ScaleUp..=Stage::BakeTime).contains(&s))
        })
        .map(|d| d.id.clone())
        .collect();
    if !sides.contains(&production) {
        sides.insert(0, production);
    }
    sides
}

/// Moves every side-by-side deployment through its stages.
pub(super) fn advance(m: &mut Model, fx: &mut Vec<Effect>) {
    let (stage_time, bake) = timings(m);
    let now = m.now;
    let desired = m.desired;
    let ids: Vec<String> = m.live_deployments().map(|d| d.id.clone()).collect();
    for id in ids {
        let Some((stage, since)) = m.deployment(&id).and_then(|d| d.stage) else {
            continue;
        };
        let progress = m.deployment(&id).map(|d| d.progress);
        if progress == Some(Progress::RollbackInProgress) {
            wind_down(m, &id, Progress::RollbackSuccessful, fx);
            continue;
        }
        // Stopped by a newer deployment before its traffic shifted: its side goes.
        if progress == Some(Progress::Stopped) && stage < Stage::ProductionTrafficShift {
            wind_down(m, &id, Progress::Stopped, fx);
            continue;
        }
        if progress != Some(Progress::InProgress) {
            continue;
        }
        let waited = now.saturating_sub(since);
        let next = match stage {
            Stage::PreScaleUp if waited >= stage_time => Some(Stage::ScaleUp),
            Stage::ScaleUp => {
                let healthy = count(
                    m.tasks
                        .iter()
                        .filter(|t| t.deployment == id && m.is_healthy(t)),
                );
                (healthy >= desired).then_some(Stage::PostScaleUp)
            }
            Stage::PostScaleUp if waited >= stage_time => Some(Stage::TestTrafficShift),
            Stage::TestTrafficShift if waited >= stage_time => Some(Stage::PostTestTrafficShift),
            Stage::PostTestTrafficShift if waited >= stage_time => {
                Some(Stage::ProductionTrafficShift)
            }
            Stage::ProductionTrafficShift if waited >= stage_time => {
                Some(Stage::PostProductionTrafficShift)
            }
            Stage::PostProductionTrafficShift if waited >= stage_time => Some(Stage::BakeTime),
            Stage::BakeTime if waited >= bake => Some(Stage::CleanUp),
            Stage::CleanUp => {
                clean_up(m, &id, fx);
                None
            }
            _ => None,
        };
        if let Some(next) = next {
            enter(m, &id, next);
        }
    }
}

/// `id` enters `stage`.
fn enter(m: &mut Model, id: &str, stage: Stage) {
    let now = m.now;
    if let Some(d) = m.deployment_mut(id) {
        d.stage = Some((stage, now));
        d.updated_at = now;
    }
    if stage == Stage::ProductionTrafficShift {
        shift_targets(m);
        if m.settings.controller != Controller::Ecs {
            // A task set is PRIMARY once it has the production traffic.
            m.primary = id.to_owned();
        }
        m.event(format!(
            "(service {SERVICE}) (deployment {id}) production traffic shifted"
        ));
    }
}

/// Puts each target in the target group its deployment now belongs in.
fn shift_targets(m: &mut Model) {
    let groups: Vec<(usize, TargetGroupRole)> = m
        .tasks
        .iter()
        .enumerate()
        .filter(|(_, t)| t.target.is_some())
        .map(|(i, t)| (i, group_of(m, &t.deployment)))
        .collect();
    for (i, group) in groups {
        if let Some(target) = &mut m.tasks[i].target {
            target.group = group;
        }
    }
}

/// CLEAN_UP: every task of the older sides is stopped once unprotected; when none is
/// left the deployment is SUCCESSFUL and COMPLETED.
fn clean_up(m: &mut Model, id: &str, fx: &mut Vec<Effect>) {
    let now = m.now;
    let old: Vec<(String, bool)> = m
        .wanted()
        .filter(|t| t.deployment != id)
        .map(|t| (t.id.clone(), t.protected(now)))
        .collect();
    let blocked = old.iter().filter(|(_, p)| *p).count();
    for (task, protected) in &old {
        if !protected {
            lifecycle::stop_task(
                m,
                task,
                StopReason::Scheduler {
                    deployment: id.to_owned(),
                },
                fx,
            );
        }
    }
    if blocked > 0 {
        m.event(format!(
            "(service {SERVICE}, taskSet {id}) was unable to scale in due to (reason {blocked} tasks under protection)"
        ));
    }
    if m.tasks.iter().any(|t| t.alive() && t.deployment != id) {
        return;
    }
    for d in &mut m.deployments {
        if d.id != id && !d.inactive {
            d.inactive = true;
            d.updated_at = now;
        }
    }
    if let Some(d) = m.deployment_mut(id) {
        d.rollout = Rollout::Completed;
        d.progress = Progress::Successful;
        d.finished_at = Some(now);
        d.updated_at = now;
    }
    m.primary = id.to_owned();
    m.event(format!(
        "(service {SERVICE}) (deployment {id}) deployment completed."
    ));
}

/// Rolls back the newest side-by-side deployment still under way (as
/// `StopServiceDeployment` with `ROLLBACK` does, or an alarm); `false` when there is
/// none or it is past its bake time.
pub(super) fn roll_back_current(m: &mut Model) -> bool {
    let current = m
        .live_deployments()
        .filter(|d| {
            d.progress == Progress::InProgress && d.stage.is_some_and(|(s, _)| s < Stage::CleanUp)
        })
        .map(|d| d.id.clone())
        .last();
    let Some(id) = current else {
        return false;
    };
    roll_back(m, &id);
    m.deployment(&id)
        .is_some_and(|d| d.progress == Progress::RollbackInProgress)
}

/// Rolls `id` back: production traffic returns to the side it came from, which is
/// PRIMARY again, and `id`'s tasks are stopped.
pub(super) fn roll_back(m: &mut Model, id: &str) {
    let now = m.now;
    let Some((stage, _)) = m.deployment(id).and_then(|d| d.stage) else {
        return;
    };
    if stage == Stage::CleanUp {
        return;
    }
    let blue = m
        .live_deployments()
        .filter(|d| d.id != id && d.created_at <= m.deployment(id).map_or(now, |g| g.created_at))
        .map(|d| d.id.clone())
        .last();
    let Some(blue) = blue else {
        return;
    };
    if let Some(d) = m.deployment_mut(id) {
        d.progress = Progress::RollbackInProgress;
        if d.rollout == Rollout::InProgress {
            d.rollout = Rollout::Failed;
            d.reason = "rolled back".to_owned();
        }
        d.finished_at = Some(now);
        d.updated_at = now;
        d.rollback = Some(RollbackInfo {
            to: blue.clone(),
            started_at: now,
            reason: "rollback requested".to_owned(),
        });
    }
    m.primary.clone_from(&blue);
    shift_targets(m);
    m.event(format!(
        "(service {SERVICE}) (deployment {id}) rolling back to {blue}"
    ));
}

/// A green side that goes (rolled back, or stopped by a newer deployment): its tasks
/// are stopped (once unprotected); when none is left it is `end` and INACTIVE.
fn wind_down(m: &mut Model, id: &str, end: Progress, fx: &mut Vec<Effect>) {
    let now = m.now;
    let green: Vec<(String, bool)> = m
        .wanted()
        .filter(|t| t.deployment == id)
        .map(|t| (t.id.clone(), t.protected(now)))
        .collect();
    let to = m
        .deployment(id)
        .and_then(|d| d.rollback.as_ref())
        .map_or_else(|| m.primary.clone(), |r| r.to.clone());
    for (task, protected) in green {
        if !protected {
            lifecycle::stop_task(
                m,
                &task,
                StopReason::Scheduler {
                    deployment: to.clone(),
                },
                fx,
            );
        }
    }
    if m.tasks.iter().any(|t| t.alive() && t.deployment == id) {
        return;
    }
    if let Some(d) = m.deployment_mut(id) {
        d.progress = end;
        d.inactive = true;
        d.updated_at = now;
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::sim::model::Revision;
    use crate::sim::settings::Settings;

    #[test]
    fn production_stays_blue_until_the_traffic_shift() {
        let mut s = Settings::websocket(1);
        s.strategy = Strategy::BlueGreen {
            bake: Duration::from_secs(10),
            stage: Duration::from_secs(1),
        };
        let mut m = Model::new(s, UNIX_EPOCH);
        let blue = m.primary.clone();
        let green = super::super::deployments::deploy(&mut m, Revision::default());
        assert_eq!(
            m.primary, green,
            "an ECS blue/green deployment is PRIMARY at once"
        );
        assert_eq!(production(&m), blue);
        assert_eq!(group_of(&m, &green), TargetGroupRole::Alternate);
        enter(&mut m, &green, Stage::ProductionTrafficShift);
        assert_eq!(production(&m), green);
        assert_eq!(group_of(&m, &blue), TargetGroupRole::Alternate);
        roll_back(&mut m, &green);
        assert_eq!(production(&m), blue);
        assert_eq!(m.primary, blue);
    }
}

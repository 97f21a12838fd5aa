//! The state machine's rules, one at a time, on instants it is given.

use super::*;
use crate::backend::{Grant, ProtectionError, Rejection};

fn settings() -> ProtectionSettings {
    ProtectionSettings::builder()
        .duration_minutes(1)
        .maintain_percent(10)
        .refresh_percent(80)
        .build()
        .unwrap()
}

/// The agent's landing window.
const LANDING: Duration = crate::backend::AGENT_LANDING_WINDOW;

fn ok(enabled: bool) -> Result<Grant, ProtectionError> {
    Ok(if enabled {
        Grant::protected_until(SystemTime::now() + Duration::from_secs(60))
    } else {
        Grant::unprotected()
    })
}

/// A machine past its start: ECS confirmed off.
fn released(t0: Instant) -> Machine {
    let mut m = Machine::new(&settings(), t0, LANDING);
    m.on_sent(t0, ProtectionRequest::disable());
    m.on_answer(t0, ok(false));
    m
}

#[test]
fn an_idle_start_releases_what_an_earlier_process_may_have_left_then_waits_forever() {
    let t0 = Instant::now();
    let m = Machine::new(&settings(), t0, LANDING);
    assert!(m.might_be_protected(t0), "unknown at start");
    assert!(!m.is_protected(t0), "and no promise");
    // One disable once the maintain window of the start has passed.
    assert_eq!(m.poll(t0), Next::Wait(Some(t0 + Duration::from_secs(6))));
    assert_eq!(
        m.poll(t0 + Duration::from_secs(6)),
        Next::Put(ProtectionRequest::disable())
    );
    let m = released(t0);
    assert_eq!(m.poll(t0 + Duration::from_secs(7)), Next::Wait(None));
}

#[test]
fn a_holder_at_start_enables_at_once() {
    let t0 = Instant::now();
    let mut m = Machine::new(&settings(), t0, LANDING);
    m.set_wanted(true, t0);
    assert_eq!(m.poll(t0), Next::Put(ProtectionRequest::enable(1)));
}

#[test]
fn enable_then_refresh_then_release_at_the_maintain_mark() {
    let t0 = Instant::now();
    let mut m = released(t0);
    let t1 = t0 + Duration::from_secs(1);
    m.set_wanted(true, t1);
    assert_eq!(m.poll(t1), Next::Put(ProtectionRequest::enable(1)));
    m.on_sent(t1, ProtectionRequest::enable(1));
    let e = m.on_answer(t1, ok(true));
    assert!(matches!(
        e,
        Effect::Protected {
            refreshed: false,
            ..
        }
    ));
    // Refresh at 80 % of 60 s after the send, on the monotonic clock.
    assert_eq!(m.poll(t1), Next::Wait(Some(t1 + Duration::from_secs(48))));
    m.set_wanted(false, t1);
    assert_eq!(m.poll(t1), Next::Wait(Some(t1 + Duration::from_secs(6))));
    assert_eq!(
        m.poll(t1 + Duration::from_secs(6)),
        Next::Put(ProtectionRequest::disable())
    );
}

#[test]
fn a_skewed_expiry_changes_nothing() {
    let t0 = Instant::now();
    for skew in [-3_600_i64, -50, 0, 50, 3_600] {
        let mut m = released(t0);
        let t1 = t0 + Duration::from_secs(1);
        m.set_wanted(true, t1);
        m.on_sent(t1, ProtectionRequest::enable(1));
        let wall = SystemTime::now() + Duration::from_secs(60);
        let reported = if skew >= 0 {
            wall + Duration::from_secs(skew.unsigned_abs())
        } else {
            wall - Duration::from_secs(skew.unsigned_abs())
        };
        let e = m.on_answer(t1, Ok(Grant::protected_until(reported)));
        assert!(matches!(e, Effect::Protected { .. }), "{skew}: {e:?}");
        assert_eq!(
            m.poll(t1),
            Next::Wait(Some(t1 + Duration::from_secs(48))),
            "{skew}"
        );
        assert!(m.is_protected(t1 + Duration::from_secs(59)), "{skew}");
    }
}

#[test]
fn the_linger_follows_the_recent_gaps_within_the_maintain_window() {
    let t0 = Instant::now();
    let mut m = released(t0);
    assert_eq!(m.linger(), Duration::from_secs(1));
    let mut t = t0;
    for _ in 0..5 {
        m.set_wanted(true, t);
        t += Duration::from_millis(50);
        m.set_wanted(false, t);
        m.note_release(t);
        t += Duration::from_millis(1_200);
    }
    assert_eq!(m.linger(), Duration::from_millis(2_400));
    // A long pause is not a gap the maintain window would bridge: not counted.
    m.set_wanted(true, t + Duration::from_secs(30));
    assert_eq!(m.linger(), Duration::from_millis(2_400));
    // Gaps near the window: the linger stops at the window.
    for _ in 0..GAPS_KEPT {
        m.set_wanted(false, t);
        m.note_release(t);
        t += Duration::from_secs(5);
        m.set_wanted(true, t);
    }
    assert_eq!(m.linger(), Duration::from_secs(6));
}

#[test]
fn no_request_leaves_before_one_of_the_other_kind_can_no_longer_land() {
    let t0 = Instant::now();
    let mut m = released(t0);
    let t1 = t0 + Duration::from_secs(1);
    m.set_wanted(true, t1);
    m.on_sent(t1, ProtectionRequest::enable(1));
    let e = m.on_answer(
        t1 + Duration::from_secs(4),
        Err(ProtectionError::Server {
            status: 504,
            code: "RequestCanceled".into(),
            message: String::new(),
        }),
    );
    assert!(matches!(e, Effect::Failed { .. }));
    // Another enable may go after the backoff; a disable only once the first
    // enable can no longer land.
    let t2 = t1 + Duration::from_millis(4_500);
    assert!(matches!(m.poll(t2), Next::Put(r) if r.enabled));
    m.set_wanted(false, t2);
    m.note_release(t2);
    let Next::Wait(Some(at)) = m.poll(t2) else {
        panic!("{:?}", m.poll(t2))
    };
    assert!(at >= t1 + LANDING, "{:?}", at - t1);
}

#[test]
fn a_release_sent_while_an_earlier_enable_may_land_is_no_release() {
    // Only shutdown's budget could send it that early; the answer must not claim
    // ECS off when the earlier enable may land after it.
    let t0 = Instant::now();
    let mut m = released(t0);
    m.on_sent(t0, ProtectionRequest::enable(1));
    m.on_answer(
        t0,
        Err(ProtectionError::Server {
            status: 500,
            code: String::new(),
            message: String::new(),
        }),
    );
    let t1 = t0 + Duration::from_secs(1);
    m.on_sent(t1, ProtectionRequest::disable());
    assert_eq!(m.on_answer(t1, ok(false)), Effect::Released);
    assert!(m.might_be_protected(t1), "the enable may still land");
    assert!(m.might_be_protected(t0 + Duration::from_secs(64)));
}

#[test]
fn rejection_cools_down_and_transient_backs_off() {
    let t0 = Instant::now();
    let mut m = released(t0);
    m.set_wanted(true, t0);
    m.on_sent(t0, ProtectionRequest::enable(1));
    let rejected = Err(ProtectionError::Rejected(
        Rejection::new("DEPLOYMENT_BLOCKED").with_status(200),
    ));
    m.on_answer(t0, rejected);
    assert_eq!(m.phase(t0), Phase::Rejected);
    assert_eq!(m.poll(t0), Next::Wait(Some(t0 + Duration::from_secs(10))));
    let t1 = t0 + Duration::from_secs(10);
    m.on_sent(t1, ProtectionRequest::enable(1));
    let e = m.on_answer(t1, Err(ProtectionError::Timeout(Duration::from_secs(8))));
    let Effect::Failed { retry_in, .. } = e else {
        panic!("{e:?}")
    };
    assert!(retry_in >= Duration::from_millis(100) && retry_in <= Duration::from_millis(200));
    assert!(
        m.might_be_protected(t1),
        "a timed-out enable may have been applied"
    );
    assert!(!m.is_protected(t1), "but it is no promise");
    m.set_wanted(false, t1);
    // The agent may still be on the abandoned call for its ~4 s budget.
    assert!(matches!(m.poll(t1 + Duration::from_secs(1)), Next::Wait(_)));
    assert!(matches!(m.poll(t1 + Duration::from_secs(5)), Next::Put(r) if !r.enabled));
}

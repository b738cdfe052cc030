//! Background work that runs now and then until the process stops.

use std::future::Future;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

/// Runs `tick` every `period`, the first time at once, until `stop`. A tick that takes longer
/// than the period delays the next one instead of bunching them up; a running tick finishes
/// before `stop` is looked at again.
pub async fn every<F, Fut>(period: Duration, stop: impl Future<Output = ()>, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = ticks.tick() => {}
        }
        tick().await;
    }
}

//! The simulation's scheduler for one actor's step: its future runs on a single-threaded
//! tokio runtime whose time is paused, wrapped so that every `Pending` is an await point at
//! which the actor may crash.
//!
//! Nothing in a step waits on anything but the memory log, the memory read model, the memory
//! deadlines and tokio's timers (the command handler's backoff after a conflict). With time
//! paused, a timer fires as soon as nothing else can run, so a step runs to its end at once,
//! in one order. The [`FaultyLog`](crate::faults::FaultyLog) adds a `Pending` before and after
//! each of its calls on purpose. Dropping the future at one of them is exactly a crash there:
//! nothing after the await runs, and whatever the actor kept in memory is thrown away by the
//! caller.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::runtime::Runtime;

/// The runtime steps run on: one thread, time paused.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime builds")
}

/// Runs `step` to the end, or drops it at its `crash_at`-th await point (1-based) and
/// returns `None`. A step that finishes before reaching that point does not crash.
pub fn run_step<F: Future>(runtime: &Runtime, step: F, crash_at: Option<u32>) -> Option<F::Output> {
    runtime.block_on(CrashAt {
        step: Box::pin(step),
        crash_at,
        awaits: 0,
    })
}

struct CrashAt<F> {
    step: Pin<Box<F>>,
    crash_at: Option<u32>,
    awaits: u32,
}

impl<F: Future> Future for CrashAt<F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.step.as_mut().poll(cx) {
            Poll::Ready(output) => Poll::Ready(Some(output)),
            Poll::Pending => {
                self.awaits += 1;
                if Some(self.awaits) == self.crash_at {
                    return Poll::Ready(None);
                }
                Poll::Pending
            }
        }
    }
}

/// An await point: pending once, then ready.
#[derive(Default)]
pub struct AwaitPoint(bool);

impl Future for AwaitPoint {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

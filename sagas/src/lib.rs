//! Process managers of groupbuy.
//!
//! - [`order_saga`]: drives every order from placed to final through stock reservation and
//!   payment, with compensations (release, cancel, refund). It runs as a subscription of the
//!   log's mirror, takes its triggers in batches, and hands each campaign's orders to
//!   [`campaign_writer`]: the campaign's single writer in this instance, which decides many
//!   wake-ups with [`domain::saga::advance`] in memory and appends them together.
//! - [`deadlines`]: persisted payment deadlines, fired by whichever instance is alive.
//! - [`sweeper`]: finds orders that wait past a bound (their trigger dead-lettered, their
//!   deadline lost) and wakes the saga for them.
//! - [`payments`]: the payment provider (simulated, or external with a signed webhook) and the
//!   one way a provider's answer enters the log.

pub mod campaign_writer;
pub mod deadlines;
pub mod order_saga;
pub mod payments;
pub mod sweeper;

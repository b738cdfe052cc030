//! Process managers of groupbuy.
//!
//! - [`order_saga`]: drives every order from placed to final through stock reservation and
//!   payment, with compensations (release, cancel, refund). It runs as a subscription of the
//!   log's mirror and decides with [`domain::saga::plan`].
//! - [`deadlines`]: persisted payment deadlines, fired by whichever instance is alive.
//! - [`payments`]: the payment provider (simulated, or external with a signed webhook) and the
//!   one way a provider's answer enters the log.

pub mod deadlines;
pub mod order_saga;
pub mod payments;

//! The shape every aggregate shares, so that loading, deciding and appending is written once.

use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::DomainError;

/// A consistency boundary: one event stream, folded into a state, deciding commands.
///
/// `decide` and `evolve` are pure. `evolve` trusts its events (they were decided against the
/// same rules) and asserts the aggregate's invariants after applying them: a violation there is
/// a bug or a corrupted log, never something to clamp quietly.
pub trait Aggregate: 'static {
    /// The stream category, the prefix of every stream id of this aggregate (`campaign-<id>`).
    const CATEGORY: &'static str;
    /// The shape of `State` as stored in snapshots. Bump it when `State` changes shape, and
    /// snapshots of the old shape are ignored (the stream is folded from its events instead).
    const STATE_VERSION: u32 = 1;
    /// What `evolve` folds the stream into. `Default` is the state of a stream with no events.
    type State: Default + Clone + Debug + Serialize + DeserializeOwned + Send + Sync;
    /// What the aggregate can be asked to do.
    type Command: Debug + Send + Sync;
    /// What the aggregate records.
    type Event: Clone + Debug + PartialEq + Serialize + DeserializeOwned + Send + Sync;

    /// Decides what happens, without changing anything.
    fn decide(
        state: &Self::State,
        command: &Self::Command,
    ) -> Result<Vec<Self::Event>, DomainError>;

    /// Applies one recorded event.
    fn evolve(state: Self::State, event: &Self::Event) -> Self::State;

    /// Folds a whole history.
    fn fold<'a>(events: impl IntoIterator<Item = &'a Self::Event>) -> Self::State
    where
        Self::Event: 'a,
    {
        events
            .into_iter()
            .fold(Self::State::default(), Self::evolve)
    }
}

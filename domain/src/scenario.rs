//! Given/when/then for deciders: `given::<CampaignAggregate>([..]).when(cmd).then([..])`.
//!
//! A scenario folds the given events, decides the command, and compares the outcome. It is a
//! plain library module (not `cfg(test)`) so that sagas and other crates can test with it too.

use crate::{Aggregate, DomainError};

/// A state reached by folding past events.
pub struct Given<A: Aggregate> {
    state: A::State,
}

/// Starts a scenario from a history of events.
pub fn given<A: Aggregate>(events: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let state = events
        .into_iter()
        .fold(A::State::default(), |s, e| A::evolve(s, &e));
    Given { state }
}

impl<A: Aggregate> Given<A> {
    /// Decides a command against the given history.
    pub fn when(self, command: A::Command) -> Then<A> {
        let outcome = A::decide(&self.state, &command);
        Then {
            state: self.state,
            outcome,
        }
    }
}

/// The outcome of a decision, to be checked.
pub struct Then<A: Aggregate> {
    state: A::State,
    outcome: Result<Vec<A::Event>, DomainError>,
}

impl<A: Aggregate> Then<A> {
    /// Asserts exactly these events were decided, and that they apply cleanly.
    /// Returns the state after them for further checks.
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = A::Event>) -> A::State {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.outcome {
            Ok(events) => {
                assert_eq!(events, expected, "decided events differ");
                events.iter().fold(self.state, A::evolve)
            }
            Err(error) => panic!("expected events {expected:?}, got error {error:?}"),
        }
    }

    /// Asserts the command was accepted with no new event (it was already done).
    #[track_caller]
    pub fn then_nothing(self) {
        self.then([]);
    }

    /// Asserts the command was refused with this error.
    #[track_caller]
    pub fn then_err(self, expected: DomainError) {
        match self.outcome {
            Ok(events) => panic!("expected error {expected:?}, got events {events:?}"),
            Err(error) => assert_eq!(error, expected),
        }
    }
}

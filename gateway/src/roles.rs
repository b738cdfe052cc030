//! The roles a `serve` process runs. Any mix of processes with any roles, on one database,
//! one NATS and one Redis, forms one deployment: each role shares its work with the other
//! processes that run it (the relay by its lease, the consumers by their durable consumers,
//! the deadlines by their claims), so a fleet scales each role on its own.

use std::collections::BTreeSet;
use std::fmt;

/// One part of the system a process can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Role {
    /// The HTTP API: commands and queries.
    Gateway,
    /// The outbox relay mirroring the log into the bus (one leader among the processes
    /// that run it).
    Relay,
    /// The order saga, consuming the mirror, with the campaigns' writers.
    Saga,
    /// The projections, consuming the mirror into the read models, and the read models'
    /// self-healing.
    Projections,
    /// The payment deadlines and the sweeper of stuck orders, which wake the saga.
    Deadlines,
}

impl Role {
    /// Every role, in the order they are listed.
    pub const ALL: [Role; 5] = [
        Role::Gateway,
        Role::Relay,
        Role::Saga,
        Role::Projections,
        Role::Deadlines,
    ];

    /// Its name, as `--roles` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Relay => "relay",
            Role::Saga => "saga",
            Role::Projections => "projections",
            Role::Deadlines => "deadlines",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The roles of one process: at least one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Roles(BTreeSet<Role>);

impl Roles {
    /// Every role: what `serve` runs by default.
    pub fn all() -> Roles {
        Roles(Role::ALL.into_iter().collect())
    }

    /// These roles; `None` when there are none.
    pub fn of(roles: impl IntoIterator<Item = Role>) -> Option<Roles> {
        let roles: BTreeSet<Role> = roles.into_iter().collect();
        (!roles.is_empty()).then_some(Roles(roles))
    }

    /// Whether the process runs `role`.
    pub fn runs(&self, role: Role) -> bool {
        self.0.contains(&role)
    }

    /// Whether it runs every role.
    pub fn are_all(&self) -> bool {
        self.0.len() == Role::ALL.len()
    }

    /// Their names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|r| r.as_str()).collect()
    }
}

impl Default for Roles {
    fn default() -> Self {
        Roles::all()
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_a_set_of_at_least_one() {
        assert!(Roles::of([]).is_none());
        let two = Roles::of([Role::Saga, Role::Gateway, Role::Saga]).unwrap();
        assert_eq!(two.to_string(), "gateway,saga");
        assert!(two.runs(Role::Saga) && !two.runs(Role::Relay) && !two.are_all());
        assert!(Roles::all().are_all());
        assert_eq!(Roles::default(), Roles::all());
    }
}

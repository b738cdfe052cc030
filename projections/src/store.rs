//! The write side of a read-model store: live applies, and versions for rebuilds.
//!
//! Each projection has versions, each in a keyspace of its own. One is **live** (queries read
//! it); while a rebuild runs, another is **building**. A live event is applied to every
//! version, with the event's stream version as the dedupe key, stored atomically with the
//! data:
//!
//! - to the live version, unless it holds that stream version already;
//! - to a building version only when it is the stream's next version there. An earlier gap
//!   means the rebuild has not read that stream so far; it will, from the log, and the live
//!   event is among what it reads, so skipping it loses nothing.
//!
//! The rebuild reads the log from the start into its version, skipping what live applies put
//! there first. Once it has read to the head of the log, every event is in its version or
//! will be applied to it live, so it switches: the building version becomes the live one, in
//! one atomic step, and the old one is dropped.

use std::time::Duration;

use async_trait::async_trait;

use crate::ops::{Change, ProjectionName};
use crate::read_model::{ReadModel, ReadModelError};

/// Where a version of a projection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionStatus {
    /// Queries read it.
    Live,
    /// A rebuild is filling it.
    Building,
}

impl VersionStatus {
    /// Its name in the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionStatus::Live => "live",
            VersionStatus::Building => "building",
        }
    }
}

/// One version of one projection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectionVersion {
    /// The projection.
    pub name: ProjectionName,
    /// Its version number, increasing with every rebuild.
    pub version: u32,
    /// Live or building.
    pub status: VersionStatus,
    /// The highest global position it applied.
    pub position: u64,
    /// Events it applied.
    pub events: u64,
}

/// What a live apply did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// The live version when it ran; `None` when the projection has none yet.
    pub live: Option<u32>,
    /// Whether the live version took the change (false when it held it already).
    pub applied: bool,
}

/// A rebuild could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// Another rebuild of the projection holds its lease.
    #[error("a rebuild of {0} is already running")]
    Busy(ProjectionName),
    /// This rebuild's lease lapsed and another took over.
    #[error("the rebuild of {name} version {version} lost its lease")]
    LeaseLost {
        /// Which projection.
        name: ProjectionName,
        /// Which version.
        version: u32,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] ReadModelError),
    /// The log could not be read.
    #[error("event log: {0}")]
    Log(#[from] commands::LogError),
    /// An event in the log did not decode.
    #[error("event log: {0}")]
    Schema(#[from] schemas::SchemaError),
}

/// Writes and versions of read models.
#[async_trait]
pub trait ProjectionStore: ReadModel {
    /// Applies a live event to the live version and every building version (see the module
    /// docs). Applying it again changes nothing.
    async fn apply(
        &self,
        name: ProjectionName,
        change: &Change,
    ) -> Result<ApplyOutcome, ReadModelError>;

    /// Applies live events in order, as [`ProjectionStore::apply`] does each, in one round
    /// trip where the store can; an outcome per change.
    async fn apply_all(
        &self,
        name: ProjectionName,
        changes: &[Change],
    ) -> Result<Vec<ApplyOutcome>, ReadModelError> {
        let mut outcomes = Vec::with_capacity(changes.len());
        for change in changes {
            outcomes.push(self.apply(name, change).await?);
        }
        Ok(outcomes)
    }

    /// Records `version` of `stream_id` as done in the live version without any effect: for
    /// an event that was dead-lettered, so the stream's later events do not wait for it.
    async fn skip(
        &self,
        name: ProjectionName,
        stream_id: &str,
        version: u64,
    ) -> Result<(), ReadModelError>;

    /// Every version of every projection.
    async fn versions(&self) -> Result<Vec<ProjectionVersion>, ReadModelError>;

    /// Starts a rebuild of `name`: a new, empty version that live events start to reach.
    /// The rebuild holds a lease for `lease`, renewed by every [`rebuild_apply`]; a rebuild
    /// that stops renewing it is abandoned, and the next one removes its version.
    ///
    /// [`rebuild_apply`]: ProjectionStore::rebuild_apply
    async fn begin_rebuild(
        &self,
        name: ProjectionName,
        lease: Duration,
    ) -> Result<u32, RebuildError>;

    /// Applies events read from the log, in log order, to the version being built, and
    /// renews the lease.
    async fn rebuild_apply(
        &self,
        name: ProjectionName,
        version: u32,
        changes: &[Change],
        lease: Duration,
    ) -> Result<(), RebuildError>;

    /// Makes the built version the live one, atomically, and returns the version it replaced,
    /// which no longer receives events and is left for [`drop_version`].
    ///
    /// [`drop_version`]: ProjectionStore::drop_version
    async fn finish_rebuild(
        &self,
        name: ProjectionName,
        version: u32,
    ) -> Result<Option<u32>, RebuildError>;

    /// Gives up a rebuild: its version stops receiving events and is removed.
    async fn abandon_rebuild(
        &self,
        name: ProjectionName,
        version: u32,
    ) -> Result<(), ReadModelError>;

    /// Removes a version that is neither live nor building.
    async fn drop_version(&self, name: ProjectionName, version: u32) -> Result<(), ReadModelError>;
}

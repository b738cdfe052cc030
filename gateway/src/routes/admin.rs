//! Operator endpoints: read-model versions and rebuilds, and the reconciliation audit.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use projections::audit::{AuditOptions, AuditReport};
use projections::{ProjectionName, ProjectionStore, RebuildError};
use serde::Serialize;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// One version of one read model.
#[derive(Debug, Serialize)]
pub struct ProjectionBody {
    /// `campaigns` or `orders`.
    pub name: &'static str,
    /// Increases with every rebuild.
    pub version: u32,
    /// `live` (queries read it) or `building` (a rebuild is filling it).
    pub status: &'static str,
    /// The highest global log position it applied.
    pub position: u64,
    /// Events of its streams in the log past `position`.
    pub lag: u64,
    /// Events it applied.
    pub events: u64,
}

/// `{items}`.
#[derive(Debug, Serialize)]
pub struct Items<T> {
    /// The items.
    pub items: Vec<T>,
}

/// `GET /v1/admin/projections`: every version of every read model, with its lag.
pub async fn projections(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Items<ProjectionBody>>, ApiError> {
    caller.require_operator()?;
    let log = state.handler.log();
    let mut items = Vec::new();
    for v in state.read_model.versions().await? {
        let lag = log.count_after(v.position, v.name.categories()).await?;
        items.push(ProjectionBody {
            name: v.name.as_str(),
            version: v.version,
            status: v.status.as_str(),
            position: v.position,
            lag,
            events: v.events,
        });
    }
    Ok(Json(Items { items }))
}

/// A rebuild that started.
#[derive(Debug, Serialize)]
pub struct RebuildBody {
    /// The read model.
    pub name: &'static str,
    /// The version being built.
    pub version: u32,
    /// `building`.
    pub status: &'static str,
}

/// `POST /v1/admin/projections/{name}/rebuild`: starts building a new version from the log;
/// it becomes live once it has caught up. Follow it with `GET /v1/admin/projections`.
pub async fn rebuild(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<RebuildBody>), ApiError> {
    caller.require_operator()?;
    let name: ProjectionName = name.parse().map_err(|_| ApiError::NotFound {
        code: "projection_not_found",
        what: "projection",
    })?;
    let store: Arc<dyn ProjectionStore> = Arc::clone(&state.read_model);
    let version = projections::rebuild::begin(store.as_ref(), name, &state.rebuild)
        .await
        .map_err(|error| match error {
            RebuildError::Busy(_) => ApiError::Conflict {
                code: "rebuild_in_progress",
                detail: format!("a rebuild of {name} is already running"),
            },
            other => ApiError::Unavailable {
                code: "read_model_unavailable",
                detail: other.to_string(),
                retry_after_s: 1,
            },
        })?;
    let log = Arc::clone(state.handler.log());
    let options = state.rebuild.clone();
    tokio::spawn(async move {
        // Failures are logged by the rebuild, which gives its version up; the live one stays.
        let _ = projections::rebuild::run(
            log.as_ref(),
            store.as_ref(),
            name,
            version,
            &options,
            &|_| {},
        )
        .await;
    });
    tracing::info!(projection = %name, version, "rebuild started");
    Ok((
        StatusCode::ACCEPTED,
        Json(RebuildBody {
            name: name.as_str(),
            version,
            status: "building",
        }),
    ))
}

/// `GET /v1/admin/audit`: replays the whole log against the invariants and compares the
/// read models with a fresh fold. One audit runs at a time.
pub async fn audit(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<AuditReport>, ApiError> {
    caller.require_operator()?;
    let Ok(_running) = Arc::clone(&state.audits).try_acquire_owned() else {
        return Err(ApiError::Conflict {
            code: "audit_in_progress",
            detail: "an audit is already running; try again when it is done".into(),
        });
    };
    let report = projections::audit::audit(
        state.handler.log().as_ref(),
        Some(state.read_model.as_ref()),
        &AuditOptions::default(),
        &|_| {},
    )
    .await
    .map_err(|error| match error {
        projections::audit::AuditError::Log(error) => ApiError::from(error),
        projections::audit::AuditError::ReadModel(error) => ApiError::from(error),
    })?;
    if !report.ok {
        tracing::error!(
            violations = report.violations.len(),
            "the audit found violations"
        );
    }
    Ok(Json(report))
}

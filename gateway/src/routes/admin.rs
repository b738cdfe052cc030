//! Operator endpoints: read-model versions and rebuilds, and the reconciliation audit.

use std::sync::Arc;

use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use projections::audit::{AuditOptions, AuditReport};
use projections::{ProjectionName, ProjectionStore, RebuildError};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::query;
use crate::state::AppState;

/// One version of one read model.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Projection)]
pub struct ProjectionBody {
    /// `campaigns` or `orders`.
    #[schema(value_type = ProjectionNameBody)]
    pub name: &'static str,
    /// Increases with every rebuild.
    pub version: u32,
    /// `live` (queries read it) or `building` (a rebuild is filling it).
    #[schema(value_type = ProjectionStatusBody)]
    pub status: &'static str,
    /// The highest global log position it applied.
    pub position: u64,
    /// Events of its streams in the log past `position`.
    pub lag: u64,
    /// Events it applied.
    pub events: u64,
}

/// The read models' versions.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ProjectionList)]
pub struct ProjectionListBody {
    /// Every live or building version of every read model.
    pub items: Vec<ProjectionBody>,
}

/// The read models, by name.
#[derive(ToSchema)]
#[schema(as = ProjectionName, rename_all = "snake_case")]
#[allow(dead_code)] // Only describes `ProjectionName::as_str`.
pub enum ProjectionNameBody {
    /// Campaigns with their stock.
    Campaigns,
    /// Orders with their payment.
    Orders,
}

/// Where a version of a read model stands.
#[derive(ToSchema)]
#[schema(as = ProjectionStatus, rename_all = "snake_case")]
#[allow(dead_code)] // Only describes `VersionStatus::as_str`.
pub enum ProjectionStatusBody {
    /// Queries read it.
    Live,
    /// A rebuild is filling it.
    Building,
}

/// The path of one read model.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // Only describes the path; an unknown name is a 404.
pub struct ProjectionPath {
    /// `campaigns` or `orders`.
    name: String,
}

/// `GET /v1/admin/projections`: every version of every read model, with its lag.
#[utoipa::path(
    get,
    path = "/v1/admin/projections",
    operation_id = "list_projections",
    tag = "operations",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every version of every read model", body = ProjectionListBody),
        (status = 403, description = "Only the operator sees read models"),
    )
)]
pub async fn projections(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<ProjectionListBody>, ApiError> {
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
    Ok(Json(ProjectionListBody { items }))
}

/// A rebuild that started.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Rebuild)]
pub struct RebuildBody {
    /// The read model.
    #[schema(value_type = ProjectionNameBody)]
    pub name: &'static str,
    /// The version being built.
    pub version: u32,
    /// `building`.
    #[schema(value_type = ProjectionStatusBody)]
    pub status: &'static str,
}

/// `POST /v1/admin/projections/{name}/rebuild`: starts building a new version from the log;
/// it becomes live once it has caught up. Follow it with `GET /v1/admin/projections`.
#[utoipa::path(
    post,
    path = "/v1/admin/projections/{name}/rebuild",
    operation_id = "rebuild_projection",
    tag = "operations",
    security(("bearer" = [])),
    params(ProjectionPath),
    responses(
        (status = 202, description = "Building; queries read the live version until this one has caught up", body = RebuildBody),
        (status = 403, description = "Only the operator rebuilds read models"),
        (status = 404, description = "No such read model (`projection_not_found`)"),
        (status = 409, description = "A rebuild of this read model is running (`rebuild_in_progress`)"),
    )
)]
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

/// The longest bound the audit takes, in seconds: 30 days.
const AUDIT_BOUND_S_MAX: u64 = 30 * 24 * 60 * 60;

/// How patient the audit is with orders still on their way.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Seconds an order may sit between saga steps before it counts as inconsistent; 120
    /// when not given.
    #[param(minimum = 0, maximum = 2_592_000)]
    settle_seconds: Option<u64>,
    /// Seconds an order may stay `pending`, or `awaiting_payment` past its deadline, before it
    /// counts as stuck (`order_stuck`); 300 when not given.
    #[param(minimum = 0, maximum = 2_592_000)]
    stuck_after_seconds: Option<u64>,
}

/// `GET /v1/admin/audit`: replays the whole log against the invariants and compares the
/// read models with a fresh fold. One audit runs at a time.
#[utoipa::path(
    get,
    path = "/v1/admin/audit",
    operation_id = "audit",
    tag = "operations",
    security(("bearer" = [])),
    params(AuditQuery),
    responses(
        (status = 200, description = "The report; `ok` is true exactly when `violations` is empty", body = AuditReport),
        (status = 400, description = "An unknown query parameter, or a bound out of range (`invalid_query`)"),
        (status = 403, description = "Only the operator audits"),
        (status = 409, description = "An audit is running on this instance (`audit_in_progress`)"),
    )
)]
pub async fn audit(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Json<AuditReport>, ApiError> {
    caller.require_operator()?;
    let q: AuditQuery = query(raw.as_deref())?;
    let defaults = AuditOptions::default();
    let bound = |given: Option<u64>, default: Duration| match given {
        None => Ok(default),
        Some(s) if s <= AUDIT_BOUND_S_MAX => Ok(Duration::from_secs(s)),
        Some(_) => Err(ApiError::BadRequest {
            code: "invalid_query",
            detail: format!("bounds are at most {AUDIT_BOUND_S_MAX} seconds"),
        }),
    };
    let options = AuditOptions {
        settle: bound(q.settle_seconds, defaults.settle)?,
        stuck_after: bound(q.stuck_after_seconds, defaults.stuck_after)?,
        ..defaults
    };
    let Ok(_running) = Arc::clone(&state.audits).try_acquire_owned() else {
        return Err(ApiError::Conflict {
            code: "audit_in_progress",
            detail: "an audit is already running; try again when it is done".into(),
        });
    };
    let report = projections::audit::audit(
        state.handler.log().as_ref(),
        Some(state.read_model.as_ref()),
        &options,
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

/// The outbox relay as this process sees it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Relay)]
pub struct RelayBody {
    /// `leader` (this process publishes the log to the bus), `standby` (another process
    /// does) or `not_run` (this process does not run the relay role).
    pub role: &'static str,
    /// The global log position this process's relay published and checkpointed; 0 unless
    /// it leads or led.
    pub position: u64,
    /// The log's last global position.
    pub head: u64,
    /// Events of the log past `position`, when this process leads; `null` otherwise, since
    /// only the leader knows where the mirror stands.
    pub lag: Option<u64>,
    /// Events this process's relay published since it started.
    pub published: u64,
}

/// `GET /v1/admin/relay`: this process's outbox relay: whether it leads, where it stands and
/// how far behind the log.
#[utoipa::path(
    get,
    path = "/v1/admin/relay",
    operation_id = "get_relay",
    tag = "operations",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The relay as this process sees it", body = RelayBody),
        (status = 403, description = "Only the operator sees the relay"),
        (status = 503, description = "The event log cannot be reached (`log_unavailable`)"),
    )
)]
pub async fn relay(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<RelayBody>, ApiError> {
    caller.require_operator()?;
    let status = *state.relay.borrow();
    let role = crate::routes::health::relay_role(&state);
    let head = state.handler.log().head().await?;
    let position = status.position.global_position;
    Ok(Json(RelayBody {
        role,
        position,
        head,
        lag: status.leader.then(|| head.saturating_sub(position)),
        published: status.published,
    }))
}

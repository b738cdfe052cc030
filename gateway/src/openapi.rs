//! The OpenAPI 3 document of API.md, generated from the routes (`#[utoipa::path]` on each
//! handler) and the bodies they send and take (`ToSchema` on each). Served at `/openapi.json`,
//! and browsable at `/docs`.
//!
//! What every route shares is added here once, by [`Conventions`], because it comes from layers
//! and extractors rather than from the handler: 429 and 503 from the rate limits and the
//! overload guard, 401 from the bearer token, 413 and the malformed-JSON 400 from the body
//! extractor, the Idempotency-Key answers from [`crate::idempotency`], the `traceparent`
//! header every request may carry, and the pattern of every id (a string of format `ulid`).
//! Routes document their own errors by status and reason only; each is given the
//! problem+json body here.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::header::Header;
use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ArrayItems, KnownFormat, SchemaFormat};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, ObjectBuilder, Ref, RefOr, Required, Response, ResponseBuilder, Schema, Type,
};
use utoipa::{IntoParams, Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

use crate::routes::{admin, campaigns, health, orders, payments, stores, users};

/// The name of the bearer-token security scheme. Routes name it as the literal `"bearer"` in
/// their `security(...)`, which takes no constants.
pub const BEARER: &str = "bearer";
/// The media type of every error.
pub const PROBLEM_JSON: &str = "application/problem+json";
/// What a ULID looks like: 26 Crockford base-32 digits, the first at most 7 (128 bits). Ids are
/// read without regard to case.
pub const ULID_PATTERN: &str = "^[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}$";

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "groupbuy",
        version = "1",
        description = "Group-buy deals on drinks: stores publish campaigns, customers order, \
            stock is never oversold, and a saga drives every order through payment to a final \
            state. Errors are application/problem+json (RFC 9457) with a stable `code`."
    ),
    paths(
        users::create,
        stores::create,
        campaigns::create,
        campaigns::list,
        campaigns::get,
        campaigns::replenish,
        campaigns::close,
        orders::place,
        orders::list,
        orders::get,
        orders::cancel,
        orders::events,
        payments::webhook,
        admin::projections,
        admin::rebuild,
        admin::audit,
        admin::relay,
        crate::routes::sales::get,
        crate::routes::sales::live,
        crate::routes::history::stream_events,
        crate::routes::history::order_history,
        crate::routes::history::campaign_as_of,
        crate::routes::dead_letters::list,
        crate::routes::dead_letters::show,
        crate::routes::dead_letters::replay,
        crate::routes::dead_letters::discard,
        health::healthz,
        health::readyz,
        crate::metrics::metrics,
        document,
    ),
    components(schemas(crate::error::Problem, crate::routes::history::AsOfParam)),
    modifiers(&Conventions),
    tags(
        (name = "catalog", description = "Customers, stores and campaigns"),
        (name = "orders", description = "Placing, following and cancelling orders"),
        (name = "payments", description = "The payment provider's answers"),
        (name = "operations", description = "Read models, audits, health and metrics"),
    )
)]
pub struct ApiDoc;

/// `GET /openapi.json`: this document, built once.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3 document of this API", body = Object))
)]
pub async fn document() -> impl IntoResponse {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let document = DOCUMENT.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .expect("the document serializes")
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        document.as_str(),
    )
}

/// The browsable document: Swagger UI at `/docs`, reading `/openapi.json`. Its assets are
/// compiled in, so it works without reaching the internet.
pub fn browser<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    SwaggerUi::new("/docs")
        .config(utoipa_swagger_ui::Config::from("/openapi.json"))
        .into()
}

/// The `Idempotency-Key` header, as [`crate::extract::IdempotencyKeyHeader`] reads it.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // Only describes the header.
pub struct IdempotencyKey {
    /// Same key and same body within 24 h: the first answer is replayed, with
    /// `Idempotent-Replayed: true`. Scoped per caller.
    #[param(
        rename = "Idempotency-Key",
        min_length = 1,
        max_length = 255,
        pattern = "^[!-~]+$"
    )]
    idempotency_key: Option<String>,
}

/// The `Idempotency-Key` header where it is required (`POST /v1/orders`).
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // Only describes the header.
pub struct RequiredIdempotencyKey {
    /// Required. Same key and same body within 24 h: the first answer is replayed, with
    /// `Idempotent-Replayed: true`. Scoped per caller.
    #[param(
        rename = "Idempotency-Key",
        min_length = 1,
        max_length = 255,
        pattern = "^[!-~]+$"
    )]
    idempotency_key: String,
}

/// Adds what every route shares (see the module's documentation).
pub struct Conventions;

impl Modify for Conventions {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The operator's token from configuration, or a customer's token \
                         from POST /v1/users",
                    ))
                    .build(),
            ),
        );
        for schema in components.schemas.values_mut() {
            pattern_ulids(schema);
        }
        for (path, item) in openapi.paths.paths.iter_mut() {
            let operations = [
                item.get.as_mut(),
                item.post.as_mut(),
                item.put.as_mut(),
                item.delete.as_mut(),
                item.patch.as_mut(),
            ];
            for operation in operations.into_iter().flatten() {
                problems_as_bodies(operation);
                apply(path, operation);
            }
        }
    }
}

/// Every error a route documents without a body is a problem+json [`crate::error::Problem`]:
/// routes write only the status and the reason.
fn problems_as_bodies(operation: &mut Operation) {
    for (status, response) in operation.responses.responses.iter_mut() {
        let is_error = status.parse::<u16>().is_ok_and(|s| s >= 400);
        if let RefOr::T(response) = response {
            if is_error && response.content.is_empty() {
                response
                    .content
                    .insert(PROBLEM_JSON.into(), RefOr::T(problem_content()));
            }
        }
    }
}

/// Gives every string of format `ulid` in `schema` the [`ULID_PATTERN`].
fn pattern_ulids(schema: &mut RefOr<Schema>) {
    let RefOr::T(schema) = schema else { return };
    match schema {
        Schema::Object(object) => {
            if object.format == Some(SchemaFormat::KnownFormat(KnownFormat::Ulid)) {
                object.pattern = Some(ULID_PATTERN.into());
            }
            object.properties.values_mut().for_each(pattern_ulids);
        }
        Schema::Array(array) => {
            if let ArrayItems::RefOrSchema(items) = &mut array.items {
                pattern_ulids(items);
            }
        }
        Schema::OneOf(one_of) => one_of.items.iter_mut().for_each(pattern_ulids),
        Schema::AllOf(all_of) => all_of.items.iter_mut().for_each(pattern_ulids),
        Schema::AnyOf(any_of) => any_of.items.iter_mut().for_each(pattern_ulids),
        _ => {}
    }
}

/// The shared answers and headers of one operation at `path`.
fn apply(path: &str, operation: &mut Operation) {
    let parameters = operation.parameters.get_or_insert_with(Vec::new);
    for parameter in parameters.iter_mut() {
        if let RefOr::T(Parameter {
            schema: Some(schema),
            ..
        }) = parameter
        {
            pattern_ulids(schema);
        }
    }
    parameters.push(RefOr::T(header(
        "traceparent",
        "W3C trace context: the request joins this trace, and so do the events it records \
         and everything the saga and the read models do with them. Unreadable values start a \
         new trace.",
    )));
    let idempotent = parameters
        .iter()
        .any(|p| matches!(p, RefOr::T(p) if p.name == "Idempotency-Key"));
    let secured = operation.security.as_ref().is_some_and(|s| !s.is_empty());
    let has_body = operation.request_body.is_some();
    if secured {
        add(
            operation,
            401,
            "No bearer token, or one that matches nobody",
            false,
        );
    }
    if has_body {
        add(
            operation,
            400,
            "The body is not JSON, or names a field twice",
            false,
        );
        add(operation, 413, "The body is over the limit (64 KiB)", false);
        add(
            operation,
            415,
            "The Content-Type is neither `application/json` nor `application/*+json` (none at \
             all is taken as JSON)",
            false,
        );
        add(
            operation,
            422,
            "The body is JSON of the wrong shape: unknown or missing fields, wrong types, \
             numbers out of range",
            false,
        );
    }
    if idempotent {
        add(operation, 400, "The Idempotency-Key is malformed", false);
        add(
            operation,
            409,
            "A request with this Idempotency-Key is still running (`idempotency_key_in_use`); \
             retry after `Retry-After` seconds",
            true,
        );
        add(
            operation,
            422,
            "This Idempotency-Key came with another request (`idempotency_key_reused`)",
            false,
        );
    }
    if path.starts_with("/v1/") {
        add(
            operation,
            429,
            "Over the customer's or the instance's rate limit (`rate_limited`); retry after \
             `Retry-After` seconds",
            true,
        );
        add(
            operation,
            503,
            "Too many requests in flight, the request ran out of time, or a dependency is \
             down; retry after `Retry-After` seconds",
            true,
        );
    }
}

/// An optional string header.
fn header(name: &str, description: &str) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(description))
        .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
        .build()
}

/// Adds a problem answer for `status`, or, when the route already documents that status, adds
/// this reason to its description.
fn add(operation: &mut Operation, status: u16, reason: &str, retry_after: bool) {
    let responses = &mut operation.responses.responses;
    match responses.get_mut(&status.to_string()) {
        Some(RefOr::T(existing)) => {
            if !existing.description.contains(reason) {
                existing.description = format!("{}. Or: {reason}", existing.description);
            }
            if !existing.content.contains_key(PROBLEM_JSON) {
                existing
                    .content
                    .insert(PROBLEM_JSON.into(), RefOr::T(problem_content()));
            }
        }
        Some(RefOr::Ref(_)) => {}
        None => {
            responses.insert(status.to_string(), RefOr::T(problem(reason, retry_after)));
        }
    }
}

fn problem_content() -> utoipa::openapi::Content {
    ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("Problem")))
        .build()
}

fn problem(reason: &str, retry_after: bool) -> Response {
    let mut response = ResponseBuilder::new()
        .description(reason)
        .content(PROBLEM_JSON, problem_content());
    if retry_after {
        response = response.header(
            "Retry-After",
            Header::new(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0)),
            ),
        );
    }
    response.build()
}

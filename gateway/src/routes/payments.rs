//! `POST /v1/payments/webhook`: the payment provider's answer, signed.
//!
//! Header `X-Groupbuy-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`.
//! Missing or malformed: 400. Wrong signature, or `t` more than 300 s from now: 401. Unknown
//! payment: 404. The same answer delivered again: 200 and no second effect (its command id
//! derives from the answer). A contrary answer after a final one: 200, recorded nowhere.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use commands::CommandError;
use domain::PaymentId;
use hmac::{Hmac, Mac};
use sagas::payments::{self, settle, Outcome};
use schemas::Metadata;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use utoipa::{IntoParams, ToSchema};

use crate::error::ApiError;
use crate::extract::{field_id, RawJson, Trace};
use crate::state::AppState;
use crate::views::PaymentStatusBody;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-groupbuy-signature";
/// How far the signed time may be from now.
pub const TOLERANCE_SECONDS: i64 = 300;

/// The provider's message.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = PaymentAnswer)]
pub struct WebhookBody {
    /// The payment, as the saga requested it (its id is the order's).
    #[schema(format = Ulid)]
    payment_id: String,
    /// What the provider decided.
    status: WebhookStatus,
    /// The provider's own id for the transaction: 1 to 200 characters.
    #[schema(min_length = 1, max_length = 200, pattern = "\\S")]
    provider_reference: String,
}

/// What the provider decided.
#[derive(Clone, Copy, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = PaymentOutcome)]
pub enum WebhookStatus {
    /// The money was taken.
    Succeeded,
    /// The payment was refused.
    Failed,
}

/// The answer: where the payment stands now.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = PaymentState)]
pub struct WebhookReply {
    #[schema(value_type = String, format = Ulid)]
    payment_id: PaymentId,
    status: PaymentStatusBody,
}

/// The signature header of `POST /v1/payments/webhook`.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // Only describes the header.
pub struct Signature {
    /// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>" under the webhook secret>`.
    #[param(
        rename = "X-Groupbuy-Signature",
        pattern = "^t=-?[0-9]{1,18},v1=[0-9a-fA-F]{64}$"
    )]
    signature: String,
}

fn bad_signature(detail: &str) -> ApiError {
    ApiError::BadRequest {
        code: "signature_malformed",
        detail: detail.into(),
    }
}

/// Parses `t=<seconds>,v1=<hex>`.
fn parse_signature(value: &str) -> Result<(i64, Vec<u8>), ApiError> {
    let mut time = None;
    let mut mac = None;
    for part in value.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => time = t.parse::<i64>().ok(),
            Some(("v1", v1)) => mac = hex::decode(v1).ok().filter(|m| m.len() == 32),
            _ => {}
        }
    }
    match (time, mac) {
        (Some(time), Some(mac)) => Ok((time, mac)),
        _ => Err(bad_signature(
            "X-Groupbuy-Signature must be t=<unix seconds>,v1=<64 hex digits>",
        )),
    }
}

/// Checks the signature of `body` against `secret` at `now` (unix seconds).
pub fn verify(secret: &[u8], header: Option<&str>, body: &[u8], now: i64) -> Result<(), ApiError> {
    let header = header.ok_or_else(|| ApiError::BadRequest {
        code: "signature_missing",
        detail: "the X-Groupbuy-Signature header is required".into(),
    })?;
    let (time, mac) = parse_signature(header)?;
    if (now - time).abs() > TOLERANCE_SECONDS {
        return Err(ApiError::InvalidSignature(
            "the signature's time is more than 300 s from now",
        ));
    }
    let mut expected = Hmac::<Sha256>::new_from_slice(secret).expect("any key length works");
    expected.update(time.to_string().as_bytes());
    expected.update(b".");
    expected.update(body);
    // Constant-time comparison.
    expected
        .verify_slice(&mac)
        .map_err(|_| ApiError::InvalidSignature("the signature does not match the body"))
}

/// `POST /v1/payments/webhook`.
#[utoipa::path(
    post,
    path = "/v1/payments/webhook",
    operation_id = "answer_payment",
    tag = "payments",
    params(Signature),
    request_body = WebhookBody,
    responses(
        (status = 200, description = "Taken, or already taken: the payment as it stands now", body = WebhookReply),
        (status = 400, description = "The signature header is missing or malformed"),
        (status = 401, description = "The signature does not match the body, or its time is more than 300 s from now (`invalid_signature`)"),
        (status = 404, description = "No such payment"),
        (status = 422, description = "`payment_id` is not an id, or `provider_reference` is blank or too long"),
    )
)]
pub async fn webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    Trace(trace): Trace,
    body: RawJson,
) -> Result<Json<WebhookReply>, ApiError> {
    let header = headers
        .get(SIGNATURE_HEADER)
        .map(|v| v.to_str().map_err(|_| bad_signature("not ASCII")))
        .transpose()?;
    verify(
        &state.webhook_secret,
        header,
        &body.0,
        chrono::Utc::now().timestamp(),
    )?;
    let message: WebhookBody = body.parse()?;
    let payment_id: PaymentId = field_id(&message.payment_id, "payment_id")?;
    if payments::load(&state.handler, payment_id).await?.is_none() {
        return Err(ApiError::NotFound {
            code: "payment_not_found",
            what: "payment",
        });
    }
    let outcome = match message.status {
        WebhookStatus::Succeeded => Outcome::Succeeded,
        WebhookStatus::Failed => Outcome::Failed,
    };
    let mut metadata = Metadata {
        actor: Some("payment_provider".into()),
        ..Metadata::default()
    };
    trace.stamp(&mut metadata);
    let payment = match settle(
        &state.handler,
        payment_id,
        outcome,
        &message.provider_reference,
        metadata,
    )
    .await
    {
        Ok(executed) => executed.state,
        // A contrary answer after a final one changes nothing.
        Err(CommandError::Domain(error))
            if !matches!(error, domain::DomainError::InvalidInput { .. }) =>
        {
            tracing::warn!(%payment_id, %error, "webhook answer refused by the payment");
            payments::load(&state.handler, payment_id).await?
        }
        Err(error) => return Err(error.into()),
    };
    let payment = payment.expect("the payment exists");
    Ok(Json(WebhookReply {
        payment_id,
        status: payment.status.into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn a_signature_is_checked_over_time_and_body() {
        let body = br#"{"x":1}"#;
        let header = sign(b"secret", 1_000, body);
        assert!(verify(b"secret", Some(&header), body, 1_000).is_ok());
        assert!(verify(b"secret", Some(&header), body, 1_300).is_ok());
        let status = |r: Result<(), ApiError>| r.unwrap_err().status().as_u16();
        assert_eq!(status(verify(b"secret", Some(&header), body, 1_301)), 401);
        assert_eq!(status(verify(b"other", Some(&header), body, 1_000)), 401);
        assert_eq!(status(verify(b"secret", Some(&header), b"{}", 1_000)), 401);
        assert_eq!(status(verify(b"secret", None, body, 1_000)), 400);
        assert_eq!(status(verify(b"secret", Some("t=1"), body, 1_000)), 400);
        assert_eq!(
            status(verify(b"secret", Some("v1=zz,t=x"), body, 1_000)),
            400
        );
    }
}

//! Business errors: every way a command can be refused. Each has a stable snake_case code that
//! the gateway puts in its problem+json answers and the saga records as a rejection reason.

/// A command was refused by the business rules. Nothing was decided, nothing is appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// A field is outside what the domain accepts (empty, too long, out of range).
    #[error("{field} {problem}")]
    InvalidInput {
        /// The field as clients name it.
        field: &'static str,
        /// What is wrong with it, as a phrase that follows the field name.
        problem: &'static str,
    },
    /// The user exists already.
    #[error("user already exists")]
    UserAlreadyExists,
    /// The store exists already.
    #[error("store already exists")]
    StoreAlreadyExists,
    /// No such store.
    #[error("store not found")]
    StoreNotFound,
    /// The campaign exists already.
    #[error("campaign already exists")]
    CampaignAlreadyExists,
    /// No such campaign.
    #[error("campaign not found")]
    CampaignNotFound,
    /// The campaign was closed; it takes no more stock.
    #[error("campaign is closed")]
    CampaignClosed,
    /// The campaign is not within its sales window, or was closed.
    #[error("campaign is not open for orders")]
    CampaignNotOpen,
    /// Not enough units are available.
    #[error("not enough stock available")]
    SoldOut,
    /// The order would take the user over the campaign's per-user limit.
    #[error("per-user limit exceeded")]
    LimitExceeded,
    /// The campaign holds no reservation for that order.
    #[error("no reservation for this order")]
    ReservationNotFound,
    /// The reservation was already released, so it cannot be sold.
    #[error("reservation was already released")]
    ReservationReleased,
    /// The reservation was already sold, so it cannot be released.
    #[error("reservation was already sold")]
    ReservationSold,
    /// The order exists already.
    #[error("order already exists")]
    OrderAlreadyExists,
    /// No such order.
    #[error("order not found")]
    OrderNotFound,
    /// The order is confirmed, rejected or cancelled; it does not change any more.
    #[error("order is already final")]
    OrderAlreadyFinal,
    /// The order is not in a state that allows this step (for example confirming a pending one).
    #[error("order is not awaiting this step")]
    OrderNotReady,
    /// No such payment.
    #[error("payment not found")]
    PaymentNotFound,
    /// The payment is final in a way that contradicts the command (failing a succeeded payment).
    #[error("payment is already final")]
    PaymentAlreadyFinal,
    /// The payment deadline has not passed yet.
    #[error("payment deadline not reached")]
    DeadlineNotReached,
    /// Only a succeeded payment can be refunded.
    #[error("payment has not succeeded, nothing to refund")]
    NothingToRefund,
}

impl DomainError {
    /// A stable machine-readable code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            DomainError::InvalidInput { .. } => "invalid_input",
            DomainError::UserAlreadyExists => "user_already_exists",
            DomainError::StoreAlreadyExists => "store_already_exists",
            DomainError::StoreNotFound => "store_not_found",
            DomainError::CampaignAlreadyExists => "campaign_already_exists",
            DomainError::CampaignNotFound => "campaign_not_found",
            DomainError::CampaignClosed => "campaign_closed",
            DomainError::CampaignNotOpen => "campaign_not_open",
            DomainError::SoldOut => "sold_out",
            DomainError::LimitExceeded => "limit_exceeded",
            DomainError::ReservationNotFound => "reservation_not_found",
            DomainError::ReservationReleased => "reservation_released",
            DomainError::ReservationSold => "reservation_sold",
            DomainError::OrderAlreadyExists => "order_already_exists",
            DomainError::OrderNotFound => "order_not_found",
            DomainError::OrderAlreadyFinal => "order_already_final",
            DomainError::OrderNotReady => "order_not_ready",
            DomainError::PaymentNotFound => "payment_not_found",
            DomainError::PaymentAlreadyFinal => "payment_already_final",
            DomainError::DeadlineNotReached => "deadline_not_reached",
            DomainError::NothingToRefund => "nothing_to_refund",
        }
    }
}

/// Checks a free-text field: trimmed non-empty and at most `chars_max` characters.
pub(crate) fn check_text(
    field: &'static str,
    value: &str,
    chars_max: usize,
) -> Result<(), DomainError> {
    if value.trim().is_empty() {
        return Err(DomainError::InvalidInput {
            field,
            problem: "must not be empty",
        });
    }
    if value.chars().count() > chars_max {
        return Err(DomainError::InvalidInput {
            field,
            problem: "is too long",
        });
    }
    if value.chars().any(char::is_control) {
        return Err(DomainError::InvalidInput {
            field,
            problem: "must not contain control characters",
        });
    }
    Ok(())
}

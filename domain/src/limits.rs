//! Limits on everything a client can choose. They are checked in `decide`, so a value outside
//! them is a business error with a clear code, not an overflow three layers down.

/// Most units a campaign may ever hold in total (initial quota plus replenishments).
pub const CAMPAIGN_TOTAL_UNITS_MAX: u32 = 10_000_000;
/// Highest per-user purchase limit a campaign may set.
pub const PER_USER_LIMIT_UNITS_MAX: u32 = 10_000;
/// Most units one order may ask for.
pub const ORDER_QUANTITY_UNITS_MAX: u32 = 10_000;
/// Highest unit price: one million currency units.
pub const PRICE_CENTS_MAX: u64 = 100_000_000;
/// Shortest payment window a campaign may give its customers.
pub const PAYMENT_TIMEOUT_S_MIN: u32 = 1;
/// Longest payment window: one day.
pub const PAYMENT_TIMEOUT_S_MAX: u32 = 86_400;
/// Longest sales window: one year.
pub const SALES_WINDOW_DAYS_MAX: i64 = 366;
/// Longest name of a user or a store, and longest region, in characters.
pub const NAME_CHARS_MAX: usize = 100;
/// Longest campaign title, in characters.
pub const TITLE_CHARS_MAX: usize = 200;
/// Longest SKU, in characters.
pub const SKU_CHARS_MAX: usize = 64;
/// Longest provider reference a payment webhook may carry, in characters.
pub const PROVIDER_REFERENCE_CHARS_MAX: usize = 200;

/// Most buckets a campaign's stock may be spread over.
pub const STOCK_BUCKETS_MAX: u32 = 64;

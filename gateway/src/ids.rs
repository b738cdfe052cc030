//! New ids for the resources the gateway creates.

use std::sync::Mutex;

use ulid::{Generator, Ulid};

static GENERATOR: Mutex<Option<Generator>> = Mutex::new(None);

/// A new ULID, strictly greater than every one this process made before, so that ids created
/// within the same millisecond still sort in creation order (orders are listed newest first
/// by id). Across instances the order is by millisecond only.
pub fn new_ulid() -> Ulid {
    let mut generator = GENERATOR.lock().unwrap_or_else(|p| p.into_inner());
    // Generating fails only when 2^80 ids were made in one millisecond; a plain new id is
    // then as good as any.
    generator
        .get_or_insert_with(Generator::new)
        .generate()
        .unwrap_or_else(|_| Ulid::new())
}

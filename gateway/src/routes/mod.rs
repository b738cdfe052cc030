//! The HTTP routes of API.md, one module per resource.

pub mod admin;
pub mod campaigns;
pub mod dead_letters;
pub mod health;
pub mod history;
pub mod orders;
pub mod payments;
pub mod sales;
pub mod stores;
pub mod users;

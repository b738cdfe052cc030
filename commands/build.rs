//! `sqlx::migrate!` embeds `migrations/` when the crate compiles; without this, a migration
//! added to a crate that is otherwise unchanged would not be built in (cargo would not know
//! to compile the crate again).

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}

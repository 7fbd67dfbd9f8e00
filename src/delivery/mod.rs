//! Delivery: from finished outputs to committed offsets (docs/DESIGN.md §4).

pub mod offsets;
pub mod record;
pub mod transaction;

pub use offsets::{Fatal, OffsetTracker, PartitionKey, Ticket};

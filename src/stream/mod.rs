//! The streaming path: the consumer-group member (`source`), the stages (`pipeline`), output
//! records (`sink`), their assembly (`operator`), and the bounded runs (`replay`, `offline`).

pub mod offline;
pub mod operator;
pub mod pipeline;
pub mod reload;
pub mod replay;
pub mod sink;
pub mod source;

/// The message a panic carried (`panic!("...")` gives a `&str` or a `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_else(|| "unknown panic".into())
}

//! The streaming path: the consumer-group member (`source`), the stages (`pipeline`), output
//! records (`sink`), their assembly (`operator`), and the bounded runs (`replay`, `offline`).

pub(crate) mod offline;
pub(crate) mod operator;
pub(crate) mod pipeline;
pub(crate) mod reload;
pub(crate) mod replay;
pub(crate) mod sink;
pub(crate) mod source;

/// The message a panic carried (`panic!("...")` gives a `&str` or a `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_else(|| "unknown panic".into())
}

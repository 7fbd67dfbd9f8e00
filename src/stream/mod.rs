//! The streaming path: the consumer-group member (`source`), the stages (`pipeline`), output
//! records (`sink`), their assembly (`operator`), and the bounded runs (`replay`, `offline`).

pub mod offline;
pub mod operator;
pub mod pipeline;
pub mod reload;
pub mod replay;
pub mod sink;
pub mod source;

//! The agent's YAML configuration: parsing, secret resolution and validation.

pub mod secret;

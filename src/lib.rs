//! model-lb: least-outstanding-requests and random host selection for model-serving backends,
//! as a proxy-wasm HTTP filter for stock Envoy.
//!
//! Everything but `glue` is plain Rust with native unit tests: configuration, selection, the
//! shared outstanding-request table and the tracker that updates it through [`store::SharedStore`].
//! `glue` is the only module that talks to proxy-wasm, and it only exists in the wasm build.

pub mod admin;
pub mod config;
pub mod health;
pub mod membership;
pub mod outcome;
pub mod prefix;
pub mod rng;
pub mod select;
pub mod server_load;
pub mod store;
pub mod table;
pub mod tracker;

#[cfg(target_arch = "wasm32")]
mod glue;

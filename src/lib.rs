//! model-lb: least-outstanding-requests and random host selection for model-serving backends,
//! as a proxy-wasm HTTP filter for stock Envoy.
//!
//! Everything but `glue` is plain Rust with native unit tests: configuration, selection, the
//! shared outstanding-request table and the tracker that updates it through [`store::SharedStore`].
//! `glue` is the only module that talks to Envoy, through one trait (`glue::host::Host`) that the
//! wasm build implements over proxy-wasm host calls and the unit tests over a simulated stream.

/// The build's version: `MODEL_LB_VERSION` at compile time (`make dist` sets it from git), else
/// the package version. Logged at start-up and exposed as a stat, so an operator knows what runs.
pub const VERSION: &str = match option_env!("MODEL_LB_VERSION") {
    Some(version) => version,
    None => env!("CARGO_PKG_VERSION"),
};

/// [`VERSION`] as one stat-name segment: dots and other separators become '_'.
pub fn version_stat_segment() -> String {
    VERSION
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

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

// Natively, the glue exists for its unit tests only.
#[cfg(any(target_arch = "wasm32", test))]
mod glue;

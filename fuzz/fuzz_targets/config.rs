//! Any bytes as the plugin configuration: parsing must return a config or an error whose message
//! stays short (it becomes one Envoy log line), never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match model_lb::config::parse(Some(data)) {
        Ok(config) => {
            assert!(
                !config.endpoints.is_empty() || config.admin.is_some_and(|a| a.follow_membership)
            );
            assert!(config.endpoints.len() <= model_lb::config::MAX_ENDPOINTS);
        }
        Err(e) => assert!(
            e.to_string().len() < 1_000,
            "message of {} bytes",
            e.to_string().len()
        ),
    }
});

//! Test equipment for model-lb: a simulated continuous-batching
//! OpenAI-compatible LLM server (`model-server`) and a load generator
//! (`model-load`). The binaries are thin; the logic lives here.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod bench;
pub mod cli;
pub mod compare;
pub mod dist;
pub mod engine;
pub mod load;
pub mod model;
pub mod openai;
pub mod prefix;
pub mod report;
pub mod rng;
pub mod server;
pub mod stats;
pub mod workload;

//! The end-to-end suite: one test binary, so the harness links once.
//! Each module drives one real binary; see `e2e` (tests/src) for the harness.
mod browser;
mod cloudformation;
mod copilot_rules;
mod demo;
mod deploy;
mod drain;
mod images;
mod monitoring;
mod protection_faults;
mod queue_consumer;
mod queue_consumer_errors;
mod queue_consumer_metrics;
mod queue_consumer_mixes;
mod queue_consumer_sources;
mod readme;
mod websocket;
mod worker_drain;
mod worker_fifo;
mod worker_handlers;
mod worker_library;
mod worker_visibility;

//! The end-to-end suite: one test binary, so the harness links once.
//! Each module drives one real binary; see `e2e` (tests/src) for the harness.
mod agent_client;
mod agent_conformance;
mod browser;
mod cloudformation;
mod copilot_rules;
mod demo;
mod deploy;
mod drain;
mod drain_fleet;
mod drain_modes;
mod drain_store;
mod drain_worker_modes;
mod images;
mod monitoring;
mod protection_faults;
mod queue_consumer;
mod queue_consumer_metrics;
mod queue_consumer_mixes;
mod queue_consumer_sources;
mod readme;
mod websocket;
mod worker_drain;
mod worker_handlers;
mod worker_library;

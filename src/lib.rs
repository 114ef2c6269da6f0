//! docker-delete: delete tags and repositories from a self-hosted Docker Distribution registry by
//! editing its storage tree, then garbage-collect, clean up and restart the registry.

pub mod config;
pub mod docker;
pub mod service;

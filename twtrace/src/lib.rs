//! twtrace: where a Linux host's TCP TIME_WAIT sockets come from.
//!
//! Data flows one way, and the folders follow it (see ARCHITECTURE.md):
//! [`kernel`] (programs, ring buffer, decoding) -> [`track`] (lifecycles, filters, aggregates)
//! -> [`present`] (rows, metrics, findings) -> [`views`] (one per command); [`host`] reads
//! the kernel's own accounting and settings that the figures are judged against.

pub mod cli;
pub mod failure;
pub mod host;
pub mod kernel;
pub mod output;
pub mod present;
pub mod track;
pub mod views;

//! The host as the kernel accounts for it, read from /proc, /sys and netlink, in every network
//! namespace: TIME_WAIT counters, the settings that govern ports and reuse, the socket table
//! (sock_diag) and who holds each socket, cgroups, clocks, and privileges.
//! Takes in nothing from the trace; hands on the ground truth the views compare against.

pub mod cgroup;
pub mod clock;
pub mod close_wait;
pub mod collect;
pub mod counters;
pub mod figures;
pub mod netns;
pub mod privileges;
pub mod settings;
pub mod sockdiag;

//! The ring buffer, read without a wake-up per event.
//!
//! The kernel programs submit silently until a sixteenth of the ring is waiting, then force a
//! wake-up; in between, this reader drains on a short timer. Each drain decodes every record
//! available, so userspace wakes a few dozen times a second whatever the event rate.

use std::{io, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    time::Interval,
};

use crate::kernel::decode::{KernelEvent, decode};

/// Longest an event waits in the ring when the kernel did not wake us.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

pub struct Source {
    ring: AsyncFd<RingBuf<MapData>>,
    tick: Interval,
    /// Records read from the ring.
    pub received: u64,
    /// Records that did not decode (never expected; counted, not fatal).
    pub malformed: u64,
}

impl Source {
    pub fn new(ring: RingBuf<MapData>) -> io::Result<Self> {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // SAFETY: the RingBuf owns its map's file descriptor for its whole life, and always
        // returns that descriptor.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self {
            ring,
            tick,
            received: 0,
            malformed: 0,
        })
    }

    /// Waits for a wake-up or the poll tick, then decodes everything available into `out`.
    pub async fn next_batch(&mut self, out: &mut Vec<KernelEvent>) -> io::Result<()> {
        tokio::select! {
            guard = self.ring.readable_mut() => guard?.clear_ready(),
            _ = self.tick.tick() => {}
        }
        self.drain(out);
        Ok(())
    }

    /// Decodes every record available now.
    pub fn drain(&mut self, out: &mut Vec<KernelEvent>) {
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            self.received += 1;
            match decode(&item) {
                Ok(ev) => out.push(ev),
                Err(_) => self.malformed += 1,
            }
        }
    }
}

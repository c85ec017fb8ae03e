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
    /// The most ring buffer bytes one drain found since `take_fill_peak` (each drain empties
    /// the ring, so this is how full it got; each record takes its length rounded up to 8 plus
    /// an 8-byte header).
    fill_peak: u64,
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
            fill_peak: 0,
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
        let mut bytes = 0;
        while let Some(item) = ring.next() {
            self.received += 1;
            bytes += 8 + (item.len() as u64).next_multiple_of(8);
            match decode(&item) {
                Ok(ev) => out.push(ev),
                Err(_) => self.malformed += 1,
            }
        }
        self.fill_peak = self.fill_peak.max(bytes);
    }

    /// The ring buffer's peak fill since the last call, in bytes.
    pub fn take_fill_peak(&mut self) -> u64 {
        std::mem::take(&mut self.fill_peak)
    }
}

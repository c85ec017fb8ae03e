//! Kernel timestamps (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) and jiffies, made human.

use std::{fs, io::Read};

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Now, on the clock the kernel programs stamp events with.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Converts monotonic timestamps to wall-clock time (Unix epoch), with the offset taken once.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    offset_ns: i128,
}

impl WallClock {
    pub fn now() -> Self {
        let mono = monotonic_ns();
        let real = clock_ns(libc::CLOCK_REALTIME);
        Self {
            offset_ns: real as i128 - mono as i128,
        }
    }

    #[cfg(test)]
    pub fn with_offset(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    /// Nanoseconds since the Unix epoch.
    pub fn epoch_ns(&self, mono_ns: u64) -> u64 {
        (mono_ns as i128 + self.offset_ns).max(0) as u64
    }
}

/// `HH:MM:SS.mmm` in UTC for the text views.
pub fn hms_millis(epoch_ns: u64) -> String {
    let ms = epoch_ns / 1_000_000;
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

/// The kernel's tick rate (CONFIG_HZ), to turn a timer's jiffies into time. None when the
/// kernel config is not readable; the views then leave the kernel's timeout out.
pub fn kernel_hz(release: &str) -> Option<u32> {
    let from_boot = fs::read_to_string(format!("/boot/config-{release}")).ok();
    let text = from_boot.or_else(|| {
        let gz = fs::File::open("/proc/config.gz").ok()?;
        let mut s = String::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_string(&mut s)
            .ok()?;
        Some(s)
    })?;
    hz_from_config(&text)
}

pub fn jiffies_to_ms(jiffies: u32, hz: Option<u32>) -> Option<u64> {
    hz.filter(|&hz| hz > 0)
        .map(|hz| jiffies as u64 * 1000 / hz as u64)
}

pub fn hz_from_config(text: &str) -> Option<u32> {
    text.lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_converts() {
        assert_eq!(hms_millis(3_723_004_000_000), "01:02:03.004");
        let w = WallClock::with_offset(1_000);
        assert_eq!(w.epoch_ns(5), 1_005);
        assert_eq!(WallClock::with_offset(-10).epoch_ns(5), 0);
    }

    #[test]
    fn hz_from_kernel_config() {
        let cfg = "# CONFIG_HZ_100 is not set\nCONFIG_HZ_250=y\nCONFIG_HZ=250\n";
        assert_eq!(hz_from_config(cfg), Some(250));
        assert_eq!(hz_from_config("CONFIG_X=y\n"), None);
    }
}

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

/// How the text views show a time: `--time clock|iso|epoch`, in local time (TZ or
/// /etc/localtime, like date(1); UTC when neither says) or, with `--utc`, in UTC.
#[derive(Clone, Debug)]
pub struct TimeStyle {
    format: crate::cli::TimeFormat,
    tz: jiff::tz::TimeZone,
}

impl TimeStyle {
    pub fn new(format: crate::cli::TimeFormat, utc: bool) -> Self {
        let tz = if utc {
            jiff::tz::TimeZone::UTC
        } else {
            jiff::tz::TimeZone::try_system().unwrap_or(jiff::tz::TimeZone::UTC)
        };
        Self { format, tz }
    }

    /// A fixed zone, for tests.
    pub fn in_zone(format: crate::cli::TimeFormat, tz: jiff::tz::TimeZone) -> Self {
        Self { format, tz }
    }

    /// Characters every formatted time takes (the TIME column's width).
    pub fn width(&self) -> usize {
        use crate::cli::TimeFormat;
        match self.format {
            TimeFormat::Clock => 12,
            TimeFormat::Iso => 29,
            TimeFormat::Epoch => 14,
        }
    }

    /// `14:53:19.373`, `2026-11-30T14:53:19.373+01:00` or `1764514399.373`.
    pub fn format(&self, epoch_ns: u64) -> String {
        use crate::cli::TimeFormat;
        let ms = (epoch_ns / 1_000_000) % 1000;
        if self.format == TimeFormat::Epoch {
            return format!("{}.{ms:03}", epoch_ns / 1_000_000_000);
        }
        let Ok(ts) = jiff::Timestamp::from_nanosecond(epoch_ns as i128) else {
            return hms_millis(epoch_ns);
        };
        let zoned = ts.to_zoned(self.tz.clone());
        match self.format {
            TimeFormat::Clock => format!("{}.{ms:03}", zoned.strftime("%H:%M:%S")),
            _ => format!(
                "{}.{ms:03}{}",
                zoned.strftime("%Y-%m-%dT%H:%M:%S"),
                zoned.strftime("%:z")
            ),
        }
    }
}

/// `HH:MM:SS.mmm` in UTC.
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
    fn local_time_utc_and_scripts() {
        use crate::cli::TimeFormat;
        // 2025-11-30 14:53:19.373 UTC.
        let t = 1_764_514_399_373_000_000u64;
        let tz = |name| jiff::tz::TimeZone::get(name).unwrap();
        let kathmandu = TimeStyle::in_zone(TimeFormat::Clock, tz("Asia/Kathmandu"));
        assert_eq!(kathmandu.format(t), "20:38:19.373");
        let iso = TimeStyle::in_zone(TimeFormat::Iso, tz("Asia/Kathmandu"));
        assert_eq!(iso.format(t), "2025-11-30T20:38:19.373+05:45");
        assert_eq!(iso.format(t).len(), iso.width());
        let utc = TimeStyle::in_zone(TimeFormat::Iso, jiff::tz::TimeZone::UTC);
        assert_eq!(utc.format(t), "2025-11-30T14:53:19.373+00:00");
        let epoch = TimeStyle::in_zone(TimeFormat::Epoch, jiff::tz::TimeZone::UTC);
        assert_eq!(epoch.format(t), "1764514399.373");
        assert_eq!(epoch.format(t).len(), epoch.width());
        assert_eq!(kathmandu.format(t).len(), kathmandu.width());
    }

    #[test]
    fn hz_from_kernel_config() {
        let cfg = "# CONFIG_HZ_100 is not set\nCONFIG_HZ_250=y\nCONFIG_HZ=250\n";
        assert_eq!(hz_from_config(cfg), Some(250));
        assert_eq!(hz_from_config("CONFIG_X=y\n"), None);
    }
}

//! What it costs this machine to wake a sleeping thread: every hop of a message between
//! processes (client → server, sidecar → transmitter, ...) is one such wake-up when the
//! receiver was idle, so at low rates latency is about hops × this cost. Measured as a
//! one-byte ping-pong between two threads over a Unix socket pair, with both threads on
//! one CPU and on two different CPUs.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use serde::Serialize;

use crate::affinity::{own_cpus, pin_current_thread};

const ROUND_TRIPS: u32 = 2_000;

/// Microseconds per round trip (two wake-ups), median of three runs.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct WakeupCosts {
    pub same_cpu_us: f64,
    /// None on a machine with one CPU.
    pub across_cpus_us: Option<f64>,
}

impl WakeupCosts {
    pub fn measure() -> std::io::Result<Self> {
        let cpus = own_cpus();
        let (&first, rest) = cpus.split_first().ok_or(std::io::ErrorKind::NotFound)?;
        let same_cpu_us = median_of_three(|| round_trip_us(first, first))?;
        let across_cpus_us = match rest.first() {
            Some(&other) => Some(median_of_three(|| round_trip_us(first, other))?),
            None => None,
        };
        Ok(WakeupCosts {
            same_cpu_us,
            across_cpus_us,
        })
    }

    pub fn describe(&self) -> String {
        let across = self
            .across_cpus_us
            .map_or("n/a (one CPU)".to_string(), |us| format!("{us:.1} µs"));
        format!(
            "Wake-up round trip between two threads (one byte each way over a Unix socket): {:.1} µs on one CPU, {across} across two CPUs.",
            self.same_cpu_us
        )
    }
}

fn median_of_three(mut f: impl FnMut() -> std::io::Result<f64>) -> std::io::Result<f64> {
    let mut v = [f()?, f()?, f()?];
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[1])
}

/// Mean round trip in microseconds with the pinger on CPU `a` and the echoer on CPU `b`
/// (both on threads of their own: the caller's affinity is left as it was).
fn round_trip_us(a: usize, b: usize) -> std::io::Result<f64> {
    let (mut ping, mut pong) = UnixStream::pair()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        pin_current_thread(b)?;
        let mut byte = [0u8];
        for _ in 0..ROUND_TRIPS {
            pong.read_exact(&mut byte)?;
            pong.write_all(&byte)?;
        }
        Ok(())
    });
    let pinger = std::thread::spawn(move || -> std::io::Result<f64> {
        pin_current_thread(a)?;
        let mut byte = [0u8];
        let start = Instant::now();
        for _ in 0..ROUND_TRIPS {
            ping.write_all(&byte)?;
            ping.read_exact(&mut byte)?;
        }
        Ok(start.elapsed().as_secs_f64() * 1e6 / f64::from(ROUND_TRIPS))
        // `ping` drops here, which ends the echoer if this failed half-way.
    });
    let us = pinger.join().map_err(|_| panicked())?;
    echo.join().map_err(|_| panicked())??;
    us
}

fn panicked() -> std::io::Error {
    std::io::Error::other("a ping-pong thread panicked")
}

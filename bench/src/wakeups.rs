//! What it costs this machine to wake a sleeping thread: every hop of a message between
//! processes (client → server, sidecar → transmitter, ...) is one such wake-up when the
//! receiver was idle, so at low rates latency is about hops × this cost. Measured two ways,
//! each with both threads on one CPU and on two different CPUs:
//! - a one-byte ping-pong between two threads over a Unix socket pair: wake-ups in a tight
//!   loop, where a hypervisor may keep an idle virtual CPU polling and the wake is cheap;
//! - one message every millisecond to a thread that has been idle since the last one, as at
//!   the latency scenarios' paced rates: the wake of a CPU that had time to halt.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::affinity::{own_cpus, pin_current_thread};

const ROUND_TRIPS: u32 = 2_000;
const IDLE_SAMPLES: usize = 300;
const IDLE_GAP: Duration = Duration::from_millis(1);

/// Microseconds per round trip (two wake-ups), median of three runs; and microseconds from
/// a write to the reading thread, idle for a millisecond, having it (median).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct WakeupCosts {
    pub round_trip_same_cpu_us: f64,
    /// None on a machine with one CPU.
    pub round_trip_across_cpus_us: Option<f64>,
    pub idle_one_way_same_cpu_us: f64,
    pub idle_one_way_across_cpus_us: Option<f64>,
}

impl WakeupCosts {
    pub fn measure() -> std::io::Result<Self> {
        let cpus = own_cpus();
        let (&first, rest) = cpus.split_first().ok_or(std::io::ErrorKind::NotFound)?;
        let round_trip_same_cpu_us = median_of_three(|| round_trip_us(first, first))?;
        let round_trip_across_cpus_us = match rest.first() {
            Some(&other) => Some(median_of_three(|| round_trip_us(first, other))?),
            None => None,
        };
        let idle_one_way_same_cpu_us = idle_one_way_us(first, first)?;
        let idle_one_way_across_cpus_us = match rest.first() {
            Some(&other) => Some(idle_one_way_us(first, other)?),
            None => None,
        };
        Ok(WakeupCosts {
            round_trip_same_cpu_us,
            round_trip_across_cpus_us,
            idle_one_way_same_cpu_us,
            idle_one_way_across_cpus_us,
        })
    }

    pub fn describe(&self) -> String {
        let across = self
            .round_trip_across_cpus_us
            .map_or("n/a (one CPU)".to_string(), |us| format!("{us:.1} µs"));
        let idle_across = self
            .idle_one_way_across_cpus_us
            .map_or("n/a (one CPU)".to_string(), |us| format!("{us:.1} µs"));
        format!(
            "Wake-up round trip between two threads (one byte each way over a Unix socket): {:.1} µs on one CPU, {across} across two CPUs.\nOne way to a thread idle for 1 ms (a message a millisecond, as at paced rates): {:.1} µs on one CPU, {idle_across} across two CPUs.",
            self.round_trip_same_cpu_us, self.idle_one_way_same_cpu_us
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

/// Median microseconds from a write on CPU `a` to the read returning on CPU `b`, for
/// messages a millisecond apart (the reader is idle in between). Both threads take their
/// times from one `Instant`, so no clocks need to agree.
fn idle_one_way_us(a: usize, b: usize) -> std::io::Result<f64> {
    let (mut tx, mut rx) = UnixStream::pair()?;
    let base = Instant::now();
    let reader = std::thread::spawn(move || -> std::io::Result<f64> {
        pin_current_thread(b)?;
        let mut sent = [0u8; 8];
        let mut us = Vec::with_capacity(IDLE_SAMPLES);
        for _ in 0..IDLE_SAMPLES {
            rx.read_exact(&mut sent)?;
            let now = base.elapsed().as_nanos() as u64;
            us.push(now.saturating_sub(u64::from_le_bytes(sent)) as f64 / 1e3);
        }
        us.sort_by(|x, y| x.total_cmp(y));
        Ok(us[us.len() / 2])
    });
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        pin_current_thread(a)?;
        for _ in 0..IDLE_SAMPLES {
            std::thread::sleep(IDLE_GAP);
            tx.write_all(&(base.elapsed().as_nanos() as u64).to_le_bytes())?;
        }
        Ok(())
        // `tx` drops here, which ends the reader if this failed half-way.
    });
    writer.join().map_err(|_| panicked())??;
    reader.join().map_err(|_| panicked())?
}

fn panicked() -> std::io::Error {
    std::io::Error::other("a ping-pong thread panicked")
}

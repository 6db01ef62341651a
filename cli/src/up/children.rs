//! Running one child: started, read for its `READY`/`MOVED`/`LINKED` lines, restarted
//! with a backoff when it dies, stopped in order (cells, then transmitters, then the
//! rendezvous).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use thynapse_process::Status;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};

use super::plan::pin_ports;
use super::{Report, Role, Spec};

/// Runs one child and restarts it when it dies, until told to stop; then stops it with
/// SIGTERM (SIGKILL after a grace period). Cells stop first, so transmitters have nothing
/// left to drain, and the rendezvous last.
pub(super) async fn supervise(
    exe: PathBuf,
    index: usize,
    mut spec: Spec,
    reports: mpsc::Sender<Report>,
    mut stop: watch::Receiver<bool>,
) {
    // 0.5 s, 1 s, 2 s … 10 s between restarts; back to the start once it is up again.
    let restarts = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(10))
        .without_max_times();
    let mut backoff = restarts.build();
    loop {
        let mut cmd = Command::new(&exe);
        cmd.args(spec.args.to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        // SAFETY: pre_exec runs between fork and exec, where only async-signal-safe calls
        // may be made; prctl is one. It asks the kernel to send SIGTERM to this child if
        // `up` itself dies, so no process outlives a killed `up`.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Some(Signal::SIGTERM))?;
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = reports
                    .send(Report::Exited {
                        index,
                        status: format!("spawn failed: {e}"),
                    })
                    .await;
                return;
            }
        };
        let pid = child.id().unwrap_or_default();
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let status = loop {
            tokio::select! {
                line = lines.next_line() => match line {
                    Ok(Some(line)) => {
                        let report = match Status::parse(&line) {
                            Some(Status::Ready(info)) => {
                                pin_ports(&mut spec, &info);
                                backoff = restarts.build();
                                Report::Ready { index, pid, info }
                            }
                            Some(Status::Moved(info)) => Report::Moved { index, info },
                            Some(Status::Linked(l)) => Report::Linked { index, peers: l.peers },
                            None => continue,
                        };
                        let _ = reports.send(report).await;
                    }
                    _ => break child.wait().await,
                },
                status = child.wait() => break status,
                _ = stop.changed() => {
                    stop_child(&mut child, spec.role).await;
                    return;
                }
            }
        };
        if *stop.borrow() {
            return;
        }
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        let _ = reports.send(Report::Exited { index, status }).await;
        tokio::select! {
            _ = tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(10))) => {}
            _ = stop.changed() => return,
        }
    }
}

pub(super) async fn stop_child(child: &mut tokio::process::Child, role: Role) {
    // Let cells go before transmitters, and transmitters before the rendezvous.
    let delay = match role {
        Role::Cell => 0,
        Role::Transmitter => 200,
        Role::Rendezvous => 400,
    };
    tokio::time::sleep(Duration::from_millis(delay)).await;
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

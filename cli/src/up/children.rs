//! Running one child: started, read for its `READY`/`MOVED`/`LINKED` lines, restarted
//! with a backoff when it dies, stopped in order (cells, then transmitters, then the
//! rendezvous).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde_json::Value;
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
    let mut backoff = Duration::from_millis(500);
    loop {
        let mut cmd = Command::new(&exe);
        cmd.args(&spec.args)
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
                        if let Some(json) = line.strip_prefix("READY ") {
                            let info: Value = serde_json::from_str(json).unwrap_or(Value::Null);
                            pin_ports(&mut spec, &info);
                            backoff = Duration::from_millis(500);
                            let _ = reports.send(Report::Ready { index, pid, info }).await;
                        } else if let Some(json) = line.strip_prefix("MOVED ") {
                            let info: Value = serde_json::from_str(json).unwrap_or(Value::Null);
                            let _ = reports.send(Report::Moved { index, info }).await;
                        } else if let Some(json) = line.strip_prefix("LINKED ") {
                            let info: Value = serde_json::from_str(json).unwrap_or(Value::Null);
                            let peers = info["peers"].as_u64().unwrap_or(0) as usize;
                            let _ = reports.send(Report::Linked { index, peers }).await;
                        }
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
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
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

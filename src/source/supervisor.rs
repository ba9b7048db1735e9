//! Keeps one source running for as long as its pipeline exists: retries forever (on by default, unlike
//! DeepStream's reconnect intervals of 0), with exponential backoff and jitter so cameras behind one switch do
//! not reconnect in lockstep, and a backoff reset once frames flow again. Every restart is counted and logged
//! with the reason; URIs are redacted.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::folder::{self, FolderState};
use super::rtsp::RtspTransport;
use super::sequence::FrameSequence;
use super::stream::{self, RunEnd, StreamSettings};
use super::{FrameIntake, SourceKind, SourceSpec};
use crate::telemetry::{PipelineMetrics, SourceTrouble};

#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    pub stream: StreamSettings,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Watched folders: how long a file must hold still before it is read.
    pub folder_settle: Duration,
}

/// Runs until the intake stops or the source finishes (a file's or one-shot folder's end).
pub fn supervise(
    pipeline: &str,
    spec: &SourceSpec,
    settings: &SupervisorSettings,
    intake: &dyn FrameIntake,
    metrics: &PipelineMetrics,
    sequence: &FrameSequence,
) {
    let mut folder_state = FolderState::default();
    let mut backoff = settings.backoff_initial;
    let mut jitter = Jitter::new(pipeline);
    let mut attempt = 0u64;
    // rtsp_transport = auto: TCP until the server refuses it, then UDP (and back, should UDP be refused later).
    let mut auto_transport = RtspTransport::Tcp;
    let mut refusals_in_a_row = 0u32;
    loop {
        if intake.stopping() {
            break;
        }
        if attempt > 0 {
            metrics.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        attempt += 1;
        tracing::info!(pipeline, source = %spec, attempt, "starting source");
        let started = Instant::now();
        let mut delivered = false;
        let end = match spec.kind() {
            SourceKind::Folder { dir, mode } => {
                let end = folder::run(
                    dir,
                    *mode,
                    settings.folder_settle,
                    &mut folder_state,
                    intake,
                    metrics,
                    sequence,
                );
                delivered = !matches!(end, RunEnd::Failed(_));
                end
            }
            _ => {
                let auto = settings.stream.rtsp_transport == RtspTransport::Auto;
                let stream_settings = StreamSettings {
                    rtsp_transport: if auto {
                        auto_transport
                    } else {
                        settings.stream.rtsp_transport
                    },
                    ..settings.stream.clone()
                };
                stream::run_once(
                    spec,
                    &stream_settings,
                    intake,
                    metrics,
                    sequence,
                    &mut delivered,
                )
            }
        };
        metrics.connected.store(false, Ordering::Relaxed);
        let refused_now = matches!(end, RunEnd::TransportRefused(_));
        match end {
            RunEnd::Stopped => break,
            RunEnd::Finished => {
                tracing::info!(pipeline, source = %spec, "source finished");
                break;
            }
            RunEnd::Stalled => {
                metrics.stalls.fetch_add(1, Ordering::Relaxed);
                metrics.set_source_trouble(SourceTrouble {
                    stalled: true,
                    why: format!(
                        "no frame for {:.1} s",
                        settings.stream.watchdog.as_secs_f64()
                    ),
                });
                tracing::warn!(
                    pipeline,
                    source = %spec,
                    "no frame for {:.1} s: restarting the source",
                    settings.stream.watchdog.as_secs_f64()
                );
            }
            RunEnd::Failed(reason) => {
                metrics.set_source_trouble(SourceTrouble {
                    stalled: false,
                    why: reason.clone(),
                });
                tracing::warn!(pipeline, source = %spec, "source failed after {:.1} s: {reason}", started.elapsed().as_secs_f64());
            }
            RunEnd::TransportRefused(refused) => {
                refusals_in_a_row += 1;
                let auto = settings.stream.rtsp_transport == RtspTransport::Auto;
                if auto && refusals_in_a_row < 2 {
                    // The server refused one transport: try the other at once; that is not a failure yet.
                    auto_transport = match refused {
                        RtspTransport::Tcp => RtspTransport::Udp,
                        _ => RtspTransport::Tcp,
                    };
                    tracing::info!(
                        pipeline,
                        source = %spec,
                        "the RTSP server refused RTP over {}: trying {} (rtsp_transport = auto)",
                        refused.name().to_uppercase(),
                        auto_transport.name().to_uppercase()
                    );
                    continue;
                }
                let advice = if auto {
                    // Both refused: the next attempt (after the backoff) starts over with the other one.
                    refusals_in_a_row = 0;
                    auto_transport = match refused {
                        RtspTransport::Tcp => RtspTransport::Udp,
                        _ => RtspTransport::Tcp,
                    };
                    RtspTransport::Auto.refusal_advice(pipeline)
                } else {
                    refused.refusal_advice(pipeline)
                };
                tracing::warn!(pipeline, source = %spec, "source failed: {advice}");
                metrics.set_source_trouble(SourceTrouble {
                    stalled: false,
                    why: advice,
                });
            }
        }
        if !refused_now {
            refusals_in_a_row = 0;
        }
        if delivered {
            backoff = settings.backoff_initial;
        }
        let delay = jitter.apply(backoff);
        tracing::info!(pipeline, "retrying in {:.2} s", delay.as_secs_f64());
        let until = Instant::now() + delay;
        while Instant::now() < until && !intake.stopping() {
            std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
        }
        backoff = (backoff * 2).min(settings.backoff_max);
    }
}

/// A small xorshift generator: the delay is drawn from [backoff/2, backoff].
struct Jitter(u64);

impl Jitter {
    fn new(seed_text: &str) -> Jitter {
        let mut seed = crate::telemetry::unix_ms() ^ 0x9e37_79b9_7f4a_7c15;
        for b in seed_text.bytes() {
            seed = seed.rotate_left(7) ^ u64::from(b);
        }
        Jitter(seed | 1)
    }

    fn apply(&mut self, backoff: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let unit = (self.0 >> 11) as f64 / (1u64 << 53) as f64;
        backoff.mul_f64(0.5 + 0.5 * unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_to_full_backoff() {
        let mut j = Jitter::new("cam");
        let b = Duration::from_secs(4);
        let draws: Vec<Duration> = (0..200).map(|_| j.apply(b)).collect();
        assert!(draws.iter().all(|d| *d >= b / 2 && *d <= b));
        assert!(
            draws.iter().any(|d| *d < b.mul_f64(0.6)) && draws.iter().any(|d| *d > b.mul_f64(0.9))
        );
    }
}

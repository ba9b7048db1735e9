//! The Prometheus text exposition (format 0.0.4) of the registry, written by `prometheus-client`'s encoder
//! (escaping, `_total` on counters, Go-style `le` bounds), fed by a collector that reads the atomics at scrape
//! time. The atomics stay ours rather than the crate's metric types: `/status` reads quantile bounds from the
//! histogram buckets, and the crate's `Histogram` shows only its sum and count (and takes a mutex on every
//! observation, on the hot path here); and a pipeline's series must vanish on the reload that removes it, which
//! a collector over the live map gives without unregistering anything.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{
    Delivery, DropReason, Histogram, ModelLabel, PipelineMetrics, SegmentFigures, SegmentOutcome,
    Stage, SwapFigures, Telemetry,
};

/// The `Content-Type` of `Telemetry::render_prometheus`'s text (Prometheus text format 0.0.4).
pub const PROMETHEUS_CONTENT_TYPE: &str =
    prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

impl Telemetry {
    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn render_prometheus(&self) -> String {
        let pipelines = self
            .pipelines
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, m)| (name.clone(), Arc::clone(m)))
            .collect();
        let scrape = Scrape {
            pipelines,
            batch_size: self.batch_size.snapshot(),
            deliveries: self.deliveries.figures(),
            segment_requests: self.segment_requests.by_code(),
            segment_latency: self.segment_requests.latency.snapshot(),
            segment_queue: self.segment_requests.figures(),
            model: self.models.serving(),
            swaps: self.models.swaps(),
            totals: [
                (
                    "tclseg_trunk_runs",
                    "Image trunk runs (each on a batch of crops, shared by the heads of the frames in it).",
                    self.trunk_runs.load(Ordering::Relaxed),
                ),
                (
                    "tclseg_inference_errors",
                    "Failed inference runs.",
                    self.inference_errors.load(Ordering::Relaxed),
                ),
                (
                    "tclseg_reloads",
                    "Applied configuration reloads.",
                    self.reloads.load(Ordering::Relaxed),
                ),
                (
                    "tclseg_reload_failures",
                    "Rejected configuration reloads.",
                    self.reload_failures.load(Ordering::Relaxed),
                ),
            ],
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(scrape));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
            tracing::warn!("cannot render the metrics: {e}");
        }
        out
    }
}

impl Histogram {
    /// The figures as they are now, for the encoder.
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            buckets: self
                .bounds
                .iter()
                .zip(&self.counts)
                .map(|(bound, c)| (*bound, c.load(Ordering::Relaxed)))
                .collect(),
            count: self.count(),
            sum: self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// A histogram's figures at one moment.
#[derive(Debug)]
struct Snapshot {
    /// (upper bound, observations in this bucket alone): the encoder adds them up.
    buckets: Vec<(f64, u64)>,
    count: u64,
    sum: f64,
}

impl Snapshot {
    fn encode(&self, encoder: &mut MetricEncoder) -> std::fmt::Result {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }
}

/// One scrape: the pipelines' metrics as they are at the scrape (shared, read while encoding) and a copy of the
/// process-wide figures. The collector a registry needs must own what it reads.
#[derive(Debug)]
struct Scrape {
    pipelines: Vec<(String, Arc<PipelineMetrics>)>,
    batch_size: Snapshot,
    /// The event deliveries, one series per destination (none without `[events]`).
    deliveries: Vec<Delivery>,
    /// `POST /v1/segment`: (status code, answers), and the time to answer.
    segment_requests: Vec<(u16, u64)>,
    segment_latency: Snapshot,
    /// `POST /v1/segment`'s request queue and answers by outcome.
    segment_queue: SegmentFigures,
    /// The model serving now (None before it is loaded) and the swaps reloads attempted.
    model: Option<ModelLabel>,
    swaps: SwapFigures,
    /// Process-wide counters: name (the encoder adds `_total`), help, value.
    totals: [(&'static str, &'static str, u64); 4],
}

type Read<T> = fn(&PipelineMetrics) -> T;

impl Scrape {
    /// One counter family, one series per pipeline.
    fn counter(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        read: Read<u64>,
    ) -> std::fmt::Result {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (p, m) in &self.pipelines {
            family
                .encode_family(&[("pipeline", p.as_str())])?
                .encode_counter::<NoLabelSet, _, u64>(&read(m), None)?;
        }
        Ok(())
    }

    /// One gauge family, one series per pipeline that has a value.
    fn gauge<T: prometheus_client::encoding::EncodeGaugeValue>(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        read: Read<Option<T>>,
    ) -> std::fmt::Result {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (p, m) in &self.pipelines {
            if let Some(v) = read(m) {
                family
                    .encode_family(&[("pipeline", p.as_str())])?
                    .encode_gauge(&v)?;
            }
        }
        Ok(())
    }
}

impl Scrape {
    /// The events outbox's depth and its deliveries, per destination.
    fn deliveries(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        if self.deliveries.is_empty() {
            return Ok(());
        }
        type Pick = fn(&Delivery) -> u64;
        let families: [(&str, &str, MetricType, Pick); 4] = [
            (
                "tclseg_events_outbox_depth",
                "Events waiting in the outbox, per destination.",
                MetricType::Gauge,
                |d| d.depth,
            ),
            (
                "tclseg_events_delivered",
                "Events the destination acknowledged.",
                MetricType::Counter,
                |d| d.delivered,
            ),
            (
                "tclseg_events_retried",
                "Delivery attempts after a failure.",
                MetricType::Counter,
                |d| d.retried,
            ),
            (
                "tclseg_events_dropped",
                "Events dropped because the outbox was full.",
                MetricType::Counter,
                |d| d.dropped,
            ),
        ];
        for (name, help, kind, pick) in families {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for d in &self.deliveries {
                let labels = [("destination", d.destination.as_str())];
                let mut series = family.encode_family(&labels)?;
                if kind == MetricType::Gauge {
                    series.encode_gauge(&pick(d))?;
                } else {
                    series.encode_counter::<NoLabelSet, _, u64>(&pick(d), None)?;
                }
            }
        }
        Ok(())
    }
}

impl Scrape {
    /// `POST /v1/segment`'s answers by outcome and its queue's depth and capacity.
    fn segment_queue(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let q = &self.segment_queue;
        let mut requests = encoder.encode_descriptor(
            "tclseg_segment_requests",
            "POST /v1/segment requests by outcome: served, rejected (429, queue full), invalid (other 4xx), \
             failed (5xx).",
            None,
            MetricType::Counter,
        )?;
        for outcome in SegmentOutcome::ALL {
            let n = match outcome {
                SegmentOutcome::Served => q.served,
                SegmentOutcome::Rejected => q.rejected,
                SegmentOutcome::Invalid => q.invalid,
                SegmentOutcome::Failed => q.failed,
            };
            requests
                .encode_family(&[("outcome", outcome.key())])?
                .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        }
        encoder
            .encode_descriptor(
                "tclseg_segment_queue_depth",
                "POST /v1/segment images waiting for the inference worker.",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&q.depth)?;
        encoder
            .encode_descriptor(
                "tclseg_segment_queue_capacity",
                "The most POST /v1/segment images that may wait (http.segment_queue); more get 429.",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&q.capacity)
    }

    /// The model serving now (`tclseg_model_info` = 1, labelled) and the swaps reloads attempted.
    fn model(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let mut swaps = encoder.encode_descriptor(
            "tclseg_model_swaps",
            "Reloads that changed [model]: swapped in (ok), or the new model failed to load and the old one \
             kept serving (failed).",
            None,
            MetricType::Counter,
        )?;
        for (outcome, n) in [("ok", self.swaps.ok), ("failed", self.swaps.failed)] {
            swaps
                .encode_family(&[("outcome", outcome)])?
                .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        }
        let mut info = encoder.encode_descriptor(
            "tclseg_model_info",
            "The model serving now (1): its manifest sha256 and name.",
            None,
            MetricType::Gauge,
        )?;
        if let Some(model) = &self.model {
            info.encode_family(&[
                ("sha256", model.sha256.as_str()),
                ("name", model.name.as_str()),
            ])?
            .encode_gauge(&1u64)?;
        }
        Ok(())
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let e = &mut encoder;
        self.counter(
            e,
            "tclseg_frames_in",
            "Decoded frames that reached tclseg, before the rate cap.",
            |m| m.frames_in.load(Ordering::Relaxed),
        )?;
        self.counter(
            e,
            "tclseg_frames_out",
            "Frames whose outputs were all written.",
            |m| m.frames_out.load(Ordering::Relaxed),
        )?;
        self.counter(
            e,
            "tclseg_reconnects",
            "Source restarts after the first start.",
            |m| m.reconnects.load(Ordering::Relaxed),
        )?;
        self.counter(e, "tclseg_stalls", "No-frame watchdog firings.", |m| {
            m.stalls.load(Ordering::Relaxed)
        })?;
        let mut dropped = e.encode_descriptor(
            "tclseg_frames_dropped",
            "Frames not segmented, by reason.",
            None,
            MetricType::Counter,
        )?;
        for (p, m) in &self.pipelines {
            for r in DropReason::ALL {
                dropped
                    .encode_family(&[("pipeline", p.as_str()), ("reason", r.key())])?
                    .encode_counter::<NoLabelSet, _, u64>(&m.drops(r), None)?;
            }
        }
        self.gauge(
            e,
            "tclseg_queue_depth",
            "Frames waiting for the inference worker.",
            |m| Some(m.queue_depth.load(Ordering::Relaxed)),
        )?;
        self.gauge(
            e,
            "tclseg_source_connected",
            "1 while the source delivers frames.",
            |m| Some(u64::from(m.connected.load(Ordering::Relaxed))),
        )?;
        self.gauge(
            e,
            "tclseg_pipeline_running",
            "1 while the pipeline runs (its source may be retrying); 0 when it failed to start or a thread died.",
            |m| Some(u64::from(m.failure().is_none())),
        )?;
        self.gauge(
            e,
            "tclseg_last_frame_age_seconds",
            "Seconds since the source's last frame (absent before the first).",
            |m| m.last_frame_age(),
        )?;
        let mut latency = e.encode_descriptor(
            "tclseg_stage_latency_seconds",
            "Per-frame latency by stage (decode, queue, infer, write; total is capture to written).",
            None,
            MetricType::Histogram,
        )?;
        for (p, m) in &self.pipelines {
            for stage in Stage::ALL {
                m.latency(stage).snapshot().encode(
                    &mut latency
                        .encode_family(&[("pipeline", p.as_str()), ("stage", stage.key())])?,
                )?;
            }
        }
        self.batch_size.encode(&mut e.encode_descriptor(
            "tclseg_batch_size",
            "Frames per inference run.",
            None,
            MetricType::Histogram,
        )?)?;
        self.deliveries(e)?;
        let mut requests = e.encode_descriptor(
            "tclseg_http_segment_requests",
            "POST /v1/segment requests answered, by HTTP status code.",
            None,
            MetricType::Counter,
        )?;
        for (code, n) in &self.segment_requests {
            requests
                .encode_family(&[("code", code.to_string())])?
                .encode_counter::<NoLabelSet, _, u64>(n, None)?;
        }
        self.segment_latency.encode(&mut e.encode_descriptor(
            "tclseg_http_segment_latency_seconds",
            "POST /v1/segment: time from the request to its answer.",
            None,
            MetricType::Histogram,
        )?)?;
        self.segment_queue(e)?;
        self.model(e)?;
        for (name, help, v) in self.totals {
            e.encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::LATENCY_BUCKETS;
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_quantiles_bound() {
        let h = Histogram::new(&LATENCY_BUCKETS);
        for v in [0.001, 0.02, 0.02, 0.3, 100.0] {
            h.observe(v);
        }
        #[derive(Debug)]
        struct One(Snapshot);
        impl Collector for One {
            fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
                let mut family = encoder.encode_descriptor("x", "", None, MetricType::Histogram)?;
                self.0.encode(&mut family.encode_family(&[("a", "b")])?)
            }
        }
        let mut registry = Registry::default();
        registry.register_collector(Box::new(One(h.snapshot())));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).expect("encode");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.005\"} 1"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.025\"} 3"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"30\"} 4"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 5"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 5"), "{out}");
        assert_eq!(h.quantile_bound(0.5), Some(0.025));
        assert_eq!(h.quantile_bound(0.8), Some(0.5));
        assert_eq!(h.quantile_bound(1.0), None);
    }

    #[test]
    fn prometheus_text_has_per_pipeline_series() {
        let t = Telemetry::default();
        let m = t.pipeline("door");
        m.frame_in();
        m.drop_frames(DropReason::Superseded, 3);
        m.observe(Stage::Total, Duration::from_millis(40));
        t.batch_size.observe(2.0);
        t.trunk_runs.fetch_add(5, Ordering::Relaxed);
        let text = t.render_prometheus();
        assert!(
            text.contains("tclseg_frames_in_total{pipeline=\"door\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tclseg_frames_dropped_total{pipeline=\"door\",reason=\"superseded\"} 3"),
            "{text}"
        );
        assert!(text.contains(
            "tclseg_stage_latency_seconds_bucket{pipeline=\"door\",stage=\"total\",le=\"0.05\"} 1"
        ));
        assert!(
            text.contains("tclseg_batch_size_bucket{le=\"2\"} 1"),
            "{text}"
        );
        assert!(text.contains("tclseg_trunk_runs_total 5"), "{text}");
        t.retain(&[]);
        assert!(!t.render_prometheus().contains("door"));
    }

    #[test]
    fn the_segment_queue_and_the_serving_model_have_their_series() {
        let t = Telemetry::default();
        t.segment_requests.record(200, Duration::from_millis(3));
        t.segment_requests.record(429, Duration::from_millis(1));
        t.segment_requests.register_queue(2, || 1);
        let text = t.render_prometheus();
        for line in [
            "tclseg_segment_requests_total{outcome=\"served\"} 1",
            "tclseg_segment_requests_total{outcome=\"rejected\"} 1",
            "tclseg_segment_requests_total{outcome=\"failed\"} 0",
            "tclseg_segment_queue_depth 1",
            "tclseg_segment_queue_capacity 2",
            "tclseg_model_swaps_total{outcome=\"ok\"} 0",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(!text.contains("tclseg_model_info{"), "no model yet: {text}");
        t.models.set_serving("tiny", "ab12");
        t.models.swapped(true);
        t.models.swapped(false);
        t.models.set_serving("tiny \"2\"", "cd34");
        let text = t.render_prometheus();
        assert!(
            text.contains("tclseg_model_info{sha256=\"cd34\",name=\"tiny \\\"2\\\"\"} 1"),
            "{text}"
        );
        assert!(!text.contains("ab12"), "one model at a time: {text}");
        assert!(text.contains("tclseg_model_swaps_total{outcome=\"failed\"} 1"));
    }
}

//! The processing stages between the source and the sink:
//! decode pool → dynamic batcher → engine workers, all on plain threads so the async executor
//! only ever does I/O. Every job leaves as exactly one `Outcome`, success or rejection.

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Select, Sender};

use crate::config::{BatchSettings, DecodeSettings, S3Settings};
use crate::delivery::Ticket;
use crate::event::{parse_event, ErrorKind, Headers, ImageEvent, ImageSource, Rejection, SourceRef, HEADER_CLASS, HEADER_IMAGE_ID};
use crate::inference::active::{ActiveModel, ModelSlot};
use crate::inference::decode::{Decoder, ModelInput};
use crate::inference::engine::BatchOutput;
use crate::telemetry::Metrics;

/// One consumed record, from the source to its outcome.
#[derive(Debug, Clone)]
pub struct Job {
    pub ticket: Ticket,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Headers,
    /// Record timestamp (ms since epoch), if the broker gave one.
    pub timestamp: Option<i64>,
    pub consumed_at: Instant,
}

impl Job {
    /// A copy for bookkeeping, without the payload bytes.
    pub fn without_payload(&self) -> Job {
        Job {
            ticket: self.ticket.clone(),
            key: self.key.clone(),
            value: None,
            headers: self.headers.clone(),
            timestamp: self.timestamp,
            consumed_at: self.consumed_at,
        }
    }

    pub fn source(&self) -> SourceRef {
        SourceRef { topic: self.ticket.topic.clone(), partition: self.ticket.partition, offset: self.ticket.offset, timestamp: self.timestamp }
    }
}

/// A scored image.
pub(crate) struct Scored {
    pub job: Job,
    /// The model that scored it (a hot reload may swap another in for the next batch).
    pub model: Arc<ActiveModel>,
    pub event: ImageEvent,
    pub input: ModelInput,
    pub raw_score: f32,
    pub map: MapSlice,
    pub inference_ms: f64,
}

/// One image's anomaly map: a view into its batch's output maps, shared by the batch's images
/// instead of copied out for each (most images never need theirs: no heatmap, no thumbnail).
#[derive(Clone)]
pub(crate) struct MapSlice {
    maps: Arc<Vec<f32>>,
    range: std::ops::Range<usize>,
}

impl MapSlice {
    pub(crate) fn new(maps: Arc<Vec<f32>>, range: std::ops::Range<usize>) -> Self {
        assert!(range.end <= maps.len(), "map range {range:?} past the batch's {} values", maps.len());
        Self { maps, range }
    }
}

impl std::ops::Deref for MapSlice {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.maps[self.range.clone()]
    }
}

pub(crate) enum Outcome {
    Scored(Box<Scored>),
    Rejected { job: Job, rejection: Rejection },
}

impl Outcome {
    pub(crate) fn job(&self) -> &Job {
        match self {
            Outcome::Scored(s) => &s.job,
            Outcome::Rejected { job, .. } => job,
        }
    }
}

/// Where outcomes go: the Kafka sink, or a collector for offline scoring and tests.
pub(crate) trait OutcomeSink: Send + Sync + 'static {
    fn accept(&self, outcome: Outcome);
}

impl OutcomeSink for Sender<Outcome> {
    fn accept(&self, outcome: Outcome) {
        let _ = self.send(outcome);
    }
}

struct Decoded {
    job: Job,
    /// The model stamped on the job at submission.
    model: Arc<ActiveModel>,
    event: ImageEvent,
    input: ModelInput,
}

/// Handle to running stages. Dropping every clone of the submitter shuts them down in order.
pub(crate) struct Pipeline {
    submit: Option<Submitter>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Inputs enough to keep every engine worker busy for four batches (`refill_mark`).
    refill_mark: usize,
}

/// The way in. Each job is stamped with the active model as it enters, in the order the source
/// reads it: a hot swap then takes effect at one offset per partition (older offsets keep the
/// old model, newer ones get the new), however the decode pool and engine workers reorder work.
#[derive(Clone)]
pub(crate) struct Submitter {
    jobs: Sender<(Job, Arc<ActiveModel>)>,
    models: Arc<ModelSlot>,
}

impl Submitter {
    /// Sends a job in; blocks while the first stage is full (back-pressure to the source).
    #[allow(clippy::result_large_err)] // a stopped pipeline hands the job back by value, as crossbeam's send does
    pub(crate) fn send(&self, job: Job) -> Result<(), Job> {
        self.jobs.send((job, self.models.current())).map_err(|e| e.0 .0)
    }
}

impl Pipeline {
    /// Decodes with `decode` (and `s3` for `s3://` URIs), batches with `batch`.
    pub(crate) fn start(
        models: Arc<ModelSlot>,
        decode: &DecodeSettings,
        s3: &S3Settings,
        batch: &BatchSettings,
        metrics: Arc<Metrics>,
        sink: Arc<dyn OutcomeSink>,
    ) -> Self {
        let decoder = Decoder::with_s3_if_async(decode, s3, models.current().engine.input_size());
        Self::start_with(models, decoder, batch, metrics, sink)
    }

    /// Like `start`, with a decoder set up by the caller (e.g. with S3 access).
    pub(crate) fn start_with(models: Arc<ModelSlot>, decoder: Decoder, batch: &BatchSettings, metrics: Arc<Metrics>, sink: Arc<dyn OutcomeSink>) -> Self {
        let sessions = models.current().engine.session_count();
        let refill_mark = 4 * sessions * batch.max_batch.max(1);
        let workers = if decoder.settings().workers == 0 { crate::config::usable_cores() } else { decoder.settings().workers };
        let (submit, jobs) = bounded::<(Job, Arc<ActiveModel>)>(batch.queue_capacity);
        let (to_batch, decoded) = bounded::<Decoded>(batch.queue_capacity);
        // Zero capacity: a batch is handed over only when a worker is free (see batch_loop).
        let (to_engine, batches) = bounded::<Vec<Decoded>>(0);
        let decoder = Arc::new(decoder);
        let mut threads = Vec::new();
        for i in 0..workers {
            let (jobs, to_batch, decoder, sink, metrics) = (jobs.clone(), to_batch.clone(), decoder.clone(), sink.clone(), metrics.clone());
            threads.push(spawn(format!("decode-{i}"), move || decode_loop(jobs, to_batch, &decoder, &*sink, &metrics)));
        }
        drop(to_batch);
        let settings = batch.clone();
        let m = metrics.clone();
        threads
            .push(spawn("batcher".into(), move || batch_loop(decoded, to_engine, &settings, &m, |a: &Decoded, b: &Decoded| Arc::ptr_eq(&a.model, &b.model))));
        for slot in 0..sessions {
            let (batches, sink, metrics) = (batches.clone(), sink.clone(), metrics.clone());
            threads.push(spawn(format!("engine-{slot}"), move || engine_loop(slot, batches, &*sink, &metrics)));
        }
        Self { submit: Some(Submitter { jobs: submit, models }), threads, refill_mark }
    }

    /// Unfinished inputs at which the source must be fetching again: four full batches for every
    /// engine worker, so new records arrive long before the engines run dry.
    pub(crate) fn refill_mark(&self) -> usize {
        self.refill_mark
    }

    pub(crate) fn submitter(&self) -> Submitter {
        self.submit.as_ref().expect("open").clone()
    }

    /// Closes the input and waits until every submitted job has reached the sink.
    pub(crate) fn finish(mut self) {
        self.submit.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new().name(name).spawn(f).expect("spawn pipeline thread")
}

/// Parses and decodes one job. The record's bytes stay with the job until its outcome is
/// published, so any later failure can still dead-letter the original.
pub(crate) fn prepare(job: &Job, decoder: &Decoder) -> Result<(ImageEvent, ModelInput), Rejection> {
    let value = job.value.as_deref();
    // Base64 inflates by 4/3; anything beyond that is over the limit whatever it holds.
    let limit = decoder.max_payload_bytes() / 3 * 4 + 64 * 1024;
    if value.map_or(0, <[u8]>::len) > limit {
        return Err(Rejection::new(
            ErrorKind::TooLarge,
            format!("record value is {} bytes, over the limit for decode.max_payload_bytes", value.map_or(0, <[u8]>::len)),
        ));
    }
    let id = crate::event::header_str(&job.headers, HEADER_IMAGE_ID);
    let class = crate::event::header_str(&job.headers, HEADER_CLASS);
    let mut event = parse_event(value, id, class, &job.source())?;
    let input = decoder.decode(&event.image, value.unwrap_or_default())?;
    event.image = ImageSource::Inline(Vec::new());
    Ok((event, input))
}

/// Runs `f`, turning a panic into a rejection: a bug on one input must not leave its offset
/// pending forever or take a worker thread down.
pub(crate) fn guard<T>(what: &str, f: impl FnOnce() -> Result<T, Rejection>) -> Result<T, Rejection> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let message = super::panic_message(panic.as_ref());
        tracing::error!(what, %message, "panic caught; dead-lettering the input");
        Err(Rejection::new(ErrorKind::Internal, format!("{what} panicked: {message}")))
    })
}

fn decode_loop(jobs: Receiver<(Job, Arc<ActiveModel>)>, to_batch: Sender<Decoded>, decoder: &Decoder, sink: &dyn OutcomeSink, metrics: &Metrics) {
    for (job, model) in jobs {
        match guard("decoder", || prepare(&job, decoder)) {
            Ok((event, input)) => {
                metrics.queue_depth.inc();
                if to_batch.send(Decoded { job, model, event, input }).is_err() {
                    return;
                }
            }
            Err(rejection) => sink.accept(Outcome::Rejected { job, rejection }),
        }
    }
}

/// Triton-style dynamic batching, pulled by the engine: a batch closes when full, when an item
/// stamped with another model arrives (one model per batch; that item opens the next batch), or
/// when `max_delay_ms` after its first item passed and an engine worker is free to take it. While
/// every worker is busy it keeps filling, so under a backlog batches come out full instead of
/// alternating between what 10 ms gathered and what piled up behind it. `to_engine` must be a
/// zero-capacity channel, so that a send completes only when a worker takes the batch.
fn batch_loop<T>(decoded: Receiver<T>, to_engine: Sender<Vec<T>>, settings: &BatchSettings, metrics: &Metrics, same_model: impl Fn(&T, &T) -> bool) {
    let max_delay = settings.max_delay;
    let mut carried: Option<T> = None;
    loop {
        let first = match carried.take() {
            Some(item) => item,
            None => match decoded.recv() {
                Ok(item) => item,
                Err(_) => return,
            },
        };
        let deadline = Instant::now() + max_delay;
        let mut batch = vec![first];
        let mut closed = false;
        while batch.len() < settings.max_batch {
            match decoded.recv_deadline(deadline) {
                Ok(item) if same_model(&item, &batch[0]) => batch.push(item),
                Ok(item) => {
                    carried = Some(item);
                    break;
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        // Past the delay: hand the batch to the first free worker, taking more items meanwhile.
        while carried.is_none() && !closed && batch.len() < settings.max_batch {
            let mut ready = Select::new();
            let send = ready.send(&to_engine);
            ready.recv(&decoded);
            let op = ready.select();
            if op.index() == send {
                let size = batch.len();
                if op.send(&to_engine, batch).is_err() {
                    return;
                }
                count_batch(metrics, size);
                batch = Vec::new();
                break;
            }
            match op.recv(&decoded) {
                Ok(item) if same_model(&item, &batch[0]) => batch.push(item),
                Ok(item) => carried = Some(item),
                Err(_) => closed = true,
            }
        }
        if !batch.is_empty() {
            let size = batch.len();
            if to_engine.send(batch).is_err() {
                return;
            }
            count_batch(metrics, size);
        }
        if closed {
            return;
        }
    }
}

fn count_batch(metrics: &Metrics, size: usize) {
    metrics.queue_depth.dec_by(size as i64);
    metrics.batch_size.observe(size as f64);
    metrics.batches.inc();
    metrics.batched_images.inc_by(size as u64);
}

fn engine_loop(slot: usize, batches: Receiver<Vec<Decoded>>, sink: &dyn OutcomeSink, metrics: &Metrics) {
    let mut buffer = Vec::new();
    for batch in batches {
        // The batcher keeps one model per batch.
        let model = batch[0].model.clone();
        let (engine, s) = (&model.engine, model.engine.input_size() as usize);
        let mut run = |items: &[Decoded]| -> Result<(BatchOutput, f64), String> {
            buffer.clear();
            for d in items {
                buffer.extend_from_slice(&d.input.rgb);
            }
            let started = Instant::now();
            let result = guard("inference", || engine.run(slot, &buffer, items.len()).map_err(|e| Rejection::new(ErrorKind::Inference, format!("{e:#}"))));
            let inference_ms = started.elapsed().as_secs_f64() * 1000.0;
            metrics.inference_seconds.observe(inference_ms / 1000.0);
            result.map(|out| (out, inference_ms)).map_err(|r| r.message)
        };
        run_isolating_failures(
            batch,
            &mut run,
            &mut |items, out, inference_ms| {
                for (i, d) in items.into_iter().enumerate() {
                    let raw_score = match usable_score(out.scores[i], &model) {
                        Ok(raw_score) => raw_score,
                        Err(rejection) => {
                            sink.accept(Outcome::Rejected { job: d.job, rejection });
                            continue;
                        }
                    };
                    let map = MapSlice::new(out.maps.clone(), i * s * s..(i + 1) * s * s);
                    let scored = Scored { job: d.job, model: model.clone(), event: d.event, input: d.input, raw_score, map, inference_ms };
                    sink.accept(Outcome::Scored(Box::new(scored)));
                }
            },
            &mut |d, error| {
                sink.accept(Outcome::Rejected { job: d.job, rejection: Rejection::new(ErrorKind::Inference, error) });
            },
        );
    }
}

/// A raw score that can be published. NaN or infinite is the model failing on this image (JSON has
/// no such number, and no threshold can judge it): the image is dead-lettered as `model_output`
/// rather than scored, so nothing is lost and the error names the model.
fn usable_score(raw_score: f32, model: &ActiveModel) -> Result<f32, Rejection> {
    if raw_score.is_finite() {
        return Ok(raw_score);
    }
    Err(Rejection::new(
        ErrorKind::ModelOutput,
        format!("model {} {} returned the score {raw_score} for this image, not a finite number", model.model.name, model.model.version),
    ))
}

/// Runs a batch; when it fails, retries it once (a transient error such as a GPU out of
/// memory), then splits it in halves until the failing images are alone: only those are
/// dead-lettered (with their payload), every other image is scored.
fn run_isolating_failures<T, R>(
    batch: Vec<T>,
    run: &mut impl FnMut(&[T]) -> Result<(R, f64), String>,
    scored: &mut impl FnMut(Vec<T>, R, f64),
    failed: &mut impl FnMut(T, String),
) {
    let mut attempt = |items: &[T]| {
        run(items).or_else(|e| {
            tracing::warn!(error = %e, size = items.len(), "inference failed; retrying once");
            run(items)
        })
    };
    let mut todo = vec![batch];
    while let Some(mut items) = todo.pop() {
        match attempt(&items) {
            Ok((out, ms)) => scored(items, out, ms),
            Err(e) if items.len() == 1 => {
                tracing::error!(error = %e, "inference fails on this image; dead-lettering it");
                failed(items.pop().expect("one"), e);
            }
            Err(e) => {
                tracing::warn!(error = %e, size = items.len(), "inference failed twice; splitting the batch to isolate the failing image");
                let back = items.split_off(items.len() / 2);
                todo.push(back);
                todo.push(items);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model double that fails on any batch holding a poison item, and once on the first call.
    #[test]
    fn a_poison_image_is_isolated_and_the_rest_scored() {
        let batch: Vec<u32> = (0..13).collect();
        let poison = [5u32, 11];
        let mut calls = 0;
        let mut run = |items: &[u32]| -> Result<(Vec<u32>, f64), String> {
            calls += 1;
            if calls == 1 {
                return Err("transient".into());
            }
            match items.iter().find(|i| poison.contains(i)) {
                Some(p) => Err(format!("bad input {p}")),
                None => Ok((items.iter().map(|i| i * 10).collect(), 1.0)),
            }
        };
        let (mut ok, mut bad) = (Vec::new(), Vec::new());
        run_isolating_failures(
            batch,
            &mut run,
            &mut |items: Vec<u32>, out: Vec<u32>, _| {
                assert_eq!(out, items.iter().map(|i| i * 10).collect::<Vec<_>>(), "outputs stay with their inputs");
                ok.extend(items)
            },
            &mut |item, e| bad.push((item, e)),
        );
        ok.sort();
        assert_eq!(ok, (0..13).filter(|i| !poison.contains(i)).collect::<Vec<_>>());
        bad.sort();
        assert_eq!(bad, vec![(5, "bad input 5".to_string()), (11, "bad input 11".to_string())]);
    }

    #[test]
    fn a_transient_failure_is_retried_once() {
        let mut calls = 0;
        let mut run = |items: &[u32]| -> Result<(usize, f64), String> {
            calls += 1;
            if calls == 1 {
                Err("oom".into())
            } else {
                Ok((items.len(), 1.0))
            }
        };
        let mut scored = 0;
        run_isolating_failures(vec![1, 2, 3], &mut run, &mut |_, n, _| scored += n, &mut |_, e| panic!("{e}"));
        assert_eq!(scored, 3);
    }

    /// Items tagged (offset, model); a swap arrives mid-stream while the batcher is filling.
    #[test]
    fn a_batch_never_mixes_models_and_the_item_that_closes_it_opens_the_next() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (to_engine, batches) = crossbeam_channel::unbounded();
        for item in [(0, 'a'), (1, 'a'), (2, 'a'), (3, 'b'), (4, 'b'), (5, 'a'), (6, 'b'), (7, 'b'), (8, 'b'), (9, 'b')] {
            tx.send(item).unwrap();
        }
        drop(tx);
        let settings = BatchSettings { max_batch: 3, max_delay: std::time::Duration::from_secs(5), queue_capacity: 16 };
        batch_loop(rx, to_engine, &settings, &Metrics::new(), |x: &(i32, char), y: &(i32, char)| x.1 == y.1);
        let got: Vec<Vec<(i32, char)>> = batches.iter().collect();
        let offsets: Vec<Vec<i32>> = got.iter().map(|b| b.iter().map(|i| i.0).collect()).collect();
        assert_eq!(offsets, vec![vec![0, 1, 2], vec![3, 4], vec![5], vec![6, 7, 8], vec![9]], "nothing lost, nothing reordered");
        assert!(got.iter().all(|b| b.iter().all(|i| i.1 == b[0].1)), "one model per batch: {got:?}");
    }

    /// While no worker is free the batch keeps filling past the delay; a free worker gets what
    /// the delay gathered. Failed before the engine pulled: the batch closed 10 ms after item 0.
    #[test]
    fn a_batch_grows_while_the_engine_is_busy_and_goes_at_the_delay_when_it_is_free() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (to_engine, batches) = crossbeam_channel::bounded(0);
        let settings = BatchSettings { max_batch: 4, max_delay: std::time::Duration::from_millis(10), queue_capacity: 16 };
        let batcher = std::thread::spawn(move || batch_loop(rx, to_engine, &settings, &Metrics::new(), |_: &i32, _: &i32| true));
        tx.send(0).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100)); // the engine is busy well past the delay
        for i in 1..6 {
            tx.send(i).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(batches.recv().unwrap(), vec![0, 1, 2, 3], "filled while no worker was free");
        assert_eq!(batches.recv().unwrap(), vec![4, 5], "a free worker takes what the delay gathered");
        tx.send(6).unwrap();
        assert_eq!(batches.recv().unwrap(), vec![6]);
        drop(tx);
        batcher.join().unwrap();
        assert!(batches.recv().is_err(), "nothing more");
    }

    #[test]
    fn a_panic_becomes_a_rejection() {
        let r: Result<(), Rejection> = guard("decoder", || panic!("boom {}", 7));
        let err = r.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Internal);
        assert!(err.message.contains("decoder panicked: boom 7"), "{err}");
    }
}

//! Engine: ONNX Runtime sessions for the DCAM model (loaded dynamically, docs/DESIGN.md §7).

use std::path::Path;
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use ort::ep;
use ort::session::{builder::GraphOptimizationLevel, Session};
use ort::value::TensorRef;

use crate::config::{EngineSettings, Provider};
use crate::inference::model::ModelInfo;
use crate::inference::model_source::{read_file, ModelBytes};

static ENVIRONMENT: OnceLock<ort::environment::Environment> = OnceLock::new();

/// Loads `libonnxruntime.so` once per process. A missing library becomes a clear error, not a panic.
pub(crate) fn environment() -> Result<&'static ort::environment::Environment> {
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env);
    }
    let path = std::env::var("ORT_DYLIB_PATH").unwrap_or_else(|_| default_dylib_path());
    if !Path::new(&path).exists() {
        bail!("ONNX Runtime library not found at {path:?}: run scripts/fetch-ort.sh or set ORT_DYLIB_PATH");
    }
    let builder = ort::init_from(&path).map_err(|e| anyhow!("cannot load ONNX Runtime from {path:?}: {e}"))?;
    let env = builder.with_name("dcam-stream").build().map_err(|e| anyhow!("cannot create ONNX Runtime environment: {e}"))?;
    Ok(ENVIRONMENT.get_or_init(|| env))
}

/// Next to the binary (container layout) or the repo's `.ort/` (development).
fn default_dylib_path() -> String {
    let beside_exe = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("libonnxruntime.so")));
    match beside_exe {
        Some(p) if p.exists() => p.display().to_string(),
        _ => concat!(env!("CARGO_MANIFEST_DIR"), "/.ort/libonnxruntime.so").to_string(),
    }
}

/// Model outputs for one batch.
#[derive(Debug, Clone)]
pub(crate) struct BatchOutput {
    /// `n * size * size` raw anomaly maps, row-major per image; shared by the images' `MapSlice`s.
    pub maps: std::sync::Arc<Vec<f32>>,
    pub scores: Vec<f32>,
}

pub(crate) struct Engine {
    sessions: Vec<Mutex<Session>>,
    pub info: ModelInfo,
    /// The execution provider that actually serves the sessions.
    pub provider: &'static str,
    /// SHA-256 of the model file the sessions were built from.
    pub sha256: String,
}

impl Engine {
    /// Loads a model file as it is (the tools); the operator reads models with its limits first
    /// (`from_bytes`).
    pub(crate) fn load(model_path: &Path, settings: &EngineSettings) -> Result<Self> {
        if !model_path.exists() {
            bail!("model file {} does not exist", model_path.display());
        }
        let bytes = std::fs::read(model_path).with_context(|| format!("reading {}", model_path.display()))?;
        Self::from_bytes(&ModelBytes::new(bytes), &model_path.display().to_string(), settings)
    }

    /// Builds the sessions from a model already in memory; `name` says where it came from in errors.
    pub(crate) fn from_bytes(model: &ModelBytes, name: &str, settings: &EngineSettings) -> Result<Self> {
        let env = environment()?;
        let mut sessions = Vec::new();
        let mut provider = "cpu";
        for _ in 0..settings.sessions {
            let (session, used) = build_session(env, model, name, settings)?;
            provider = used;
            sessions.push(Mutex::new(session));
        }
        let info = {
            let s = sessions[0].lock().expect("fresh mutex");
            check_signature(&s)?;
            let meta = s.metadata().map_err(|e| anyhow!("cannot read model metadata: {e}"))?;
            ModelInfo::from_metadata(|k| meta.custom(k)).with_context(|| format!("model {name} does not follow the contract"))?
        };
        Ok(Self { sessions, info, provider, sha256: model.sha256.clone() })
    }

    pub(crate) fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub(crate) fn input_size(&self) -> u32 {
        self.info.input_size
    }

    /// Runs `n` images (`n*S*S*3` RGB bytes) on session `slot`.
    pub(crate) fn run(&self, slot: usize, images: &[u8], n: usize) -> Result<BatchOutput> {
        let s = self.info.input_size as usize;
        if images.len() != n * s * s * 3 {
            bail!("batch buffer holds {} bytes, expected {}", images.len(), n * s * s * 3);
        }
        let mut session = self.sessions[slot % self.sessions.len()].lock().map_err(|_| anyhow!("session poisoned"))?;
        let input = TensorRef::from_array_view(([n, s, s, 3], images)).map_err(|e| anyhow!("input tensor: {e}"))?;
        let outputs = session.run(ort::inputs!["image" => input]).map_err(|e| anyhow!("inference failed: {e}"))?;
        let (map_shape, maps) = outputs["anomaly_map"].try_extract_tensor::<f32>().map_err(|e| anyhow!("anomaly_map: {e}"))?;
        let (_, scores) = outputs["score"].try_extract_tensor::<f32>().map_err(|e| anyhow!("score: {e}"))?;
        if maps.len() != n * s * s || scores.len() != n {
            bail!("model returned anomaly_map {:?} and {} scores for a batch of {n}", &**map_shape, scores.len());
        }
        Ok(BatchOutput { maps: std::sync::Arc::new(maps.to_vec()), scores: scores.to_vec() })
    }

    /// Runs `engine.warmup_batches` dummy batches (at least one: a model that cannot answer a
    /// batch is refused before it serves) of up to 8 images on every session, so the first real
    /// request is not slow.
    pub(crate) fn warm_up(&self, settings: &EngineSettings, max_batch: usize) -> Result<()> {
        let batch = max_batch.clamp(1, 8);
        let s = self.info.input_size as usize;
        let zeros = vec![127u8; batch * s * s * 3];
        for slot in 0..self.sessions.len() {
            for _ in 0..settings.warmup_batches.max(1) {
                self.run(slot, &zeros, batch)?;
            }
        }
        Ok(())
    }
}

fn build_session(env: &ort::environment::Environment, model: &ModelBytes, name: &str, settings: &EngineSettings) -> Result<(Session, &'static str)> {
    // Builder errors are not Send: turn them into strings before `?`.
    let mut builder = Session::builder(env)
        .map_err(|e| anyhow!("session builder: {e}"))?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| anyhow!("optimization level: {e}"))?;
    if settings.intra_threads > 0 {
        builder = builder.with_intra_threads(settings.intra_threads).map_err(|e| anyhow!("intra threads: {e}"))?;
    }
    // Idle intra-op threads spin by default and burn the cores the decode workers need; without
    // spinning, end-to-end throughput on 2 cores went up by a fifth to a half (scripts/bench.sh).
    builder = builder.with_intra_op_spinning(false).map_err(|e| anyhow!("intra-op spinning: {e}"))?;
    let provider = match settings.provider {
        Provider::Cpu => {
            if !settings.cpu_arena {
                // Without the arena, memory patterns would pre-plan buffers per shape all the same.
                builder = builder.with_memory_pattern(false).map_err(|e| anyhow!("memory pattern: {e}"))?;
                ep::CPU::default().with_arena_allocator(false).build().error_on_failure().register(&mut builder).map_err(|e| anyhow!("CPU provider: {e}"))?;
            }
            "cpu"
        }
        Provider::Cuda | Provider::Tensorrt => {
            let (name, dispatch) = gpu_provider(settings);
            match dispatch.error_on_failure().register(&mut builder) {
                Ok(()) => name,
                Err(e) if settings.require_gpu => bail!("engine.provider = {name} could not be used and engine.require_gpu is set: {e}"),
                Err(e) => {
                    tracing::warn!(provider = name, error = %e, "GPU execution provider unavailable, falling back to CPU");
                    "cpu"
                }
            }
        }
    };
    let session = builder.commit_from_memory(&model.bytes).map_err(|e| anyhow!("cannot load model {name}: {e}"))?;
    Ok((session, provider))
}

fn gpu_provider(settings: &EngineSettings) -> (&'static str, ep::ExecutionProviderDispatch) {
    match settings.provider {
        Provider::Tensorrt => {
            let mut trt = ep::TensorRT::default().with_device_id(settings.device_id).with_fp16(settings.trt_fp16);
            if let Some(cache) = &settings.trt_engine_cache {
                trt = trt.with_engine_cache(true).with_engine_cache_path(cache);
            }
            ("tensorrt", trt.build())
        }
        _ => ("cuda", ep::CUDA::default().with_device_id(settings.device_id).build()),
    }
}

/// Checks input/output names, element types and the dynamic batch dimension against
/// docs/DESIGN.md §1.
fn check_signature(session: &Session) -> Result<()> {
    use ort::value::TensorElementType as T;
    use ort::value::ValueType;
    let wanted = [
        ("input", session.inputs(), "image", T::Uint8),
        ("output", session.outputs(), "anomaly_map", T::Float32),
        ("output", session.outputs(), "score", T::Float32),
    ];
    for (side, outlets, name, ty) in wanted {
        let Some(outlet) = outlets.iter().find(|o| o.name() == name) else {
            bail!("model has no {side} {name:?}");
        };
        match outlet.dtype() {
            ValueType::Tensor { ty: t, .. } if *t == ty => {}
            other => bail!("model {side} {name:?} is {other:?}, expected a {ty:?} tensor"),
        }
    }
    check_dynamic_batch(session)
}

/// Batches hold 1 to `batch.max_batch` images; a model fixed to one size (ONNX Runtime reports
/// dynamic dimensions as -1) would fail every other batch and dead-letter its images.
fn check_dynamic_batch(session: &Session) -> Result<()> {
    use ort::value::ValueType;
    let image = session.inputs().iter().find(|o| o.name() == "image").map(|o| o.dtype());
    if let Some(ValueType::Tensor { shape, .. }) = image {
        if let Some(&n) = shape.first().filter(|&&n| n >= 0) {
            bail!(
                "model input \"image\" has a fixed batch dimension of {n} (shape {:?}); it must be dynamic, batches hold 1 to batch.max_batch images",
                &**shape
            );
        }
    }
    Ok(())
}

/// Loads the model named in the settings, within `model.max_bytes`, and warms it up (blocking;
/// call off the executor).
pub(crate) fn load_configured(settings: &crate::config::Settings) -> Result<std::sync::Arc<Engine>> {
    let model = read_file(Path::new(&settings.model.path), settings.model.max_bytes).context("model.path")?;
    let engine = Engine::from_bytes(&model, &settings.model.path, &settings.engine)?;
    engine.warm_up(&settings.engine, settings.batch.max_batch)?;
    tracing::info!(model = %engine.info.name, version = %engine.info.version, provider = engine.provider, input_size = engine.info.input_size, classes = ?engine.info.classes, "model loaded");
    Ok(std::sync::Arc::new(engine))
}

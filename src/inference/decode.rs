//! Decode: image bytes (inline or fetched by URI) → RGB, resized to the model's S×S.
//! Runs on the decode worker pool, never on the async executor.

use std::cell::RefCell;
use std::io::Cursor;
use std::path::{Component, PathBuf};
use std::sync::Arc;

use fast_image_resize as fr;
use image::{ImageDecoder, ImageFormat, ImageReader};

use crate::config::{DecodeSettings, S3Settings};
use crate::event::{ErrorKind, ImageSource, Rejection};
use crate::memory::{default_decode_budget, MemoryBudget};

/// Formats we accept; anything else sniffed is `unsupported_format`.
const SUPPORTED: [ImageFormat; 6] = [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Bmp, ImageFormat::Tiff, ImageFormat::Gif, ImageFormat::WebP];

/// A decode worker keeps the pixels of its last image up to this size for the next one; a larger
/// frame's buffer is freed after use, so a burst of huge images does not stay resident per worker.
const KEEP_PIXEL_BYTES: usize = 16 << 20;

/// Per decode worker (each is a thread of its own): the resizer with its scratch buffers, the
/// decoded pixels and libjpeg-turbo's decompressor, reused from image to image.
struct Scratch {
    resizer: fr::Resizer,
    pixels: Vec<u8>,
    /// Made on the worker's first large JPEG (a TurboJPEG handle is not `Send`: one per thread).
    jpeg: Option<turbojpeg::Decompressor>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch { resizer: fr::Resizer::new(), pixels: Vec::new(), jpeg: None });
}

/// An image ready for the model: `size*size*3` RGB bytes, channels last.
#[derive(Debug, Clone)]
pub struct ModelInput {
    pub rgb: Vec<u8>,
    pub size: u32,
    pub original_width: u32,
    pub original_height: u32,
}

#[derive(Clone)]
pub struct Decoder {
    limits: DecodeSettings,
    /// The configured root and its canonical form: a path must lie under one of them.
    file_root: Option<(PathBuf, PathBuf)>,
    size: u32,
    budget: Arc<MemoryBudget>,
    s3: Option<S3Fetcher>,
    /// JPEGs at least 8×S on both sides decode at a reduced DCT scale (1/2, 1/4, 1/8) first, down to
    /// no less than 4×S (`IDCT_KEEPS_SIZES`).
    jpeg_scaling: bool,
}

impl Decoder {
    pub fn new(limits: DecodeSettings, size: u32) -> Self {
        let file_root = limits.file_uri_root.as_ref().map(|root| {
            let root = PathBuf::from(root);
            let canonical = root.canonicalize().unwrap_or_else(|_| root.clone());
            (root, canonical)
        });
        let budget = match limits.max_decode_bytes {
            0 => default_decode_budget(),
            n => n,
        };
        Self { limits, file_root, size, budget: Arc::new(MemoryBudget::new(budget)), s3: None, jpeg_scaling: true }
    }

    /// Serves `s3://bucket/key` image URIs with these connection settings, on `runtime`.
    pub fn with_s3(mut self, settings: &S3Settings, runtime: tokio::runtime::Handle) -> Self {
        self.s3 = Some(S3Fetcher { settings: settings.clone(), runtime, stores: Default::default() });
        self
    }

    /// Turns reduced-scale JPEG decoding off (full decode, then resize), e.g. to measure it.
    pub fn with_jpeg_scaling(mut self, on: bool) -> Self {
        self.jpeg_scaling = on;
        self
    }

    pub fn settings(&self) -> &DecodeSettings {
        &self.limits
    }

    /// The decoder the operator runs: with `s3://` image URIs when an async runtime is at hand.
    pub fn with_s3_if_async(settings: &DecodeSettings, s3: &S3Settings, size: u32) -> Self {
        let d = Self::new(settings.clone(), size);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => d.with_s3(s3, runtime),
            Err(_) => d,
        }
    }

    pub fn max_payload_bytes(&self) -> usize {
        self.limits.max_payload_bytes
    }

    pub fn budget(&self) -> &MemoryBudget {
        &self.budget
    }

    /// Full path from an event's image to the model input; `record_value` is the record the event
    /// came in (the image itself for `ImageSource::RecordValue`).
    pub fn decode(&self, source: &ImageSource, record_value: &[u8]) -> Result<ModelInput, Rejection> {
        match source {
            ImageSource::RecordValue => self.decode_bytes(record_value),
            ImageSource::Inline(bytes) => self.decode_bytes(bytes),
            ImageSource::Uri(uri) => {
                let bytes = self.fetch(uri)?;
                self.decode_bytes(&bytes)
            }
        }
    }

    /// Reads a claim-check URI: `file://` under `decode.file_uri_root`, or `s3://`.
    pub fn fetch(&self, uri: &str) -> Result<Vec<u8>, Rejection> {
        let url = url::Url::parse(uri).map_err(|e| Rejection::new(ErrorKind::Fetch, format!("image_uri is not a valid URI: {e}")))?;
        match url.scheme() {
            "file" => self.fetch_file(uri, &url),
            "s3" => match &self.s3 {
                Some(s3) => s3.fetch(&url, self.limits.max_payload_bytes),
                None => Err(Rejection::new(ErrorKind::Fetch, "s3:// image_uri is not available here")),
            },
            other => Err(Rejection::new(ErrorKind::Fetch, format!("unsupported image_uri scheme {other:?} (file:// and s3:// are served)"))),
        }
    }

    fn fetch_file(&self, uri: &str, url: &url::Url) -> Result<Vec<u8>, Rejection> {
        let Some((root, canonical_root)) = &self.file_root else {
            return Err(Rejection::new(ErrorKind::Fetch, "file:// image_uri is disabled (set decode.file_uri_root)"));
        };
        // `file:///p` and `file://localhost/p`, percent-decoded; other hosts are not ours.
        let outside = || Rejection::new(ErrorKind::Fetch, format!("{uri} is outside decode.file_uri_root"));
        let path = match url.host_str() {
            None | Some("") | Some("localhost") => url.to_file_path().map_err(|_| outside())?,
            Some(_) => return Err(outside()),
        };
        // Decide on the words of the path first, so the answer for a path outside the root never
        // depends on what exists there; then again on the resolved path (symlinks).
        let lexically_inside = !path.components().any(|c| matches!(c, Component::ParentDir)) && (path.starts_with(root) || path.starts_with(canonical_root));
        if !lexically_inside {
            return Err(outside());
        }
        let unreadable = |e: std::io::Error| Rejection::new(ErrorKind::Fetch, format!("cannot read {uri}: {e}"));
        let resolved = path.canonicalize().map_err(unreadable)?;
        if !resolved.starts_with(canonical_root) {
            return Err(outside());
        }
        // Non-blocking open: a FIFO or device must not hang a decode worker.
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&resolved).map_err(unreadable)?;
        let meta = file.metadata().map_err(unreadable)?;
        if !meta.is_file() {
            return Err(Rejection::new(ErrorKind::Fetch, format!("{uri} is not a regular file")));
        }
        if meta.len() as usize > self.limits.max_payload_bytes {
            return Err(too_large_bytes(meta.len() as usize, self.limits.max_payload_bytes));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        use std::io::Read;
        file.take(self.limits.max_payload_bytes as u64 + 1).read_to_end(&mut bytes).map_err(unreadable)?;
        Ok(bytes)
    }

    pub fn decode_bytes(&self, bytes: &[u8]) -> Result<ModelInput, Rejection> {
        if bytes.is_empty() {
            return Err(Rejection::new(ErrorKind::Schema, "empty image"));
        }
        if bytes.len() > self.limits.max_payload_bytes {
            return Err(too_large_bytes(bytes.len(), self.limits.max_payload_bytes));
        }
        let format = image::guess_format(bytes).map_err(|_| Rejection::new(ErrorKind::UnsupportedFormat, "unrecognised image format"))?;
        if !SUPPORTED.contains(&format) {
            return Err(Rejection::new(ErrorKind::UnsupportedFormat, format!("image format {format:?} is not supported")));
        }
        // Decompression-bomb guard: read only the header, then check the pixel count.
        let (w, h) = match png_dimensions(bytes) {
            Some(dims) if format == ImageFormat::Png => dims,
            _ => ImageReader::with_format(Cursor::new(bytes), format)
                .into_dimensions()
                .map_err(|e| Rejection::new(ErrorKind::Decode, format!("cannot read {format:?} header: {e}")))?,
        };
        let pixels = w as u64 * h as u64;
        if pixels > self.limits.max_pixels {
            return Err(Rejection::new(
                ErrorKind::TooLarge,
                format!("image is {w}x{h} = {pixels} pixels, over decode.max_pixels = {}", self.limits.max_pixels),
            ));
        }
        if pixels == 0 {
            return Err(Rejection::new(ErrorKind::Decode, "image has zero pixels"));
        }
        if format == ImageFormat::Jpeg && self.jpeg_scaling {
            if let Some(k) = jpeg_scale_divisor(w, h, self.size) {
                match self.decode_jpeg_scaled(bytes, (w, h), k) {
                    Some(Ok(input)) => return Ok(input),
                    Some(Err(e)) if e.kind != ErrorKind::Decode => return Err(e),
                    // Not for this path, or libjpeg-turbo refused it (even a warning, such as a
                    // truncated scan, is a refusal there): the full decoder decides.
                    _ => {}
                }
            }
        }
        let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(w);
        limits.max_image_height = Some(h);
        limits.max_alloc = Some(pixels * 8 + (64 << 20));
        reader.limits(limits);
        let decoder = reader.into_decoder().map_err(|e| Rejection::new(ErrorKind::Decode, format!("cannot decode {format:?}: {e}")))?;
        // What decoding will hold: the pixels in their own type (16-bit RGBA is 8 bytes each),
        // plus the 8-bit RGB copy unless they already are that.
        let native = decoder.total_bytes();
        let rgb_copy = if decoder.color_type() == image::ColorType::Rgb8 { 0 } else { pixels * 3 };
        let need = native.saturating_add(rgb_copy);
        let Some(_reservation) = self.budget.reserve(need) else {
            return Err(Rejection::new(
                ErrorKind::TooLarge,
                format!("decoding this {w}x{h} {:?} image needs {need} bytes, over decode.max_decode_bytes = {}", decoder.color_type(), self.budget.limit()),
            ));
        };
        let failed = |e: image::ImageError| Rejection::new(ErrorKind::Decode, format!("cannot decode {format:?}: {e}"));
        let resized = if decoder.color_type() == image::ColorType::Rgb8 {
            // Already what the model takes: decoded straight into this worker's pixel buffer.
            SCRATCH.with_borrow_mut(|scratch| {
                let Scratch { resizer, pixels, .. } = scratch;
                decode_in_place(resizer, pixels, (w, h), self.size, |buf| decoder.read_image(buf).map_err(failed))
            })?
        } else {
            let rgb = image::DynamicImage::from_decoder(decoder).map_err(failed)?.into_rgb8();
            resize_rgb(rgb.as_raw(), w, h, self.size)?
        };
        Ok(ModelInput { rgb: resized, size: self.size, original_width: w, original_height: h })
    }
}

impl Decoder {
    /// A JPEG much larger than S: libjpeg-turbo runs the IDCT at 1/`k` scale (`jpeg_scale_divisor`),
    /// so a 2048² camera frame becomes 1024² before the resize touches it, decoded straight into
    /// this worker's pixel buffer. None: not for this path (CMYK, lossless, or a header
    /// libjpeg-turbo cannot read); the caller decodes at full scale as for any other image.
    fn decode_jpeg_scaled(&self, bytes: &[u8], (w, h): (u32, u32), k: u32) -> Option<Result<ModelInput, Rejection>> {
        use turbojpeg::Colorspace as C;
        SCRATCH.with_borrow_mut(|scratch| {
            let Scratch { resizer, pixels, jpeg } = scratch;
            if jpeg.is_none() {
                *jpeg = Some(turbojpeg::Decompressor::new().ok()?);
            }
            let decompressor = jpeg.as_mut()?;
            let header = decompressor.read_header(bytes).ok()?;
            let readable = matches!(header.colorspace, C::YCbCr | C::Gray | C::RGB) && !header.is_lossless;
            if !readable || (header.width, header.height) != (w as usize, h as usize) {
                return None;
            }
            let factor = turbojpeg::ScalingFactor::new(1, k as usize);
            decompressor.set_scaling_factor(factor).ok()?;
            let scaled = header.scaled(factor);
            let (sw, sh) = (scaled.width, scaled.height);
            // A progressive JPEG keeps every DCT coefficient of the full frame while it decodes:
            // 2 bytes per sample, at most 3 samples per pixel.
            let coefficients = if header.is_progressive { w as u64 * h as u64 * 6 } else { 0 };
            let need = (sw * sh * 3) as u64 + coefficients;
            let Some(_reservation) = self.budget.reserve(need) else {
                return Some(Err(Rejection::new(
                    ErrorKind::TooLarge,
                    format!("decoding this {w}x{h} JPEG at 1/{k} scale needs {need} bytes, over decode.max_decode_bytes = {}", self.budget.limit()),
                )));
            };
            let resized = decode_in_place(resizer, pixels, (sw as u32, sh as u32), self.size, |buf| {
                let image = turbojpeg::Image { pixels: buf, width: sw, pitch: sw * 3, height: sh, format: turbojpeg::PixelFormat::RGB };
                decompressor.decompress(bytes, image).map_err(|e| Rejection::new(ErrorKind::Decode, format!("cannot decode Jpeg: {e}")))
            });
            Some(resized.map(|rgb| ModelInput { rgb, size: self.size, original_width: w, original_height: h }))
        })
    }
}

/// A reduced-scale IDCT must leave at least this many times S on each side for the antialiased
/// resize to finish the job. The model was trained on bilinear (triangle-filtered) reductions; an
/// IDCT at 1/8 straight to S is a box average instead, and the model sees its texture as a defect.
/// Measured on bottle images re-encoded as 2048² JPEG (raw score minus the full decode's; threshold
/// 7.15): IDCT to S, +8.8 median on 42 training normals (19 flagged) and every test normal flagged;
/// to 2×S, +1.8 (max 2.6); to 4×S, +0.17 (max 0.33), and on the test split the same flags as full decode.
const IDCT_KEEPS_SIZES: u32 = 4;

/// The largest IDCT reduction (8, 4 or 2) that still leaves both sides at least
/// `IDCT_KEEPS_SIZES × size`; None when a JPEG is smaller than that at 1/2 (it decodes at full
/// scale, unchanged).
pub(crate) fn jpeg_scale_divisor(w: u32, h: u32, size: u32) -> Option<u32> {
    if w > u16::MAX as u32 || h > u16::MAX as u32 {
        return None;
    }
    let keep = size.saturating_mul(IDCT_KEEPS_SIZES);
    [8, 4, 2].into_iter().find(|&k| w.div_ceil(k) >= keep && h.div_ceil(k) >= keep)
}

/// Reads `s3://bucket/key` objects with the S3 connection settings, one client per bucket.
#[derive(Clone)]
struct S3Fetcher {
    settings: S3Settings,
    runtime: tokio::runtime::Handle,
    stores: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<dyn object_store::ObjectStore>>>>,
}

impl S3Fetcher {
    fn fetch(&self, url: &url::Url, max_bytes: usize) -> Result<Vec<u8>, Rejection> {
        let fail = |m: String| Rejection::new(ErrorKind::Fetch, m);
        let bucket = url.host_str().filter(|b| !b.is_empty()).ok_or_else(|| fail(format!("{url} names no bucket")))?;
        let key = object_store::path::Path::from_url_path(url.path()).map_err(|e| fail(format!("{url}: bad object key: {e}")))?;
        let store = {
            let mut stores = self.stores.lock().expect("s3 stores");
            match stores.get(bucket) {
                Some(s) => s.clone(),
                None => {
                    let s: Arc<dyn object_store::ObjectStore> =
                        Arc::new(crate::store::s3_client(&self.settings, bucket, self.settings.request_timeout * 3).map_err(|e| fail(format!("{e:#}")))?);
                    stores.insert(bucket.to_string(), s.clone());
                    s
                }
            }
        };
        // Decode workers are plain threads, never the runtime's own, so blocking here is fine.
        self.runtime.block_on(async {
            let got = store.get(&key).await.map_err(|e| fail(format!("cannot read {url}: {e}")))?;
            if got.meta.size as usize > max_bytes {
                return Err(too_large_bytes(got.meta.size as usize, max_bytes));
            }
            got.bytes().await.map(|b| b.to_vec()).map_err(|e| fail(format!("cannot read {url}: {e}")))
        })
    }
}

/// Width and height from a PNG's IHDR chunk, which the format puts first. The png crate would
/// read on to the first IDAT before answering, which a bomb need not even have.
fn png_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.len() < 24 || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes(bytes[16..20].try_into().ok()?);
    let h = u32::from_be_bytes(bytes[20..24].try_into().ok()?);
    Some((w, h))
}

fn too_large_bytes(len: usize, max: usize) -> Rejection {
    Rejection::new(ErrorKind::TooLarge, format!("payload is {len} bytes, over decode.max_payload_bytes = {max}"))
}

/// Decodes `w`×`h` packed RGB into this worker's `pixels` (by `decode`, which fills the slice it is
/// given) and resizes it to S; a buffer over `KEEP_PIXEL_BYTES` is freed afterwards.
fn decode_in_place(
    resizer: &mut fr::Resizer,
    pixels: &mut Vec<u8>,
    (w, h): (u32, u32),
    size: u32,
    decode: impl FnOnce(&mut [u8]) -> Result<(), Rejection>,
) -> Result<Vec<u8>, Rejection> {
    pixels.clear();
    pixels.resize(w as usize * h as usize * 3, 0);
    let resized = decode(pixels).and_then(|()| resize_with(resizer, pixels, w, h, size));
    if pixels.capacity() > KEEP_PIXEL_BYTES {
        *pixels = Vec::new();
    }
    resized
}

/// Bilinear (antialiased, like PIL's) resize of packed RGB with SIMD, with this thread's resizer.
fn resize_rgb(rgb: &[u8], w: u32, h: u32, size: u32) -> Result<Vec<u8>, Rejection> {
    SCRATCH.with_borrow_mut(|scratch| resize_with(&mut scratch.resizer, rgb, w, h, size))
}

fn resize_with(resizer: &mut fr::Resizer, rgb: &[u8], w: u32, h: u32, size: u32) -> Result<Vec<u8>, Rejection> {
    if w == size && h == size {
        return Ok(rgb.to_vec());
    }
    let failed = |what: &str, e: &dyn std::fmt::Display| Rejection::new(ErrorKind::Decode, format!("{what}: {e}"));
    let src = fr::images::ImageRef::new(w, h, rgb, fr::PixelType::U8x3).map_err(|e| failed("resize source", &e))?;
    let mut dst = fr::images::Image::new(size, size, fr::PixelType::U8x3);
    let options = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear));
    resizer.resize(&src, &mut dst, &options).map_err(|e| failed("resize", &e))?;
    Ok(dst.into_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> DecodeSettings {
        DecodeSettings { max_payload_bytes: 1 << 20, max_pixels: 4_000_000, workers: 1, file_uri_root: None, max_decode_bytes: 64 << 20 }
    }

    pub(crate) fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 128]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
        out
    }

    fn encode(img: image::DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), format).unwrap();
        out
    }

    #[test]
    fn a_worker_reuses_its_buffers_without_carrying_pixels_over() {
        let d = Decoder::new(limits(), 32);
        let big = encode(image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(300, 200, |x, y| image::Rgb([x as u8, y as u8, 7]))), ImageFormat::Png);
        let small = png(48, 40);
        let fresh = std::thread::spawn({
            let (d, small) = (d.clone(), small.clone());
            move || d.decode_bytes(&small).unwrap().rgb
        })
        .join()
        .unwrap();
        d.decode_bytes(&big).unwrap();
        let kept = SCRATCH.with_borrow(|s| s.pixels.capacity());
        assert!(kept >= 300 * 200 * 3, "the big image's pixel buffer is kept for the next image ({kept})");
        assert_eq!(d.decode_bytes(&small).unwrap().rgb, fresh, "the next image decodes as on a fresh worker");
        assert_eq!(SCRATCH.with_borrow(|s| s.pixels.capacity()), kept, "the same buffer served the smaller image");
    }

    #[test]
    fn a_frame_over_the_kept_size_frees_its_buffer_after_use() {
        let mut limits = limits();
        limits.max_payload_bytes = 64 << 20;
        limits.max_pixels = 8_000_000;
        let d = Decoder::new(limits, 32);
        let huge = encode(image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(2600, 2200, image::Rgb([9, 9, 9]))), ImageFormat::Png);
        assert!(2600 * 2200 * 3 > KEEP_PIXEL_BYTES);
        assert_eq!(d.decode_bytes(&huge).unwrap().rgb.len(), 32 * 32 * 3);
        assert_eq!(SCRATCH.with_borrow(|s| s.pixels.capacity()), 0);
    }

    #[test]
    fn formats_and_grayscale_decode_to_rgb_at_model_size() {
        let d = Decoder::new(limits(), 32);
        let rgb = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(50, 40, image::Rgb([200, 10, 10])));
        let gray = image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(40, 60, image::Luma([90])));
        for (img, fmt) in [
            (rgb.clone(), ImageFormat::Png),
            (rgb.clone(), ImageFormat::Jpeg),
            (rgb.clone(), ImageFormat::Bmp),
            (rgb, ImageFormat::Tiff),
            (gray.clone(), ImageFormat::Png),
            (gray, ImageFormat::Jpeg),
        ] {
            let out = d.decode_bytes(&encode(img, fmt)).unwrap_or_else(|e| panic!("{fmt:?}: {e}"));
            assert_eq!(out.rgb.len(), 32 * 32 * 3, "{fmt:?}");
        }
        // Grayscale becomes three equal channels.
        let out = d.decode_bytes(&encode(image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(8, 8, image::Luma([90]))), ImageFormat::Png)).unwrap();
        assert!(out.rgb.chunks(3).all(|p| p == [90, 90, 90]));
    }

    #[test]
    fn rejects_with_the_right_kind() {
        let d = Decoder::new(limits(), 16);
        let good = png(20, 20);
        assert_eq!(d.decode_bytes(&good[..good.len() / 2]).unwrap_err().kind, ErrorKind::Decode);
        assert_eq!(d.decode_bytes(b"hello world, not an image").unwrap_err().kind, ErrorKind::UnsupportedFormat);
        // A recognised but unsupported format (an ICO header).
        let mut ico = vec![0u8, 0, 1, 0, 1, 0, 16, 16];
        ico.resize(200, 7);
        assert_eq!(d.decode_bytes(&ico).unwrap_err().kind, ErrorKind::UnsupportedFormat);
        assert_eq!(d.decode_bytes(&vec![0u8; (1 << 20) + 1]).unwrap_err().kind, ErrorKind::TooLarge);
    }

    #[test]
    fn pixel_bomb_is_refused_before_decoding() {
        let d = Decoder::new(limits(), 16);
        let bomb = crate::testing::png_header_claiming(100_000, 100_000);
        let err = d.decode_bytes(&bomb).unwrap_err();
        assert_eq!(err.kind, ErrorKind::TooLarge, "{err}");
        assert!(err.message.contains("100000x100000"));
    }

    #[test]
    fn file_uri_is_confined_to_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), png(10, 10)).unwrap();
        let mut l = limits();
        let off = Decoder::new(l.clone(), 8);
        let uri = format!("file://{}", dir.path().join("a.png").display());
        assert_eq!(off.decode(&ImageSource::Uri(uri.clone()), &[]).unwrap_err().kind, ErrorKind::Fetch);
        l.file_uri_root = Some(dir.path().display().to_string());
        let on = Decoder::new(l, 8);
        assert_eq!(on.decode(&ImageSource::Uri(uri), &[]).unwrap().rgb.len(), 8 * 8 * 3);
        let missing = format!("file://{}", dir.path().join("missing.png").display());
        assert_eq!(on.decode(&ImageSource::Uri(missing), &[]).unwrap_err().kind, ErrorKind::Fetch);
        assert_eq!(on.decode(&ImageSource::Uri("file:///etc/passwd".into()), &[]).unwrap_err().kind, ErrorKind::Fetch);
        assert_eq!(on.decode(&ImageSource::Uri("http://x/y.png".into()), &[]).unwrap_err().kind, ErrorKind::Fetch);
    }

    #[test]
    fn file_uri_forms_and_what_errors_reveal() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("my dir")).unwrap();
        std::fs::write(dir.path().join("my dir/a.png"), png(10, 10)).unwrap();
        let mut l = limits();
        l.file_uri_root = Some(dir.path().display().to_string());
        let d = Decoder::new(l, 8);
        let root = dir.path().display();
        // localhost and percent-encoding are URI syntax, not part of the path.
        for uri in [format!("file://localhost{root}/my%20dir/a.png"), format!("file://{root}/my%20dir/a.png")] {
            assert_eq!(d.decode(&ImageSource::Uri(uri.clone()), &[]).unwrap_or_else(|e| panic!("{uri}: {e}")).rgb.len(), 8 * 8 * 3);
        }
        // Outside the root, an existing and a missing path get the same answer.
        let exists = d.fetch("file:///etc/hostname").unwrap_err().message.replace("/etc/hostname", "P");
        let missing = d.fetch("file:///etc/no-such-file").unwrap_err().message.replace("/etc/no-such-file", "P");
        assert_eq!(exists, missing);
        assert!(exists.contains("outside decode.file_uri_root"), "{exists}");
        let escape = d.fetch(&format!("file://{root}/../../etc/hostname")).unwrap_err();
        assert!(escape.message.contains("outside"), "{escape}");
        assert!(d.fetch("file://otherhost/x.png").unwrap_err().message.contains("outside"));
    }

    #[test]
    fn a_fifo_under_the_root_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("camera.png");
        let c = std::ffi::CString::new(fifo.display().to_string()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut l = limits();
        l.file_uri_root = Some(dir.path().display().to_string());
        let d = Decoder::new(l, 8);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(d.fetch(&format!("file://{}", fifo.display()))).unwrap());
        let err = rx.recv_timeout(std::time::Duration::from_secs(5)).expect("fetch returned").unwrap_err();
        assert!(err.message.contains("not a regular file"), "{err}");
    }

    /// A smooth, textured camera-size frame, as JPEG.
    fn large_jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            let ring = ((fx - 0.5).hypot(fy - 0.5) * 40.0).sin() * 40.0;
            image::Rgb([(fx * 200.0 + ring + 20.0) as u8, (fy * 180.0 + 30.0) as u8, ((fx + fy) * 90.0 - ring + 50.0) as u8])
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img).unwrap();
        out
    }

    #[test]
    fn scale_divisor_keeps_both_sides_at_least_four_model_sizes() {
        assert_eq!(jpeg_scale_divisor(2048, 2048, 256), Some(2));
        assert_eq!(jpeg_scale_divisor(4096, 4096, 256), Some(4));
        assert_eq!(jpeg_scale_divisor(8192, 8192, 256), Some(8));
        assert_eq!(jpeg_scale_divisor(4096, 3000, 256), Some(2)); // 3000/4 = 750 < 1024
        assert_eq!(jpeg_scale_divisor(2048, 1536, 256), None); // 1536/2 = 768 < 1024
        assert_eq!(jpeg_scale_divisor(900, 900, 256), None, "the bottle-size JPEGs decode at full scale");
        assert_eq!(jpeg_scale_divisor(316, 264, 256), None, "the magnetic-tile JPEGs decode as before");
    }

    #[test]
    fn large_jpeg_scaled_decode_matches_full_decode_and_resize() {
        let l = DecodeSettings { max_payload_bytes: 16 << 20, max_pixels: 40_000_000, ..limits() };
        for (w, h) in [(2048, 2048), (2600, 2100)] {
            let bytes = large_jpeg(w, h);
            let d = Decoder::new(l.clone(), 256);
            assert!(matches!(d.decode_jpeg_scaled(&bytes, (w, h), 2), Some(Ok(_))), "{w}x{h} takes libjpeg-turbo's 1/2 IDCT");
            let scaled = d.decode_bytes(&bytes).unwrap();
            let full = Decoder::new(l.clone(), 256).with_jpeg_scaling(false).decode_bytes(&bytes).unwrap();
            assert_eq!((scaled.original_width, scaled.original_height), (w, h));
            assert_eq!(scaled.rgb.len(), full.rgb.len());
            let diffs: Vec<i32> = scaled.rgb.iter().zip(&full.rgb).map(|(a, b)| (*a as i32 - *b as i32).abs()).collect();
            let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
            let p99 = {
                let mut d = diffs.clone();
                d.sort();
                d[d.len() * 99 / 100]
            };
            assert!(mean < 1.0 && p99 <= 4, "{w}x{h}: mean |diff| {mean:.2}, p99 {p99}");
        }
        // Grayscale JPEGs take the scaled path too and still come out as three equal channels.
        let gray = encode(image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(2100, 2100, |x, _| image::Luma([(x / 9) as u8]))), ImageFormat::Jpeg);
        let d = Decoder::new(l, 256);
        assert!(matches!(d.decode_jpeg_scaled(&gray, (2100, 2100), 2), Some(Ok(_))), "libjpeg-turbo decoded it");
        let out = d.decode_bytes(&gray).unwrap();
        assert!(out.rgb.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
    }

    #[test]
    fn the_scaled_path_serves_baseline_and_progressive_jpegs_and_budgets_their_coefficients() {
        let l = DecodeSettings { max_payload_bytes: 16 << 20, max_pixels: 40_000_000, ..limits() };
        let frame = image::load_from_memory(&large_jpeg(1024, 768)).unwrap().into_rgb8();
        let mut compressor = turbojpeg::Compressor::new().unwrap();
        compressor.set_quality(90).unwrap();
        let source = turbojpeg::Image { pixels: frame.as_raw().as_slice(), width: 1024, pitch: 1024 * 3, height: 768, format: turbojpeg::PixelFormat::RGB };
        let baseline = compressor.compress_to_vec(source).unwrap();
        compressor.set_progressive(true).unwrap();
        let progressive = compressor.compress_to_vec(source).unwrap();
        let d = Decoder::new(l.clone(), 256);
        for bytes in [&baseline, &progressive] {
            let scaled = d.decode_jpeg_scaled(bytes, (1024, 768), 2).expect("for this path").expect("decoded");
            let full = d.clone().with_jpeg_scaling(false).decode_bytes(bytes).unwrap();
            let mean = scaled.rgb.iter().zip(&full.rgb).map(|(a, b)| (*a as i32 - *b as i32).abs()).sum::<i32>() as f64 / full.rgb.len() as f64;
            assert!(mean < 2.0, "mean |diff| {mean:.2}");
            assert_eq!(d.budget().in_use(), 0);
        }
        // The budget holds the 512x384 output (0.6 MB) but not the progressive coefficients (4.7 MB).
        let tight = Decoder::new(DecodeSettings { max_decode_bytes: 2 << 20, ..l }, 256);
        assert!(matches!(tight.decode_jpeg_scaled(&baseline, (1024, 768), 2), Some(Ok(_))));
        let err = tight.decode_jpeg_scaled(&progressive, (1024, 768), 2).expect("for this path").unwrap_err();
        assert_eq!(err.kind, ErrorKind::TooLarge, "{err}");
    }

    #[test]
    fn a_jpeg_the_scaled_path_refuses_gets_the_full_decoders_answer() {
        let l = DecodeSettings { max_payload_bytes: 16 << 20, max_pixels: 40_000_000, ..limits() };
        let whole = large_jpeg(1024, 1024);
        let d = Decoder::new(l, 128);
        assert_eq!(jpeg_scale_divisor(1024, 1024, 128), Some(2), "whole, it would take the scaled path");
        for cut in [whole.len() / 2, whole.len() - 2, 700] {
            let bytes = &whole[..cut];
            // libjpeg-turbo stops at the missing data (a warning, which TurboJPEG 3 reports as failure)...
            assert!(matches!(d.decode_jpeg_scaled(bytes, (1024, 1024), 2), Some(Err(_)) | None), "cut at {cut}");
            // ...and the operator's answer is the full decoder's, whatever that is.
            let full = d.clone().with_jpeg_scaling(false).decode_bytes(bytes).map(|m| m.rgb).map_err(|e| e.kind);
            assert_eq!(d.decode_bytes(bytes).map(|m| m.rgb).map_err(|e| e.kind), full, "cut at {cut}");
            assert_eq!(d.budget().in_use(), 0);
        }
    }

    #[test]
    fn decoded_size_is_budgeted_from_the_header() {
        // 16-bit RGBA: 8 bytes per pixel decoded, however well it compresses.
        let img = image::DynamicImage::ImageRgba16(image::ImageBuffer::from_pixel(2000, 2000, image::Rgba([1000u16, 2000, 3000, 65535])));
        let bytes = encode(img, ImageFormat::Png);
        assert!(bytes.len() < 1 << 20, "compresses to {} bytes", bytes.len());
        let mut l = limits();
        l.max_decode_bytes = 32 << 20; // < 2000*2000*(8+3) = 44 MB
        let err = Decoder::new(l.clone(), 16).decode_bytes(&bytes).unwrap_err();
        assert_eq!(err.kind, ErrorKind::TooLarge, "{err}");
        assert!(err.message.contains("max_decode_bytes"), "{err}");
        l.max_decode_bytes = 64 << 20;
        let d = Decoder::new(l, 16);
        assert_eq!(d.decode_bytes(&bytes).unwrap().rgb.len(), 16 * 16 * 3);
        assert_eq!(d.budget().in_use(), 0, "given back after decoding");
    }
}

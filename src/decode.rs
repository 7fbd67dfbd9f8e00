//! Decode: image bytes (inline or fetched by URI) → RGB, resized to the model's S×S.
//! Runs on the decode worker pool, never on the async executor.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use fast_image_resize as fr;
use image::{ImageFormat, ImageReader};

use crate::config::DecodeSettings;
use crate::event::{ErrorKind, ImageSource, Rejection};

/// Formats we accept; anything else sniffed is `unsupported_format`.
const SUPPORTED: [ImageFormat; 6] = [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Bmp, ImageFormat::Tiff, ImageFormat::Gif, ImageFormat::WebP];

/// An image ready for the model: `size*size*3` RGB bytes, channels last.
#[derive(Debug, Clone)]
pub struct ModelInput {
    pub rgb: Vec<u8>,
    pub size: u32,
    pub original_width: u32,
    pub original_height: u32,
}

#[derive(Debug, Clone)]
pub struct Decoder {
    limits: DecodeSettings,
    file_root: Option<PathBuf>,
    size: u32,
}

impl Decoder {
    pub fn new(limits: DecodeSettings, size: u32) -> Self {
        let file_root = (!limits.file_uri_root.is_empty()).then(|| PathBuf::from(&limits.file_uri_root));
        Self { limits, file_root, size }
    }

    pub fn max_payload_bytes(&self) -> usize {
        self.limits.max_payload_bytes
    }

    /// Full path from an event's image to the model input.
    pub fn decode(&self, source: &ImageSource) -> Result<ModelInput, Rejection> {
        match source {
            ImageSource::Inline(bytes) => self.decode_bytes(bytes),
            ImageSource::Uri(uri) => {
                let bytes = self.fetch(uri)?;
                self.decode_bytes(&bytes)
            }
        }
    }

    /// Reads a claim-check URI. Only `file://` under `decode.file_uri_root` is served here.
    pub fn fetch(&self, uri: &str) -> Result<Vec<u8>, Rejection> {
        let Some(path) = uri.strip_prefix("file://") else {
            let scheme = uri.split("://").next().unwrap_or("");
            return Err(Rejection::new(ErrorKind::Fetch, format!("unsupported image_uri scheme {scheme:?} (this instance serves file://)")));
        };
        let Some(root) = &self.file_root else {
            return Err(Rejection::new(ErrorKind::Fetch, "file:// image_uri is disabled (set decode.file_uri_root)"));
        };
        let path = Path::new(path);
        let resolved = path.canonicalize().map_err(|e| Rejection::new(ErrorKind::Fetch, format!("cannot open {uri}: {e}")))?;
        let root = root.canonicalize().map_err(|e| Rejection::new(ErrorKind::Fetch, format!("decode.file_uri_root unusable: {e}")))?;
        if !resolved.starts_with(&root) {
            return Err(Rejection::new(ErrorKind::Fetch, format!("{uri} is outside decode.file_uri_root")));
        }
        let len = std::fs::metadata(&resolved).map_err(|e| Rejection::new(ErrorKind::Fetch, format!("cannot stat {uri}: {e}")))?.len();
        if len as usize > self.limits.max_payload_bytes {
            return Err(too_large_bytes(len as usize, self.limits.max_payload_bytes));
        }
        std::fs::read(&resolved).map_err(|e| Rejection::new(ErrorKind::Fetch, format!("cannot read {uri}: {e}")))
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
            return Err(Rejection::new(ErrorKind::TooLarge, format!("image is {w}x{h} = {pixels} pixels, over decode.max_pixels = {}", self.limits.max_pixels)));
        }
        if pixels == 0 {
            return Err(Rejection::new(ErrorKind::Decode, "image has zero pixels"));
        }
        let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(w);
        limits.max_image_height = Some(h);
        limits.max_alloc = Some(pixels * 8 + (64 << 20));
        reader.limits(limits);
        let img = reader.decode().map_err(|e| Rejection::new(ErrorKind::Decode, format!("cannot decode {format:?}: {e}")))?;
        let rgb = img.into_rgb8();
        let resized = resize_rgb(rgb.as_raw(), w, h, self.size).map_err(|e| Rejection::new(ErrorKind::Decode, e))?;
        Ok(ModelInput { rgb: resized, size: self.size, original_width: w, original_height: h })
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

/// Bilinear (antialiased, like PIL's) resize of packed RGB with SIMD.
pub fn resize_rgb(rgb: &[u8], w: u32, h: u32, size: u32) -> Result<Vec<u8>, String> {
    if w == size && h == size {
        return Ok(rgb.to_vec());
    }
    let src = fr::images::ImageRef::new(w, h, rgb, fr::PixelType::U8x3).map_err(|e| format!("resize source: {e}"))?;
    let mut dst = fr::images::Image::new(size, size, fr::PixelType::U8x3);
    let options = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear));
    fr::Resizer::new().resize(&src, &mut dst, &options).map_err(|e| format!("resize: {e}"))?;
    Ok(dst.into_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> DecodeSettings {
        DecodeSettings { max_payload_bytes: 1 << 20, max_pixels: 4_000_000, workers: 1, file_uri_root: String::new() }
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
    fn formats_and_grayscale_decode_to_rgb_at_model_size() {
        let d = Decoder::new(limits(), 32);
        let rgb = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(50, 40, image::Rgb([200, 10, 10])));
        let gray = image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(40, 60, image::Luma([90])));
        for (img, fmt) in [(rgb.clone(), ImageFormat::Png), (rgb.clone(), ImageFormat::Jpeg), (rgb.clone(), ImageFormat::Bmp), (rgb, ImageFormat::Tiff), (gray.clone(), ImageFormat::Png), (gray, ImageFormat::Jpeg)] {
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
        assert_eq!(off.decode(&ImageSource::Uri(uri.clone())).unwrap_err().kind, ErrorKind::Fetch);
        l.file_uri_root = dir.path().display().to_string();
        let on = Decoder::new(l, 8);
        assert_eq!(on.decode(&ImageSource::Uri(uri)).unwrap().rgb.len(), 8 * 8 * 3);
        let missing = format!("file://{}", dir.path().join("missing.png").display());
        assert_eq!(on.decode(&ImageSource::Uri(missing)).unwrap_err().kind, ErrorKind::Fetch);
        assert_eq!(on.decode(&ImageSource::Uri("file:///etc/passwd".into())).unwrap_err().kind, ErrorKind::Fetch);
        assert_eq!(on.decode(&ImageSource::Uri("http://x/y.png".into())).unwrap_err().kind, ErrorKind::Fetch);
    }
}

//! Heatmaps: the raw anomaly map, normalised like the score, colour-mapped to a PNG.

use crate::inference::model::{normalise, Calibration};

/// Jet colour map: 0 → blue, 0.5 → green/yellow, 1 → red.
fn jet(x: f32) -> [u8; 3] {
    let c = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    [c(1.5 - (4.0 * x - 3.0).abs()), c(1.5 - (4.0 * x - 2.0).abs()), c(1.5 - (4.0 * x - 1.0).abs())]
}

/// Renders a `size`×`size` raw map as RGB: each pixel normalised with the class calibration,
/// so the colour at the decision threshold is the same for every image. With `background`
/// (the model input, RGB) the colours are blended over it.
pub(crate) fn render(map: &[f32], size: u32, calibration: &Calibration, background: Option<&[u8]>) -> image::RgbImage {
    let mut img = image::RgbImage::new(size, size);
    for (i, px) in img.pixels_mut().enumerate() {
        let colour = jet(normalise(map[i], calibration));
        px.0 = match background {
            Some(bg) => {
                let b = &bg[i * 3..i * 3 + 3];
                [0, 1, 2].map(|k| ((colour[k] as u16 + b[k] as u16) / 2) as u8)
            }
            None => colour,
        };
    }
    img
}

pub(crate) fn render_png(map: &[f32], size: u32, calibration: &Calibration, background: Option<&[u8]>) -> Vec<u8> {
    encode_png(&render(map, size, calibration, background))
}

/// A small JPEG of the heatmap over the input, for the inspection page.
pub(crate) fn thumbnail_jpeg(map: &[f32], size: u32, calibration: &Calibration, input: &[u8], px: u32) -> Vec<u8> {
    let full = render(map, size, calibration, Some(input));
    let small = if px >= size { full } else { image::imageops::thumbnail(&full, px, px) };
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80).encode_image(&small).expect("jpeg encode");
    out
}

/// Encodes an RGB image as PNG.
pub(crate) fn encode_png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).expect("png encode");
    out
}

/// Deterministic blob key (docs/DESIGN.md §3): a retry overwrites instead of leaving orphans.
pub fn key(prefix: &str, model_version: &str, topic: &str, partition: i32, offset: i64) -> String {
    let base = format!("{}/{}/{partition}/{offset}.png", sanitize(model_version), sanitize(topic));
    if prefix.is_empty() {
        base
    } else {
        format!("{}/{base}", prefix.trim_matches('/'))
    }
}

/// One path segment of a key: safe characters only, and never empty, `.` or `..` (a model
/// version or topic from outside must not move a key out of its store root).
fn sanitize(s: &str) -> String {
    let safe = crate::event::replace_unsafe(s, crate::event::NAME_PUNCTUATION);
    if safe.chars().all(|c| c == '.') {
        format!("_{safe}")
    } else {
        safe
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_follow_calibration() {
        let c = Calibration { threshold: 1.0, min: 0.0, max: 2.0 };
        let img = render(&[-5.0, 1.0, 9.0, 1.0], 2, &c, None);
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 128], "below range is dark blue");
        assert_eq!(img.get_pixel(0, 1).0, [128, 0, 0], "above range is dark red");
        let mid = img.get_pixel(1, 0).0;
        assert_eq!(mid[1], 255, "threshold is green: {mid:?}");
        let over = render(&[9.0; 4], 2, &c, Some(&[0u8; 12]));
        assert_eq!(over.get_pixel(0, 0).0, [64, 0, 0]);
    }

    #[test]
    fn keys_are_deterministic_and_safe() {
        assert_eq!(key("", "1.0", "images", 3, 17), "1.0/images/3/17.png");
        assert_eq!(key("replay/abc/", "v 2", "t", 0, 1), "replay/abc/v_2/t/0/1.png");
        for version in ["", ".", "..", "../.."] {
            let k = key("", version, "..", 0, 1);
            assert!(k.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".."), "{version:?} -> {k}");
        }
    }
}

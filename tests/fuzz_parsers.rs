//! Property-based fuzzing of everything that reads untrusted input: the event parser (record
//! value + headers) and the image decoder (any bytes, and real images with bytes flipped).
//! Every input must get an outcome, a parsed event or a typed rejection, and never a panic.
//! `scripts/fuzz.sh` runs the same properties for much longer (PROPTEST_CASES).

use std::sync::OnceLock;

use dcam_stream::internals::DecodeSettings;
use dcam_stream::internals::Decoder;
use dcam_stream::internals::{parse_event, ErrorKind, SourceRef};
use proptest::prelude::*;

fn source() -> SourceRef {
    SourceRef { topic: "images".into(), partition: 0, offset: 7, timestamp: None }
}

fn decoder() -> Decoder {
    let limits = DecodeSettings { max_payload_bytes: 1 << 20, max_pixels: 4_000_000, workers: 1, file_uri_root: None, max_decode_bytes: 64 << 20 };
    Decoder::new(limits, 32)
}

/// Small valid images of every supported format, and JPEGs at least eight times the decoder's 32 px
/// (baseline, grayscale, progressive), which take libjpeg-turbo's reduced-scale path: seeds for mutation.
const SEED_COUNT: usize = 10;

fn seeds() -> &'static Vec<Vec<u8>> {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let rgb = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(23, 17, |x, y| image::Rgb([x as u8 * 9, y as u8 * 13, 77])));
        let gray16 = image::DynamicImage::ImageLuma16(image::ImageBuffer::from_fn(9, 11, |x, y| image::Luma([(x * y * 300) as u16])));
        let mut out = Vec::new();
        for (img, format) in [
            (&rgb, image::ImageFormat::Png),
            (&rgb, image::ImageFormat::Jpeg),
            (&rgb, image::ImageFormat::Bmp),
            (&rgb, image::ImageFormat::Tiff),
            (&rgb, image::ImageFormat::Gif),
            (&rgb, image::ImageFormat::WebP),
            (&gray16, image::ImageFormat::Png),
        ] {
            let mut bytes = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut bytes), format).unwrap();
            out.push(bytes);
        }
        let large = image::RgbImage::from_fn(264, 256, |x, y| image::Rgb([x as u8, y as u8, ((x + y) / 2) as u8]));
        let gray = image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(256, 280, |x, y| image::Luma([((x * y) / 64) as u8])));
        for img in [&image::DynamicImage::ImageRgb8(large.clone()), &gray] {
            let mut bytes = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Jpeg).unwrap();
            out.push(bytes);
        }
        let mut progressive = turbojpeg::Compressor::new().unwrap();
        progressive.set_progressive(true).unwrap();
        let pixels = turbojpeg::Image { pixels: large.as_raw().as_slice(), width: 264, pitch: 264 * 3, height: 256, format: turbojpeg::PixelFormat::RGB };
        out.push(progressive.compress_to_vec(pixels).unwrap());
        assert_eq!(out.len(), SEED_COUNT);
        out
    })
}

/// JSON values shaped like envelopes: the known keys with values of any type, plus noise.
fn envelope() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        "[ -~]{0,40}".prop_map(serde_json::Value::from),
        "[A-Za-z0-9+/=]{0,64}".prop_map(serde_json::Value::from),
        Just(serde_json::Value::from("file:///etc/passwd")),
        Just(serde_json::Value::from("s3://")),
    ];
    let value = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4).prop_map(|m| serde_json::Value::Object(m.into_iter().collect()))
        ]
    });
    let key = prop_oneof![
        Just("image_id"),
        Just("class"),
        Just("image"),
        Just("image_uri"),
        Just("content_type"),
        Just("attributes"),
        Just("captured_at"),
        Just("other")
    ];
    prop::collection::vec((key, value), 0..7).prop_map(|pairs| {
        let map: serde_json::Map<String, serde_json::Value> = pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        serde_json::to_vec(&serde_json::Value::Object(map)).unwrap()
    })
}

fn headers() -> impl Strategy<Value = (Option<String>, Option<String>)> {
    (proptest::option::of(".{0,300}"), proptest::option::of(".{0,200}"))
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_record_value_parses_or_is_rejected(value in prop::collection::vec(any::<u8>(), 0..512), (id, class) in headers()) {
        match parse_event(Some(&value), id.as_deref(), class.as_deref(), &source()) {
            Ok(e) => prop_assert!(dcam_stream::internals::validate_image_id(&e.image_id).is_ok()),
            Err(r) => prop_assert!(!r.message.is_empty()),
        }
    }

    #[test]
    fn any_envelope_parses_or_is_rejected(value in envelope(), (id, class) in headers()) {
        match parse_event(Some(&value), id.as_deref(), class.as_deref(), &source()) {
            Ok(e) => prop_assert!(dcam_stream::internals::validate_image_id(&e.image_id).is_ok()),
            Err(r) => prop_assert!(matches!(r.kind, ErrorKind::Schema | ErrorKind::Decode), "{r}"),
        }
    }

    #[test]
    fn any_bytes_decode_or_are_rejected(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let d = decoder();
        if let Ok(input) = d.decode_bytes(&bytes) {
            prop_assert_eq!(input.rgb.len(), 32 * 32 * 3);
        }
    }

    #[test]
    fn damaged_real_images_decode_or_are_rejected(
        seed in 0usize..SEED_COUNT,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut bytes = seeds()[seed].clone();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()) + 1);
        }
        let d = decoder();
        match d.decode_bytes(&bytes) {
            Ok(input) => prop_assert_eq!(input.rgb.len(), 32 * 32 * 3),
            Err(r) => prop_assert!(!r.message.is_empty()),
        }
        prop_assert_eq!(d.budget().in_use(), 0, "decode memory is given back on every path");
    }
}

//! Test inputs shared by unit and integration tests (feature `testing`; not in the binary).

/// A syntactically valid PNG header + IHDR claiming `w`×`h` pixels, with no image data:
/// a decompression bomb as far as a naive decoder is concerned.
pub fn png_header_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, no interlace
    let mut chunk = b"IHDR".to_vec();
    chunk.extend_from_slice(&ihdr);
    out.extend_from_slice(&(ihdr.len() as u32).to_be_bytes());
    out.extend_from_slice(&chunk);
    out.extend_from_slice(&crc32fast::hash(&chunk).to_be_bytes());
    out
}

/// A PNG of `img`, as the operator writes heatmaps.
pub fn encode_png(img: &image::RgbImage) -> Vec<u8> {
    crate::inference::heatmap::encode_png(img)
}

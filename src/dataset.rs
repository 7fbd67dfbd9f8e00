//! Image files on disk: a plain folder, or a dataset in MVTec AD layout
//! (`<class>/{train,test}/<label>/*.png`), with class, label and a stable id from the path.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFile {
    pub path: PathBuf,
    pub class: Option<String>,
    /// `good` or the defect name, when the layout says.
    pub label: Option<String>,
    pub image_id: String,
}

const EXTENSIONS: [&str; 8] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff", "gif", "webp"];

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn sanitize(s: &str) -> String {
    crate::event::replace_unsafe(s, crate::event::ID_PUNCTUATION)
}

/// Which split of an MVTec-layout dataset to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    Train,
    Test,
    All,
}

fn is_class_dir(p: &Path) -> bool {
    p.join("test").is_dir() || p.join("train").is_dir()
}

/// Lists images under each path in a stable order (sorted), with metadata from the layout.
pub fn list(paths: &[PathBuf], split: Split) -> Result<Vec<ImageFile>> {
    let mut out = Vec::new();
    for root in paths {
        if root.is_file() {
            out.push(single_file(root));
        } else if root.is_dir() {
            if is_class_dir(root) {
                list_class(root, split, &mut out);
            } else {
                let mut classes: Vec<PathBuf> =
                    std::fs::read_dir(root)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir() && is_class_dir(p)).collect();
                classes.sort();
                if classes.is_empty() {
                    let class = root.file_name().and_then(|n| n.to_str()).map(str::to_string);
                    for path in walk(root) {
                        out.push(plain(&path, class.clone()));
                    }
                } else {
                    for c in classes {
                        list_class(&c, split, &mut out);
                    }
                }
            }
        } else {
            bail!("{} does not exist", root.display());
        }
    }
    make_ids_unique(&mut out);
    Ok(out)
}

/// A file named on its own: class, label and id from an MVTec-style path
/// (`<class>/<train|test>/<label>/<name>`), as when listing the dataset; else the id is the path
/// as given, so `a/000.png` and `b/000.png` stay apart.
fn single_file(path: &Path) -> ImageFile {
    let dirs: Vec<&str> = path.iter().rev().skip(1).take(3).filter_map(|c| c.to_str()).collect();
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
    if let [label, split @ ("train" | "test"), class] = dirs[..] {
        let image_id = sanitize(&format!("{class}-{split}-{label}-{stem}"));
        return ImageFile { path: path.to_path_buf(), class: Some(class.to_string()), label: Some(label.to_string()), image_id };
    }
    let as_given = path.with_extension("");
    let id = sanitize(as_given.to_string_lossy().trim_start_matches(['/', '.']));
    // Ids are at most 256 characters: keep the end, which tells files apart.
    let image_id = id.chars().rev().take(256).collect::<Vec<_>>().into_iter().rev().collect();
    ImageFile { path: path.to_path_buf(), class: None, label: None, image_id }
}

/// Suffixes `-2`, `-3`, ... to repeated ids: every output (and heatmap file) needs its own.
fn make_ids_unique(files: &mut [ImageFile]) {
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for f in files.iter_mut() {
        let n = seen.entry(f.image_id.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            let suffix = format!("-{n}");
            let keep = 256 - suffix.len();
            f.image_id = format!("{}{suffix}", &f.image_id[..f.image_id.len().min(keep)]);
        }
    }
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file() && is_image(e.path()))
        .map(|e| e.into_path())
        .collect();
    files.sort();
    files
}

fn plain(path: &Path, class: Option<String>) -> ImageFile {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
    let image_id = match &class {
        Some(c) => sanitize(&format!("{c}-{stem}")),
        None => sanitize(stem),
    };
    ImageFile { path: path.to_path_buf(), class, label: None, image_id }
}

fn list_class(class_dir: &Path, split: Split, out: &mut Vec<ImageFile>) {
    let class = class_dir.file_name().and_then(|n| n.to_str()).unwrap_or("unknown").to_string();
    let splits: &[&str] = match split {
        Split::Train => &["train"],
        Split::Test => &["test"],
        Split::All => &["train", "test"],
    };
    for s in splits {
        for path in walk(&class_dir.join(s)) {
            let label = path.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str()).map(str::to_string);
            let stem = path.file_stem().and_then(|x| x.to_str()).unwrap_or("image");
            let image_id = sanitize(&format!("{class}-{s}-{}-{stem}", label.as_deref().unwrap_or("x")));
            out.push(ImageFile { path, class: Some(class.clone()), label, image_id });
        }
    }
}

/// Takes up to `n` files per class, spread evenly over each class's list (so every label shows up).
pub fn sample_per_class(files: Vec<ImageFile>, n: usize) -> Vec<ImageFile> {
    let mut by_class: std::collections::BTreeMap<Option<String>, Vec<ImageFile>> = Default::default();
    for f in files {
        by_class.entry(f.class.clone()).or_default().push(f);
    }
    let mut out = Vec::new();
    for (_, list) in by_class {
        if list.len() <= n {
            out.extend(list);
        } else {
            let step = list.len() as f64 / n as f64;
            out.extend((0..n).map(|i| list[(i as f64 * step) as usize].clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mvtec_layout_gives_class_label_and_id() {
        let dir = tempfile::tempdir().unwrap();
        for p in
            ["bottle/test/good/000.png", "bottle/test/broken large/001.png", "bottle/train/good/002.png", "tile/test/crack/a.jpg", "tile/test/crack/notes.txt"]
        {
            let path = dir.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"x").unwrap();
        }
        let files = list(&[dir.path().to_path_buf()], Split::Test).unwrap();
        let ids: Vec<_> = files.iter().map(|f| f.image_id.as_str()).collect();
        assert_eq!(ids, vec!["bottle-test-broken_large-001", "bottle-test-good-000", "tile-test-crack-a"]);
        assert_eq!(files[0].label.as_deref(), Some("broken large"));
        assert_eq!(files[2].class.as_deref(), Some("tile"));
        assert_eq!(list(&[dir.path().join("bottle")], Split::All).unwrap().len(), 3);
        for f in &files {
            crate::event::validate_image_id(&f.image_id).unwrap();
        }
    }

    #[test]
    fn single_files_get_distinct_ids_and_the_class_their_path_names() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = ["bottle/test/broken_large/000.png", "magnetic_tile/test/crack/000.jpg", "cam1/000.png", "cam2/000.png"]
            .iter()
            .map(|p| {
                let path = dir.path().join(p);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, b"x").unwrap();
                path
            })
            .collect();
        let mut files = list(&paths, Split::Test).unwrap();
        assert_eq!(files[0].image_id, "bottle-test-broken_large-000");
        assert_eq!(files[1].class.as_deref(), Some("magnetic_tile"));
        assert_eq!(files[1].label.as_deref(), Some("crack"));
        assert!(files[2].image_id.ends_with("cam1_000") && files[3].image_id.ends_with("cam2_000"), "{files:?}");
        files.extend(list(&paths[..1], Split::Test).unwrap());
        make_ids_unique(&mut files);
        let ids: std::collections::HashSet<_> = files.iter().map(|f| f.image_id.as_str()).collect();
        assert_eq!(ids.len(), files.len(), "{files:?}");
        for f in &files {
            crate::event::validate_image_id(&f.image_id).unwrap();
        }
    }

    #[test]
    fn plain_folder_takes_class_from_its_name_and_sampling_spreads() {
        let dir = tempfile::tempdir().unwrap();
        let cam = dir.path().join("cam3");
        std::fs::create_dir_all(&cam).unwrap();
        for i in 0..10 {
            std::fs::write(cam.join(format!("{i:02}.png")), b"x").unwrap();
        }
        let files = list(&[cam], Split::Test).unwrap();
        assert_eq!(files.len(), 10);
        assert_eq!(files[3].image_id, "cam3-03");
        let s = sample_per_class(files, 5);
        assert_eq!(s.iter().map(|f| f.image_id.as_str()).collect::<Vec<_>>(), vec!["cam3-00", "cam3-02", "cam3-04", "cam3-06", "cam3-08"]);
    }
}

/// The MIME type of an image file, from its extension.
pub(crate) fn content_type(path: &std::path::Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("bmp") => "image/bmp",
        Some("tif" | "tiff") => "image/tiff",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        _ => "application/octet-stream",
    }
}

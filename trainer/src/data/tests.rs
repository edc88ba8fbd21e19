//! The data sets and the loader, on real files in temporary folders.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::fit::*;
use super::formats::*;
use super::loader::*;
use super::sources::*;
use super::synthetic::*;
use super::*;

pub(crate) fn write_npy(path: &Path, shape: &[u64], data: &[f32]) {
    use npyz::WriterBuilder;
    let mut out = Vec::new();
    {
        let mut w =
            npyz::WriteOptions::<f32>::new().default_dtype().shape(shape).writer(&mut out).begin_nd().expect("npy");
        w.extend(data.iter().copied()).expect("write");
        w.finish().expect("finish");
    }
    std::fs::write(path, out).expect("write npy");
}

#[test]
fn paths_stay_inside_the_root_symlinks_included() {
    let root = tempfile::tempdir().expect("tmp");
    let outside = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(root.path().join("ok")).expect("mkdir");
    std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).expect("symlink");
    assert!(confine(root.path(), "ok").is_ok());
    let e = confine(root.path(), "escape").expect_err("escapes");
    assert!(e.0.contains("outside the data root"), "{e}");
    assert!(confine(root.path(), "missing").expect_err("missing").0.contains("missing"));
}

#[test]
fn crops_and_pads_land_where_the_offsets_say() {
    let a = Array {
        channels: 1,
        spatial: vec![2, 3],
        spatial_before_resize: vec![2, 3],
        data: (0..6).map(|v| v as f32).collect(),
    };
    // Crop 2x2 starting at column 1.
    assert_eq!(fit(&a, &[2, 2], &[0, 1]), vec![1.0, 2.0, 4.0, 5.0]);
    // Pad to 3x3 with the source one row down.
    assert_eq!(fit(&a, &[3, 3], &[-1, 0]), vec![0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
}

#[test]
fn the_loader_hands_over_batches_in_order_with_any_number_of_workers() {
    let dir = tempfile::tempdir().expect("tmp");
    for c in 0..2 {
        let class = dir.path().join(format!("class{c}"));
        std::fs::create_dir(&class).expect("mkdir");
        for i in 0..5 {
            write_npy(&class.join(format!("{i}.npy")), &[1, 4, 4], &[(c * 10 + i) as f32; 16]);
        }
    }
    let want = Want::Dense { channels: 1, spatial: vec![4, 4], label: LabelKind::Class { classes: 2 } };
    let ds = Arc::new(Dataset::open(dir.path(), dir.path(), None, want).expect("open"));
    assert_eq!(ds.len(), 10);
    let firsts = |workers: usize, prefetch: usize| -> Vec<(f32, i64)> {
        let mut l = Loader::new(Arc::clone(&ds), 3, 7, 0, workers, prefetch, Box::new(|_| true));
        (0..7)
            .flat_map(|_| {
                let b = l.take().expect("batch");
                let HostData::F32(x) = &b.tensors[0].data else { panic!("f32") };
                let HostData::I64(y) = &b.tensors[1].data else { panic!("i64") };
                (0..3).map(|j| (x[j * 16], y[j])).collect::<Vec<_>>()
            })
            .collect()
    };
    let inline = firsts(0, 1);
    assert_eq!(firsts(3, 2), inline);
    assert_eq!(firsts(1, 4), inline);
    // Every epoch visits each sample once, with its label.
    let mut epoch: Vec<f32> = inline[..10].iter().map(|p| p.0).collect();
    epoch.sort_by(f32::total_cmp);
    assert_eq!(epoch, vec![0.0, 1.0, 2.0, 3.0, 4.0, 10.0, 11.0, 12.0, 13.0, 14.0]);
    assert!(inline.iter().all(|&(v, y)| (v >= 10.0) == (y == 1)));
    // Lowering while running keeps the order.
    let mut l = Loader::new(Arc::clone(&ds), 3, 7, 0, 4, 4, Box::new(|_| true));
    let mut got = Vec::new();
    for i in 0..7 {
        if i == 2 || i == 4 {
            while l.reduce().is_some_and(|(w, _)| w > 0) {}
        }
        let b = l.take().expect("batch");
        let HostData::F32(x) = &b.tensors[0].data else { panic!("f32") };
        got.extend((0..3).map(|j| x[j * 16]));
    }
    assert_eq!(got, inline.iter().map(|p| p.0).collect::<Vec<_>>());
    assert_eq!(l.setting().0, 0);

    // Room for one batch being made at a time, counted across the four workers: each
    // looks with the number the others are making, which never passes one, and is
    // back to 0 once all are made; the batches still come in order.
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let s2 = Arc::clone(&seen);
    let mut l = Loader::new(
        Arc::clone(&ds),
        3,
        7,
        0,
        4,
        4,
        Box::new(move |making| {
            s2.fetch_max(making, Ordering::Relaxed);
            making == 0
        }),
    );
    let got: Vec<f32> = (0..7)
        .flat_map(|_| {
            let b = l.take().expect("batch");
            let HostData::F32(x) = &b.tensors[0].data else { panic!("f32") };
            (0..3).map(|j| x[j * 16]).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(got, inline.iter().map(|p| p.0).collect::<Vec<_>>());
    assert!(seen.load(Ordering::Relaxed) <= 1, "{seen:?}");
    let making = |l: &Loader| l.shared.queue.lock().map(|q| q.making).unwrap_or(u64::MAX);
    let t0 = std::time::Instant::now();
    while making(&l) != 0 && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(making(&l), 0, "every batch started was counted finished");
}

fn open(root: &Path, dir: &str, manifest: Option<&str>, want: Want) -> Result<Dataset, DataError> {
    Dataset::open(root, &root.join(dir), manifest.map(|m| root.join(m)).as_deref(), want)
}

fn f32s(t: &HostTensor) -> &[f32] {
    match &t.data {
        HostData::F32(v) => v,
        HostData::I64(_) => panic!("expected f32"),
    }
}

#[test]
fn nifti_volumes_with_masks_beside_them_are_cropped_together() {
    let root = tempfile::tempdir().expect("tmp");
    let dir = root.path().join("scans");
    std::fs::create_dir(&dir).expect("mkdir");
    // A 6x5x4 volume whose voxel (x, y, z) holds 100x + 10y + z, and a label map of 3
    // classes by x.
    let vol = ndarray::Array3::from_shape_fn((6, 5, 4), |(x, y, z)| (100 * x + 10 * y + z) as f32);
    let lab = ndarray::Array3::from_shape_fn((6, 5, 4), |(x, _, _)| (x % 3) as f32);
    nifti::writer::WriterOptions::new(dir.join("case1.nii.gz")).write_nifti(&vol).expect("write");
    nifti::writer::WriterOptions::new(dir.join("case1_seg.nii.gz")).write_nifti(&lab).expect("write");
    let want = |spatial: Vec<usize>| Want::Dense { channels: 1, spatial, label: LabelKind::FloatMap { classes: 3 } };
    let ds = open(root.path(), "scans", None, want(vec![6, 5, 4])).expect("open");
    assert_eq!(ds.len(), 1, "the mask is not a sample");
    let b = ds.batch(0, 1, 1, &mut None).expect("batch");
    assert_eq!(b.tensors[0].shape, vec![1, 1, 6, 5, 4]);
    let x = f32s(&b.tensors[0]);
    // Logical (x, y, z) order, z fastest.
    assert_eq!(&x[..3], &[0.0, 1.0, 2.0]);
    assert_eq!(x[4], 10.0);
    assert_eq!(x[20], 100.0);
    // A 4x4x4 crop: the label moves with the image.
    let ds = open(root.path(), "scans", None, want(vec![4, 4, 4])).expect("open");
    for pos in 0..8 {
        let b = ds.batch(pos, 1, 3, &mut None).expect("batch");
        let (x, y) = (f32s(&b.tensors[0]), f32s(&b.tensors[1]));
        assert_eq!(b.tensors[1].shape, vec![1, 1, 4, 4, 4]);
        for (v, l) in x.iter().zip(y) {
            assert_eq!(((*v as usize) / 100 % 3) as f32, *l);
        }
    }
    // Bigger than the volume: zero padding around it.
    let ds = open(root.path(), "scans", None, want(vec![8, 5, 4])).expect("open");
    let x = ds.batch(0, 1, 3, &mut None).expect("batch");
    assert_eq!(f32s(&x.tensors[0]).iter().filter(|&&v| v == 0.0).count(), 2 * 20 + 1);
    // A mask of the wrong size is named with its input.
    let small = ndarray::Array3::<f32>::zeros((6, 5, 3));
    nifti::writer::WriterOptions::new(dir.join("case1_seg.nii.gz")).write_nifti(&small).expect("write");
    let e = open(root.path(), "scans", None, want(vec![4, 4, 4])).expect_err("mismatch");
    assert!(e.0.contains("case1_seg.nii.gz") && e.0.contains("case1.nii.gz"), "{e}");
    // Without masks a segmentation model says what it needs.
    std::fs::remove_file(dir.join("case1_seg.nii.gz")).expect("rm");
    let e = open(root.path(), "scans", None, want(vec![4, 4, 4])).expect_err("no mask");
    assert!(e.0.contains("case1_mask"), "{e}");
}

#[test]
fn images_in_class_folders_are_resized_cropped_and_converted() {
    let root = tempfile::tempdir().expect("tmp");
    for (c, name) in ["cats", "dogs"].iter().enumerate() {
        let d = root.path().join("pets").join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        // Gray 40x20 images, bright for dogs.
        let img = image::GrayImage::from_pixel(40, 20, image::Luma([if c == 0 { 10 } else { 250 }]));
        img.save(d.join("a.png")).expect("png");
        let rgb = image::RgbImage::from_pixel(30, 30, image::Rgb([0, 0, 255]));
        image::DynamicImage::ImageRgb8(rgb).save(d.join("b.jpg")).expect("jpg");
    }
    let want = Want::Dense { channels: 3, spatial: vec![16, 16], label: LabelKind::Class { classes: 2 } };
    let ds = open(root.path(), "pets", None, want).expect("open");
    assert_eq!(ds.len(), 4);
    let b = ds.batch(0, 4, 5, &mut None).expect("batch");
    assert_eq!(b.tensors[0].shape, vec![4, 3, 16, 16]);
    let HostData::I64(y) = &b.tensors[1].data else { panic!("labels") };
    let x = f32s(&b.tensors[0]);
    for (j, &label) in y.iter().enumerate() {
        let sample = &x[j * 768..(j + 1) * 768];
        let (r, blue) = (sample[0], sample[2 * 256]);
        // Every value in [0, 1]; gray is replicated, blue stays blue.
        assert!(sample.iter().all(|v| (0.0..=1.0).contains(v)));
        if r > 0.5 || blue < 0.5 {
            assert!((r - blue).abs() < 1e-6, "a gray image has equal channels");
            assert_eq!(label == 1, r > 0.5);
        } else {
            assert!(r < 0.1 && blue > 0.9, "the blue JPEG");
        }
    }
    // A model with 2 channels cannot take images.
    let two = Want::Dense { channels: 2, spatial: vec![16, 16], label: LabelKind::Class { classes: 2 } };
    let ds = open(root.path(), "pets", None, two).expect("headers pass");
    assert!(ds.batch(0, 1, 0, &mut None).expect_err("2 channels").0.contains("1 or 3 channels"));
    // Three class folders for a two-class model.
    std::fs::create_dir_all(root.path().join("pets/owls")).expect("mkdir");
    image::GrayImage::new(8, 8).save(root.path().join("pets/owls/o.png")).expect("png");
    let want = Want::Dense { channels: 3, spatial: vec![16, 16], label: LabelKind::Class { classes: 2 } };
    let e = open(root.path(), "pets", None, want).expect_err("3 classes");
    assert!(e.0.contains("o.png") && e.0.contains("class 2"), "{e}");
}

#[test]
fn manifests_label_arrays_and_bad_entries_are_named() {
    let root = tempfile::tempdir().expect("tmp");
    let d = root.path().join("arrays");
    std::fs::create_dir(&d).expect("mkdir");
    for i in 0..3 {
        write_npy(&d.join(format!("s{i}.npy")), &[2, 3, 3], &[i as f32; 18]);
    }
    let want = || Want::Dense { channels: 2, spatial: vec![3, 3], label: LabelKind::Class { classes: 3 } };
    std::fs::write(root.path().join("labels.csv"), "input,label\ns0.npy,2\ns1.npy,0\ns2.npy,1\n").expect("csv");
    let ds = open(root.path(), "arrays", Some("labels.csv"), want()).expect("csv");
    let b = ds.batch(0, 3, 0, &mut None).expect("batch");
    let HostData::I64(y) = &b.tensors[1].data else { panic!("labels") };
    let x = f32s(&b.tensors[0]);
    for j in 0..3 {
        let expected = [2, 0, 1][x[j * 18] as usize];
        assert_eq!(y[j], expected);
    }
    std::fs::write(root.path().join("labels.json"), r#"{"s0.npy": 1, "s1.npy": 1}"#).expect("json");
    assert_eq!(open(root.path(), "arrays", Some("labels.json"), want()).expect("json").len(), 2);
    let cases: [(&str, &str, &str); 6] = [
        ("bad.csv", "file,class\ns0.npy,1\n", "needs the columns input and label"),
        ("bad.json", r#"[{"input": "../escape.npy", "label": 1}]"#, "without '..'"),
        ("big.json", r#"{"s0.npy": 7}"#, "has class 7"),
        ("gone.json", r#"{"missing.npy": 0}"#, "missing.npy"),
        ("neg.json", r#"{"s0.npy": -1}"#, "not a class number"),
        ("labels.txt", "s0.npy 1", "a .csv or .json"),
    ];
    for (name, text, needle) in cases {
        std::fs::write(root.path().join(name), text).expect("write");
        let e = open(root.path(), "arrays", Some(name), want()).expect_err(name);
        assert!(e.0.contains(needle), "{name}: {e}");
    }
    // Wrong channels and wrong rank name the file.
    let one = Want::Dense { channels: 1, spatial: vec![3, 3], label: LabelKind::Class { classes: 3 } };
    let e = open(root.path(), "arrays", Some("labels.csv"), one).expect_err("channels");
    assert!(e.0.contains("s0.npy") && e.0.contains("has 2 channels; the model takes 1"), "{e}");
    let vol = Want::Dense { channels: 1, spatial: vec![3, 3, 3, 3], label: LabelKind::Class { classes: 3 } };
    assert!(open(root.path(), "arrays", Some("labels.csv"), vol).expect_err("rank").0.contains("spatial dimensions"));
    std::fs::write(d.join("s0.npy"), b"not numpy").expect("write");
    let e = open(root.path(), "arrays", Some("labels.csv"), want()).expect_err("damaged");
    assert!(e.0.contains("s0.npy") && e.0.contains("not a .npy file"), "{e}");
    // An empty folder says what it looked for.
    std::fs::create_dir(root.path().join("empty")).expect("mkdir");
    assert!(open(root.path(), "empty", None, want()).expect_err("empty").0.contains("holds no"));
}

#[test]
fn token_files_give_windows_of_the_sequence_length() {
    use npyz::WriterBuilder;
    let root = tempfile::tempdir().expect("tmp");
    let d = root.path().join("text");
    std::fs::create_dir(&d).expect("mkdir");
    let mut out = Vec::new();
    {
        let mut w =
            npyz::WriteOptions::<i32>::new().default_dtype().shape(&[100]).writer(&mut out).begin_nd().expect("npy");
        w.extend(0..100).expect("write");
        w.finish().expect("finish");
    }
    std::fs::write(d.join("stream.npy"), out).expect("write");
    let ds = open(root.path(), "text", None, Want::Tokens { seq: 16, vocab: 1000 }).expect("open");
    let b = ds.batch(0, 4, 9, &mut None).expect("batch");
    let HostData::I64(ids) = &b.tensors[0].data else { panic!("ids") };
    for w in ids.chunks(16) {
        assert!(w.windows(2).all(|p| p[1] == p[0] + 1), "a contiguous window: {w:?}");
    }
    assert!(
        open(root.path(), "text", None, Want::Tokens { seq: 200, vocab: 1000 })
            .expect_err("short")
            .0
            .contains("holds 100 tokens")
    );
    let ds = open(root.path(), "text", None, Want::Tokens { seq: 16, vocab: 50 }).expect("open");
    assert!((0..20).any(|p| ds.batch(p, 1, 0, &mut None).is_err_and(|e| e.0.contains("vocabulary is 50"))));
}

#[test]
fn mask_images_keep_their_label_values_at_8_and_16_bits_and_colour_masks_are_refused() {
    let root = tempfile::tempdir().expect("tmp");
    let d = root.path().join("seg");
    std::fs::create_dir(&d).expect("mkdir");
    image::GrayImage::from_pixel(8, 8, image::Luma([40])).save(d.join("a.png")).expect("png");
    // Class 3 everywhere, stored as 16-bit: a rescaling reader would make it 0.
    image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_pixel(8, 8, image::Luma([3]))
        .save(d.join("a_mask.png"))
        .expect("png");
    let want = Want::Dense { channels: 1, spatial: vec![8, 8], label: LabelKind::IndexMap { classes: 4 } };
    let ds = open(root.path(), "seg", None, want.clone()).expect("open");
    let b = ds.batch(0, 1, 0, &mut None).expect("batch");
    let HostData::I64(y) = &b.tensors[1].data else { panic!("labels") };
    assert!(y.iter().all(|&c| c == 3), "{y:?}");
    image::RgbImage::new(8, 8).save(d.join("a_mask.png")).expect("png");
    let ds = open(root.path(), "seg", None, want).expect("headers pass");
    let e = ds.batch(0, 1, 0, &mut None).expect_err("colour");
    assert!(e.0.contains("a_mask.png") && e.0.contains("gray"), "{e}");
}
#[test]
fn synthetic_vessels_are_thin_curves_that_cross_from_the_left_edge() {
    let (b, h, w) = (3, 256, 256);
    let m = vessels(b, h, w, 11);
    for s in 0..b {
        let mask = &m[s * h * w..(s + 1) * h * w];
        let fraction = mask.iter().sum::<f32>() / (h * w) as f32;
        assert!((0.005..0.2).contains(&fraction), "sample {s}: {fraction} of the image is vessel");
        assert!((0..h).any(|y| mask[y * w] == 1.0), "sample {s} starts at the left edge");
        assert!(mask.iter().all(|&v| v == 0.0 || v == 1.0));
    }
    assert_eq!(vessels(1, 64, 64, 5), vessels(1, 64, 64, 5), "seeded");
}

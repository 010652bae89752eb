//! Our bilinear resize against Pillow's (fixtures/image/generate.py): every pixel equal.

use std::path::Path;

use signal_diffusion_runtime::data::image::{resize, Augment, Image};
use signal_diffusion_runtime::data::io::read_png;

fn load(name: &str) -> Image {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/image")
        .join(name);
    let (pixels, channels, height, width) = read_png(&path).unwrap();
    Image {
        pixels,
        channels,
        height,
        width,
    }
}

#[test]
fn bilinear_resize_equals_pillow_pixel_for_pixel() {
    let src = load("source.png");
    for (w, h) in [(20, 13), (64, 47), (50, 16), (13, 37)] {
        let want = load(&format!("resized-{w}x{h}.png"));
        let got = resize(&src, h, w);
        let differ = got
            .pixels
            .iter()
            .zip(&want.pixels)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!((got.height, got.width), (h, w));
        assert_eq!(
            differ,
            0,
            "{w}x{h}: {differ} of {} values differ from Pillow",
            want.pixels.len()
        );
    }
    let got = resize(&load("grey-256.png"), 64, 64);
    assert_eq!(got.pixels, load("grey-64.png").pixels);
}

#[test]
fn augmentation_resizes_the_shorter_side_then_crops_and_flips() {
    let src = load("source.png"); // 50 wide, 37 high
    let centre = Augment {
        resize: true,
        random_crop: false,
        random_flip: false,
    }
    .apply(src.clone(), 16, 0);
    assert_eq!((centre.height, centre.width), (16, 16));
    // Shorter side 37 -> 16, longer 50 -> int(16·50/37) = 21; the centre crop starts at
    // round(5/2) = 2 (Python rounds half to even).
    let resized = resize(&src, 16, 21);
    assert_eq!(&centre.pixels[..16 * 3], &resized.pixels[2 * 3..18 * 3]);
    let flipped = Augment {
        resize: true,
        random_crop: false,
        random_flip: true,
    }
    .apply(src.clone(), 16, 1 << 63);
    for x in 0..16 {
        assert_eq!(flipped.pixels[x * 3], centre.pixels[(15 - x) * 3]);
    }
    // Random crops differ with the draw and stay inside the image.
    let a = Augment {
        resize: true,
        random_crop: true,
        random_flip: false,
    };
    let crops: std::collections::BTreeSet<Vec<u8>> = (0..20u64)
        .map(|d| a.apply(src.clone(), 16, d * 0x9e37_79b9).pixels)
        .collect();
    assert!(crops.len() > 1);
}

//! EDF/BDF reading on real files: the PhysioNet recording against an independent reader
//! (Python's pyedflib), an EDF+ file with annotations against what MNE 1.5.1 read from it
//! (recorded in the fixtures), a lossless BDF round trip, and clean errors for damaged files.

use std::path::{Path, PathBuf};
use std::process::Command;

use signal_diffusion_runtime::data::signal::edf::{self, Format};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn python(script: &str) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python failed (install tests/requirements.txt): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn physionet_recording_matches_pyedflib() {
    let rec = edf::read(&fixture("S001R02.edf")).unwrap();
    assert_eq!(
        (rec.format, rec.records, rec.signals.len()),
        (Format::Edf, 61, 64)
    );
    let oz = rec.channel("Oz").unwrap();
    assert_eq!(
        (oz.samples_per_record, oz.sample_rate, oz.unit.as_str()),
        (160, 160.0, "uV")
    );
    assert_eq!(
        (
            oz.physical_min,
            oz.physical_max,
            oz.digital_min,
            oz.digital_max
        ),
        (-8092.0, 8092.0, -8092, 8092)
    );
    // pyedflib returns µV with its own arithmetic; agree to 1e-12 relative.
    let out = python(&format!(
        "import pyedflib\nf=pyedflib.EdfReader({:?})\nfor i in (0, 21, 61, 63):\n  x=f.readSignal(i)\n  print(f.getLabel(i), len(x), repr(float(x.sum())), repr(float(x[100])))",
        fixture("S001R02.edf").display().to_string()
    ));
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let s = rec
            .channel(f[0])
            .unwrap_or_else(|| panic!("no channel {}", f[0]));
        let uv: Vec<f64> = s.volts().iter().map(|v| v * 1e6).collect();
        assert_eq!(uv.len(), f[1].parse::<usize>().unwrap());
        let (sum, x100): (f64, f64) = (f[2].parse().unwrap(), f[3].parse().unwrap());
        assert!(
            (uv.iter().sum::<f64>() - sum).abs() <= 1e-9 * sum.abs().max(1.0),
            "{line}"
        );
        assert!(
            (uv[100] - x100).abs() <= 1e-12 * x100.abs().max(1.0),
            "{line}"
        );
    }
}

#[test]
fn edf_plus_annotations_and_values_match_mne() {
    let dir = python("import pyedflib,os;print(os.path.dirname(pyedflib.__file__))");
    let rec = edf::read(&Path::new(dir.trim()).join("tests/data/test_subsecond.edf")).unwrap();
    // What MNE 1.5.1 read from this file (fixtures_meta.json, test_subsecond_edf).
    assert_eq!(rec.signals.len(), 1);
    let fp1 = &rec.signals[0];
    assert_eq!((fp1.label.as_str(), fp1.sample_rate), ("Fp1", 128.0));
    let v = fp1.volts();
    assert_eq!(v.len(), 89344);
    let first = [
        6.247302967879784e-06,
        7.5765163653010094e-06,
        1.023494316014346e-05,
        9.969100480659214e-06,
    ];
    assert_eq!(&v[..4], &first, "MNE's volts, bit for bit");
    assert!((v.iter().sum::<f64>() - -0.026791093553060988).abs() < 1e-15);
    // Onsets relative to the first sample (the file starts 0.39 s into its start second); the
    // fixture holds MNE's onsets rounded to 1e-6 s.
    let expected = [
        (1.951172, "XLSpike"),
        (3.492188, "Clip Note"),
        (290.501953, "XLEvent"),
        (583.572266, "XLSpike"),
    ];
    assert_eq!(rec.annotations.len(), expected.len());
    for (a, (onset, text)) in rec.annotations.iter().zip(expected) {
        assert!(
            (a.onset - onset).abs() < 1e-6 && a.duration == 0.0 && a.text == text,
            "{a:?}"
        );
    }
    assert_eq!(rec.variant, "EDF+C");
}

#[test]
fn bdf_round_trip_is_lossless() {
    let rec = edf::read(&fixture("S001R02.edf")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s001r02.bdf");
    edf::write_bdf(&path, &rec).unwrap();
    let back = edf::read(&path).unwrap();
    assert_eq!(back.format, Format::Bdf);
    assert_eq!(back.signals.len(), rec.signals.len());
    for (a, b) in rec.signals.iter().zip(&back.signals) {
        assert_eq!(
            (&a.label, &a.unit, a.sample_rate),
            (&b.label, &b.unit, b.sample_rate)
        );
        assert_eq!(a.digital, b.digital, "{}", a.label);
        assert_eq!(a.volts(), b.volts(), "{}", a.label);
    }
    // pyedflib reads our BDF too.
    let out = python(&format!("import pyedflib\nf=pyedflib.EdfReader({:?})\nprint(f.signals_in_file, f.getSampleFrequency(0), repr(float(f.readSignal(60)[5])))", path.display().to_string()));
    let f: Vec<&str> = out.split_whitespace().collect();
    assert_eq!((f[0], f[1].parse::<f64>().unwrap()), ("64", 160.0));
    assert!((f[2].parse::<f64>().unwrap() - rec.signals[60].volts()[5] * 1e6).abs() < 1e-9);
}

#[test]
fn damaged_files_are_errors_naming_the_file_and_place() {
    let bytes = std::fs::read(fixture("S001R02.edf")).unwrap();
    let p = Path::new("damaged.edf");
    let truncated = edf::parse(p, &bytes[..bytes.len() - 1000])
        .unwrap_err()
        .to_string();
    assert!(
        truncated.contains("damaged.edf: truncated")
            && truncated.contains("record 60 is incomplete"),
        "{truncated}"
    );
    let short = edf::parse(p, &bytes[..300]).unwrap_err().to_string();
    assert!(
        short.contains(
            "truncated header: field `label of signal 2` needs bytes 288..304, the file has 300"
        ),
        "{short}"
    );
    let mut bad = bytes.clone();
    bad[236..244].copy_from_slice(b"sixtyone");
    let e = edf::parse(p, &bad).unwrap_err().to_string();
    assert!(
        e.contains("`number of data records` at byte 236 is `sixtyone`"),
        "{e}"
    );
    let e = edf::parse(p, b"hello").unwrap_err().to_string();
    assert!(e.contains("truncated header"), "{e}");
    let mut not_edf = bytes.clone();
    not_edf[0] = b'X';
    assert!(edf::parse(p, &not_edf)
        .unwrap_err()
        .to_string()
        .contains("not an EDF or BDF file"));
}

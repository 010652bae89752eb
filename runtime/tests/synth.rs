//! `sigdiff synth`: the demo dataset is written in the parkinsons raw layout and preprocessed.

use signal_diffusion_runtime::data::signal::synth::{run, SynthOptions};

#[test]
fn writes_the_raw_layout_and_its_preprocessed_spectrograms() {
    let tmp = tempfile::tempdir().unwrap();
    let args = SynthOptions {
        out: tmp.path().join("demo"),
        subjects: 10,
        windows: 2,
        seed: 3,
        min_db: -127.028,
        max_db: -44.068,
        overwrite: false,
        jobs: 2,
    };
    run(&args).unwrap();
    let raw = args.out.join("raw/parkinsons");
    let participants = std::fs::read_to_string(raw.join("participants.tsv")).unwrap();
    assert_eq!(
        participants.lines().next(),
        Some("participant_id\tGROUP\tGENDER\tAGE")
    );
    assert_eq!(participants.lines().count(), 11);
    let set = raw.join("sub-001/eeg/sub-001_task-Rest_eeg.set");
    let rec = signal_diffusion_runtime::data::signal::eeglab::read(&set).unwrap();
    assert_eq!((rec.labels.len(), rec.sample_rate), (64, 500.0));
    assert_eq!(
        rec.labels[30], "Fp2",
        "the parkinsons map's names at its indices"
    );
    assert_eq!(
        rec.samples,
        3 * 1024 * 4,
        "two half-overlapping windows at 125 Hz, times 4"
    );

    let csv = std::fs::read_to_string(args.out.join("stfts/metadata.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(
        rows[0],
        "file_name,split,gender,health,age,parkinsons_condition"
    );
    assert_eq!(rows.len(), 1 + 10 * 2);
    let test_rows = rows.iter().filter(|r| r.contains(",test,")).count();
    assert_eq!(test_rows, 2, "one test subject of ten");
    // A second run refuses to replace the dataset without --overwrite.
    let e = run(&args).unwrap_err().to_string();
    assert!(e.contains("--overwrite"), "{e}");
}

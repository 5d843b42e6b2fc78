//! The density benchmark's orchestration on a tiny configuration with real guests: two
//! runs (Ebb with reporting on and off) on a 1.25 GiB host, 512 MiB guests touching
//! 320 MiB. Checks what a regression would break: launching, the fit/fail
//! classification, the JSON file and the plot. (The figures themselves are the
//! benchmark's business, not this test's.)

use std::path::PathBuf;
use std::process::Command;

#[test]
fn tiny_density_run_classifies_guests_and_writes_its_report() {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("density-tiny");
    let _ = std::fs::remove_dir_all(&out);
    let result = Command::new(env!("CARGO_BIN_EXE_ebb-density"))
        .args([
            "--host-gib",
            "1.25",
            "--guest-gib",
            "0.5",
            "--touch-gib",
            "0.3125",
            "--max-guests",
            "3",
            "--runs",
            "ebb-on,ebb-off",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("running ebb-density");
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        result.status.success(),
        "ebb-density failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("[ebb-on] guest 1: ready"),
        "progress lines:\n{stdout}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("density.json")).unwrap()).unwrap();
    assert_eq!(json["host_gib"], 1.25);
    assert_eq!(json["guest_gib"], 0.5);
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    let on = &runs[0];
    let off = &runs[1];
    assert_eq!(
        (on["vmm"].as_str(), on["reporting"].as_bool()),
        (Some("ebb"), Some(true))
    );
    assert_eq!(
        (off["vmm"].as_str(), off["reporting"].as_bool()),
        (Some("ebb"), Some(false))
    );

    // With reporting every guest gives its touch back and all three fit; without, the
    // host (~1.1 GiB usable) holds two guests' touched memory and the third does not fit.
    assert_eq!(on["guests_fit"], 3, "reporting on: {on}");
    assert!(on["failure"].is_null(), "stopped at max guests: {on}");
    let off_fit = off["guests_fit"].as_u64().unwrap();
    assert!(off_fit < 3, "reporting off must not fit all three: {off}");
    let failure = &off["failure"];
    assert!(
        ["touch", "killed", "boot"].contains(&failure["kind"].as_str().unwrap_or("")),
        "a host-memory failure is classified: {failure}"
    );
    // Residual memory per guest: small with reporting, most of the touch without.
    let res_on = on["residual_mib_per_guest"].as_f64().unwrap();
    let res_off = off["residual_mib_per_guest"].as_f64().unwrap();
    assert!(
        res_on < 200.0 && res_off > 300.0,
        "residual on {res_on} off {res_off}"
    );
    for run in runs {
        let guests = run["guests"].as_array().unwrap();
        assert!(!guests.is_empty());
        assert!(
            run["timeline"].as_array().unwrap().len() > 10,
            "sampled timeline"
        );
        for g in guests.iter().filter(|g| g["fits"] == true) {
            assert!(g["boot_s"].as_f64().unwrap() > 0.0);
            assert!(g["peak_rss_mib"].as_f64().unwrap() > 300.0, "{g}");
        }
    }
    let svg = std::fs::read_to_string(out.join("density.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 2);
    let table = std::fs::read_to_string(out.join("density.txt")).unwrap();
    assert!(table.contains("guests fit"));
}

//! `flatwire idtool`: the real binary against zerotier-idtool's recorded outputs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flatwire_vl1::World;

fn flatwire() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flatwire"))
}

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/spec/vectors/zt-one")
}

fn idtool(args: &[&str]) -> Output {
    flatwire().arg("idtool").args(args).output().unwrap()
}

fn idtool_in(dir: &Path, args: &[&str]) -> Output {
    flatwire()
        .current_dir(dir)
        .arg("idtool")
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn generate_validate_getpublic_sign_verify_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("identity.secret");
    let public = dir.path().join("identity.public");
    let o = idtool(&["generate", p(&secret), p(&public)]);
    assert_eq!(code(&o), 0, "{o:?}");
    // stdout is exactly what zerotier-idtool prints; the progress note is on stderr only.
    assert_eq!(
        text(&o.stdout),
        format!("{} written\n{} written\n", p(&secret), p(&public))
    );
    assert!(text(&o.stderr).contains("generating identity"));
    let secret_text = std::fs::read_to_string(&secret).unwrap();
    let public_text = std::fs::read_to_string(&public).unwrap();
    assert_eq!(secret_text.split(':').count(), 4);
    assert!(secret_text.starts_with(&public_text) && !public_text.ends_with('\n'));

    for id in [&secret, &public] {
        let o = idtool(&["validate", p(id)]);
        assert_eq!(code(&o), 0, "{o:?}");
        assert_eq!(text(&o.stdout), format!("{} is a valid identity\n", p(id)));
    }
    // A literal identity on the command line works too.
    let o = idtool(&["validate", &public_text]);
    assert_eq!(
        text(&o.stdout),
        format!("{public_text} is a valid identity\n")
    );

    let o = idtool(&["getpublic", p(&secret)]);
    assert_eq!((code(&o), text(&o.stdout)), (0, public_text.clone()));

    let msg = dir.path().join("msg");
    std::fs::write(&msg, b"flatwire signs this\n").unwrap();
    let o = idtool(&["sign", p(&secret), p(&msg)]);
    assert_eq!(code(&o), 0, "{o:?}");
    let sig = text(&o.stdout);
    assert_eq!(sig.len(), 192);
    assert!(sig.bytes().all(|b| b.is_ascii_hexdigit()));

    let o = idtool(&["verify", p(&public), p(&msg), &sig]);
    assert_eq!(code(&o), 0, "{o:?}");
    assert_eq!(text(&o.stdout), format!("{} signature valid\n", p(&msg)));
    // The signature may also be given as a file holding the hex.
    let sig_file = dir.path().join("msg.sig");
    std::fs::write(&sig_file, format!("{sig}\n")).unwrap();
    let o = idtool(&["verify", p(&public), p(&msg), p(&sig_file)]);
    assert_eq!(code(&o), 0, "{o:?}");

    std::fs::write(&msg, b"flatwire signs that\n").unwrap();
    let o = idtool(&["verify", p(&public), p(&msg), &sig]);
    assert_eq!(code(&o), 1);
    assert_eq!(text(&o.stdout), "");
    assert_eq!(
        text(&o.stderr),
        format!("{} signature check FAILED\n", p(&msg))
    );
}

#[test]
fn generate_without_files_prints_the_secret_identity() {
    let o = idtool(&["generate"]);
    assert_eq!(code(&o), 0, "{o:?}");
    let s = text(&o.stdout);
    assert!(!s.ends_with('\n'));
    let o = idtool(&["validate", &s]);
    assert_eq!(code(&o), 0, "{o:?}");
}

#[test]
fn verify_matches_zerotier_idtool_on_recorded_signatures() {
    let v = vectors();
    let ids = v.join("identities");
    let sigs = v.join("signatures");
    let sig_hex = |f: &str| std::fs::read_to_string(sigs.join(f)).unwrap();
    let good = sig_hex("message.txt.sig");
    let cases: Vec<(&str, PathBuf, &str, String)> = vec![
        (
            "valid-secret-id",
            ids.join("identity-1.secret"),
            "message.txt",
            good.clone(),
        ),
        (
            "valid-public-id",
            ids.join("identity-1.public"),
            "message.txt",
            good.clone(),
        ),
        (
            "valid-empty-message",
            ids.join("identity-1.public"),
            "message-empty.txt",
            sig_hex("message-empty.txt.sig"),
        ),
        (
            "tampered-message",
            ids.join("identity-1.public"),
            "message-tampered.txt",
            good.clone(),
        ),
        (
            "sig-bitflip-ed25519-part",
            ids.join("identity-1.public"),
            "message.txt",
            sig_hex("sig-bitflip-ed25519-part.hex"),
        ),
        (
            "sig-bitflip-digest-part",
            ids.join("identity-1.public"),
            "message.txt",
            sig_hex("sig-bitflip-digest-part.hex"),
        ),
        (
            "wrong-identity",
            ids.join("identity-2.public"),
            "message.txt",
            good.clone(),
        ),
        (
            "truncated-sig-64-bytes",
            ids.join("identity-1.public"),
            "message.txt",
            good[..128].to_owned(),
        ),
    ];
    let expected = std::fs::read_to_string(sigs.join("verify-results.tsv")).unwrap();
    let mut seen = 0;
    for line in expected.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let (name, want_code, want_text) = (f[0], f[1].parse::<i32>().unwrap(), f[2]);
        let (_, id, file, sig) = cases.iter().find(|c| c.0 == name).unwrap();
        // Run from the signatures folder with a bare file name, as the recording was made.
        let o = idtool_in(&sigs, &["verify", p(id), file, sig]);
        assert_eq!(code(&o), want_code, "{name}: {o:?}");
        let printed = if want_code == 0 { &o.stdout } else { &o.stderr };
        assert_eq!(text(printed).trim_end(), want_text, "{name}");
        seen += 1;
    }
    assert_eq!(seen, cases.len());
}

#[test]
fn sign_reproduces_zerotier_idtool_signatures() {
    let v = vectors();
    for (msg, sig) in [
        ("message.txt", "message.txt.sig"),
        ("message-empty.txt", "message-empty.txt.sig"),
    ] {
        let o = idtool(&[
            "sign",
            p(&v.join("identities/identity-1.secret")),
            p(&v.join("signatures").join(msg)),
        ]);
        assert_eq!(code(&o), 0, "{o:?}");
        let want = std::fs::read_to_string(v.join("signatures").join(sig)).unwrap();
        assert_eq!(text(&o.stdout), want, "{msg}");
    }
}

#[test]
fn validate_and_getpublic_match_recorded_outputs() {
    let ids = vectors().join("identities");
    for n in 1..=5 {
        for ext in ["secret", "public"] {
            let name = format!("identity-{n}.{ext}");
            let o = idtool_in(&ids, &["validate", &name]);
            assert_eq!(code(&o), 0, "{name}: {o:?}");
            assert_eq!(text(&o.stdout), format!("{name} is a valid identity\n"));
        }
        let o = idtool_in(&ids, &["getpublic", &format!("identity-{n}.secret")]);
        let want = std::fs::read_to_string(ids.join(format!("identity-{n}.public"))).unwrap();
        assert_eq!(text(&o.stdout), want);
    }
    let neg = ids.join("validate-negative");
    let results = std::fs::read_to_string(neg.join("results.tsv")).unwrap();
    for line in results.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let o = idtool_in(&neg, &["validate", f[0]]);
        assert_eq!(code(&o), f[1].parse::<i32>().unwrap(), "{line}: {o:?}");
        let printed = if code(&o) == 0 { &o.stdout } else { &o.stderr };
        assert_eq!(text(printed).trim_end(), f[2], "{line}");
    }
}

#[test]
fn bad_arguments_and_files_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let ids = vectors().join("identities");
    let public = ids.join("identity-1.public");
    let missing = dir.path().join("missing");
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, "not an identity").unwrap();
    let msg = vectors().join("signatures/message.txt");

    // No command, an unknown command, or missing arguments: usage on stdout, exit 1.
    for args in [
        &[][..],
        &["frobnicate"],
        &["validate"],
        &["getpublic"],
        &["sign", p(&public)],
        &["verify", p(&public), p(&msg)],
        &["initworld"],
        &["genworld"],
    ] {
        let o = idtool(args);
        assert_eq!(code(&o), 1, "{args:?}");
        assert!(
            text(&o.stdout).contains("Usage: flatwire idtool"),
            "{args:?}"
        );
    }

    for (args, err) in [
        (
            vec!["validate", p(&missing)],
            format!(
                "Identity argument invalid or file unreadable: {}",
                p(&missing)
            ),
        ),
        (
            vec!["getpublic", p(&garbage)],
            format!(
                "Identity argument invalid or file unreadable: {}",
                p(&garbage)
            ),
        ),
        (
            vec!["sign", p(&public), p(&msg)],
            format!(
                "{} does not contain a private key (must use private to sign)",
                p(&public)
            ),
        ),
        (
            vec!["sign", p(&ids.join("identity-1.secret")), p(&missing)],
            format!("{} is not readable", p(&missing)),
        ),
        (
            vec!["verify", p(&public), p(&missing), "00"],
            format!("{} is not readable", p(&missing)),
        ),
        (
            vec!["verify", p(&public), p(&msg), "not-hex"],
            format!("{} signature check FAILED", p(&msg)),
        ),
        (
            vec!["initworld", p(&garbage)],
            format!("{} is not a valid identity", p(&garbage)),
        ),
        (
            vec!["genworld", p(&missing)],
            format!("cannot read {}", p(&missing)),
        ),
        (
            vec!["genworld", p(&garbage)],
            format!("{} is not valid JSON", p(&garbage)),
        ),
        (
            vec!["generate", p(&dir.path().join("no/such/dir/id.secret"))],
            format!(
                "Error writing to {}",
                p(&dir.path().join("no/such/dir/id.secret"))
            ),
        ),
    ] {
        let o = idtool(&args);
        assert_eq!(code(&o), 1, "{args:?}: {o:?}");
        assert!(text(&o.stderr).contains(&err), "{args:?}: {o:?}");
    }
}

fn write_json(path: &Path, v: &serde_json::Value) {
    std::fs::write(path, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

#[test]
fn genworld_reproduces_the_lab_planet_byte_for_byte() {
    let v = vectors().join("planet");
    let dir = tempfile::tempdir().unwrap();
    let mut def: serde_json::Value =
        serde_json::from_slice(&std::fs::read(v.join("planet-genmoon-input.json")).unwrap())
            .unwrap();
    def["timestamp"] = 1_795_356_608_284u64.into();
    let def_path = dir.path().join("planet.json");
    write_json(&def_path, &def);
    let o = idtool_in(dir.path(), &["genworld", "planet.json"]);
    assert_eq!(code(&o), 0, "{o:?}");
    assert_eq!(
        text(&o.stdout),
        "wrote 0000008cc5f30f43.planet (signed world with timestamp 1795356608284)\n"
    );
    let ours = std::fs::read(dir.path().join("0000008cc5f30f43.planet")).unwrap();
    assert_eq!(ours, std::fs::read(v.join("planet")).unwrap());
}

#[test]
fn initworld_then_genworld_makes_a_verifiable_planet() {
    let dir = tempfile::tempdir().unwrap();
    let root = vectors().join("capture/node-identities/ztroot-8cc5f30f43.public");
    let o = idtool(&[
        "initworld",
        p(&root),
        "192.0.2.1/9993",
        "[2001:db8::1]:9993",
    ]);
    assert_eq!(code(&o), 0, "{o:?}");
    let json = text(&o.stdout);
    // zerotier-idtool's layout: one-space indent, keys in sorted order.
    assert!(json.starts_with("{\n \"id\": \"8cc5f30f43\",\n \"objtype\": \"world\",\n"));
    let def: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(def["worldType"], "planet");
    assert_eq!(def["signingKey"], def["updatesMustBeSignedBy"]);
    assert_eq!(def["signingKey_SECRET"].as_str().unwrap().len(), 128);
    assert_eq!(
        def["roots"][0]["stableEndpoints"],
        serde_json::json!(["192.0.2.1/9993", "2001:db8::1/9993"])
    );
    let def_path = dir.path().join("world.json");
    std::fs::write(&def_path, &json).unwrap();
    let out = dir.path().join("planet");
    let o = idtool(&["genworld", p(&def_path), p(&out)]);
    assert_eq!(code(&o), 0, "{o:?}");
    assert!(text(&o.stdout).starts_with(&format!("wrote {} (signed world", p(&out))));

    let bytes = std::fs::read(&out).unwrap();
    let (world, used) = World::parse(&bytes).unwrap();
    assert_eq!(used, bytes.len());
    assert_eq!(world.id, 0x8cc5f30f43);
    assert_eq!(world.roots.len(), 1);
    assert_eq!(world.roots[0].stable_endpoints.len(), 2);
    assert!(world.verify_signature(&world.updates_must_be_signed_by));

    // A bad definition is refused with a clear message.
    let mut bad = def.clone();
    bad["worldType"] = "galaxy".into();
    write_json(&def_path, &bad);
    let o = idtool(&["genworld", p(&def_path), p(&out)]);
    assert_eq!(
        (code(&o), text(&o.stderr)),
        (1, "invalid worldType\n".into())
    );
    let mut bad = def;
    bad["signingKey_SECRET"] = "00".into();
    write_json(&def_path, &bad);
    let o = idtool(&["genworld", p(&def_path), p(&out)]);
    assert_eq!(code(&o), 1);
    assert!(text(&o.stderr).contains("signingKey_SECRET"), "{o:?}");
}

//! `flatwire idtool …`: identities, signatures and worlds, in the manner of `zerotier-idtool`.
//!
//! The commands `zerotier-idtool` also has (`generate`, `validate`, `getpublic`, `sign`,
//! `verify`) take the same arguments and print the same text on the same streams with the
//! same exit codes. `initworld`/`genworld` are ours: like `initmoon`/`genmoon`, but they make
//! planets by default, accept a fixed `timestamp` for reproducible output, and check the
//! definition before signing it.

use std::cmp::Ordering as CmpOrdering;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use flatwire_vl1::identity::{self, PUBLIC_KEY_LEN, SECRET_KEY_LEN};
use flatwire_vl1::world::{Root, World, WorldType};
use flatwire_vl1::{Address, Identity};
use serde::Serialize;

/// Arguments of `flatwire idtool`, taken verbatim as `zerotier-idtool` takes its argv.
#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
pub struct IdtoolArgs {
    /// The command and its arguments (`flatwire idtool` alone prints the usage).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// Most bytes a hex signature argument is decoded into.
const MAX_SIGNATURE_BYTES: usize = 4096;

fn usage() -> String {
    format!(
        "flatwire idtool version {}\n\
         Usage: flatwire idtool <command> [<args>]\n\
         \n\
         Commands:\n  \
         generate [<identity.secret>] [<identity.public>] [<vanity>]\n  \
         validate <identity.secret/public>\n  \
         getpublic <identity.secret>\n  \
         sign <identity.secret> <file>\n  \
         verify <identity.secret/public> <file> <signature>\n  \
         initworld <identity.public of first root> [<ip/port>...]\n  \
         genworld <world json> [<output file>]\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// Prints the usage on stdout and fails, as `zerotier-idtool` does for missing arguments.
fn help() -> ExitCode {
    print!("{}", usage());
    ExitCode::from(1)
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("{msg}");
    ExitCode::from(1)
}

/// Writes `s` to stdout without a newline and flushes it.
fn out(s: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(s.as_bytes());
    let _ = o.flush();
}

/// Runs `flatwire idtool ARGS`.
pub fn run(args: IdtoolArgs) -> ExitCode {
    let a = args.args;
    let Some(cmd) = a.first() else {
        return help();
    };
    match cmd.as_str() {
        "generate" => generate(&a),
        "validate" => validate(&a),
        "getpublic" => getpublic(&a),
        "sign" => sign(&a),
        "verify" => verify(&a),
        "initworld" => initworld(&a),
        "genworld" => genworld(&a),
        _ => help(),
    }
}

/// Reads an identity given on the command line, either literally (longer than 32 characters
/// with `:` at index 10, as `zerotier-idtool` decides) or as a file holding one.
fn identity_from_arg(arg: &str) -> Option<Identity> {
    if arg.len() > 32 && arg.as_bytes()[10] == b':' {
        arg.parse().ok()
    } else {
        let text = std::fs::read(arg).ok()?;
        std::str::from_utf8(&text).ok()?.parse().ok()
    }
}

fn invalid_identity(arg: &str) -> ExitCode {
    fail(format_args!(
        "Identity argument invalid or file unreadable: {arg}"
    ))
}

/// `zerotier-idtool`'s lenient hex-to-u64: leading hex digits only, others end the number.
fn hex_to_u64(s: &str) -> u64 {
    s.trim()
        .bytes()
        .map_while(|b| (b as char).to_digit(16))
        .fold(0u64, |acc, d| (acc << 4) | u64::from(d))
}

/// Decodes hex the way `zerotier-idtool` decodes a signature: pairs of characters, a
/// non-hex character counting as 0, a trailing odd character ignored.
fn unhex_lenient(s: &str) -> Vec<u8> {
    let nib = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
    s.as_bytes()
        .chunks_exact(2)
        .take(MAX_SIGNATURE_BYTES)
        .map(|p| (nib(p[0]) << 4) | nib(p[1]))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_file(path: &str, contents: &[u8], secret: bool) -> std::io::Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    o.open(path)?.write_all(contents)
}

fn generate(a: &[String]) -> ExitCode {
    let (vanity, bits) = match a.get(3) {
        Some(v) => (hex_to_u64(v) & 0xff_ffff_ffff, (4 * v.len() as u32).min(40)),
        None => (0, 0),
    };
    let cancel = AtomicBool::new(false);
    eprintln!("generating identity (this takes a moment)...");
    let id = loop {
        let id = match Identity::generate(&cancel) {
            Ok(id) => id,
            Err(e) => return fail(format_args!("identity generation failed: {e}")),
        };
        let addr = id.address().to_u64();
        if addr >> (40 - bits) == vanity {
            if bits > 0 {
                eprintln!("vanity address: found {addr:010x} !");
            }
            break id;
        }
        eprintln!(
            "vanity address: tried {addr:010x} looking for first {bits} bits of {:010x}",
            vanity << (40 - bits)
        );
    };
    let secret = id.to_secret_string().unwrap_or_default();
    let Some(secret_path) = a.get(1) else {
        out(&secret);
        return ExitCode::SUCCESS;
    };
    if write_file(secret_path, secret.as_bytes(), true).is_err() {
        return fail(format_args!("Error writing to {secret_path}"));
    }
    println!("{secret_path} written");
    if let Some(public_path) = a.get(2) {
        if write_file(public_path, id.to_string().as_bytes(), false).is_err() {
            return fail(format_args!("Error writing to {public_path}"));
        }
        println!("{public_path} written");
    }
    ExitCode::SUCCESS
}

fn validate(a: &[String]) -> ExitCode {
    let Some(arg) = a.get(1) else {
        return help();
    };
    let Some(id) = identity_from_arg(arg) else {
        return invalid_identity(arg);
    };
    if !id.locally_validate() {
        return fail(format_args!("{arg} FAILED validation."));
    }
    println!("{arg} is a valid identity");
    ExitCode::SUCCESS
}

fn getpublic(a: &[String]) -> ExitCode {
    let Some(arg) = a.get(1) else {
        return help();
    };
    let Some(id) = identity_from_arg(arg) else {
        return invalid_identity(arg);
    };
    out(&id.to_string());
    ExitCode::SUCCESS
}

fn sign(a: &[String]) -> ExitCode {
    let (Some(arg), Some(file)) = (a.get(1), a.get(2)) else {
        return help();
    };
    let Some(id) = identity_from_arg(arg) else {
        return invalid_identity(arg);
    };
    if !id.has_secret() {
        return fail(format_args!(
            "{arg} does not contain a private key (must use private to sign)"
        ));
    }
    let Ok(msg) = std::fs::read(file) else {
        return fail(format_args!("{file} is not readable"));
    };
    match id.sign(&msg) {
        Ok(sig) => {
            out(&hex(&sig));
            ExitCode::SUCCESS
        }
        Err(e) => fail(format_args!("cannot sign with {arg}: {e}")),
    }
}

fn verify(a: &[String]) -> ExitCode {
    let (Some(arg), Some(file), Some(sig)) = (a.get(1), a.get(2), a.get(3)) else {
        return help();
    };
    let Some(id) = identity_from_arg(arg) else {
        return invalid_identity(arg);
    };
    let Ok(msg) = std::fs::read(file) else {
        return fail(format_args!("{file} is not readable"));
    };
    // The signature is hex on the command line or, failing that, a file holding the hex.
    let checks = |s: &[u8]| s.len() > Address::LEN && id.verify(&msg, s);
    let valid = checks(&unhex_lenient(sig))
        || std::fs::read(sig)
            .ok()
            .is_some_and(|t| checks(&unhex_lenient(&String::from_utf8_lossy(&t))));
    if valid {
        println!("{file} signature valid");
        ExitCode::SUCCESS
    } else {
        fail(format_args!("{file} signature check FAILED"))
    }
}

/// The JSON world definition written by `initworld` and read by `genworld`. Its keys are
/// those of `zerotier-idtool initmoon`, so a moon or planet definition made for `genmoon`
/// works unchanged; `timestamp` (ms) is optional and ours.
#[derive(Debug, Serialize)]
struct WorldDef {
    id: String,
    objtype: &'static str,
    roots: Vec<RootDef>,
    #[serde(rename = "signingKey")]
    signing_key: String,
    #[serde(rename = "signingKey_SECRET")]
    signing_key_secret: String,
    #[serde(rename = "updatesMustBeSignedBy")]
    updates_must_be_signed_by: String,
    #[serde(rename = "worldType")]
    world_type: &'static str,
}

#[derive(Debug, Serialize)]
struct RootDef {
    identity: String,
    #[serde(rename = "stableEndpoints")]
    stable_endpoints: Vec<String>,
}

/// Parses `ip/port` (ZeroTier's form) or `ip:port` / `[ip6]:port`.
fn parse_endpoint(s: &str) -> Option<SocketAddr> {
    if let Some((ip, port)) = s.rsplit_once('/') {
        return Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?));
    }
    s.parse().ok()
}

fn format_endpoint(a: &SocketAddr) -> String {
    format!("{}/{}", a.ip(), a.port())
}

fn initworld(a: &[String]) -> ExitCode {
    let Some(arg) = a.get(1) else {
        return help();
    };
    let Some(id) = identity_from_arg(arg) else {
        return fail(format_args!("{arg} is not a valid identity"));
    };
    let mut endpoints = Vec::new();
    for e in &a[2..] {
        match parse_endpoint(e) {
            Some(ep) => endpoints.push(format_endpoint(&ep)),
            None => return fail(format_args!("{e} is not an endpoint (expected ip/port)")),
        }
    }
    let Ok((public, secret)) = identity::generate_key_pair() else {
        return fail("random number generator failed");
    };
    let def = WorldDef {
        id: id.address().to_string(),
        objtype: "world",
        roots: vec![RootDef {
            identity: id.to_public().to_string(),
            stable_endpoints: endpoints,
        }],
        signing_key: hex(&public),
        signing_key_secret: hex(&secret),
        updates_must_be_signed_by: hex(&public),
        world_type: "planet",
    };
    let mut buf = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(
        &mut buf,
        serde_json::ser::PrettyFormatter::with_indent(b" "),
    );
    if def.serialize(&mut ser).is_err() {
        return fail("cannot encode the world definition");
    }
    buf.push(b'\n');
    out(&String::from_utf8_lossy(&buf));
    ExitCode::SUCCESS
}

fn hex_key<const N: usize>(v: &serde_json::Value, key: &str) -> Option<[u8; N]> {
    let s = v.get(key)?.as_str()?;
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        let hi = (b[2 * i] as char).to_digit(16)?;
        let lo = (b[2 * i + 1] as char).to_digit(16)?;
        *o = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Orders endpoints as `zerotier-idtool genmoon` does (the byte order of the raw socket
/// address fields on a little-endian host), so the same definition gives the same bytes.
fn endpoint_order(a: &SocketAddr, b: &SocketAddr) -> CmpOrdering {
    let key = |s: &SocketAddr| -> (u8, u16, Vec<u8>) {
        let port = u16::from_le_bytes(s.port().to_be_bytes());
        match s.ip() {
            IpAddr::V4(ip) => (
                0,
                port,
                u32::from_le_bytes(ip.octets()).to_be_bytes().to_vec(),
            ),
            IpAddr::V6(ip) => (1, port, ip.octets().to_vec()),
        }
    };
    key(a).cmp(&key(b))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn genworld(a: &[String]) -> ExitCode {
    let Some(path) = a.get(1) else {
        return help();
    };
    let Ok(text) = std::fs::read(path) else {
        return fail(format_args!("cannot read {path}"));
    };
    let def: serde_json::Value = match serde_json::from_slice(&text) {
        Ok(v) => v,
        Err(e) => return fail(format_args!("{path} is not valid JSON: {e}")),
    };
    let id = def.get("id").and_then(|v| v.as_str()).map_or(0, hex_to_u64);
    if id == 0 {
        return fail(format_args!("ID in {path} is invalid"));
    }
    let world_type = match def.get("worldType").and_then(|v| v.as_str()) {
        Some("planet") => WorldType::Planet,
        Some("moon") => WorldType::Moon,
        _ => return fail("invalid worldType"),
    };
    let Some(secret) = hex_key::<SECRET_KEY_LEN>(&def, "signingKey_SECRET") else {
        return fail(format_args!(
            "signingKey_SECRET in {path} is missing or not {} hex digits",
            2 * SECRET_KEY_LEN
        ));
    };
    if let Some(public) = hex_key::<PUBLIC_KEY_LEN>(&def, "signingKey")
        && public != identity::public_key_of(&secret)
    {
        return fail(format_args!(
            "signingKey in {path} does not belong to signingKey_SECRET"
        ));
    }
    let Some(next_key) = hex_key::<PUBLIC_KEY_LEN>(&def, "updatesMustBeSignedBy") else {
        return fail(format_args!(
            "updatesMustBeSignedBy in {path} is missing or not {} hex digits",
            2 * PUBLIC_KEY_LEN
        ));
    };
    let mut roots = Vec::new();
    for (i, r) in def
        .get("roots")
        .and_then(|v| v.as_array())
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .enumerate()
    {
        let Some(identity) = r
            .get("identity")
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse::<Identity>().ok())
        else {
            return fail(format_args!("root {i} in {path} has no valid identity"));
        };
        let mut stable_endpoints = Vec::new();
        for e in r
            .get("stableEndpoints")
            .and_then(|v| v.as_array())
            .map_or(&[][..], Vec::as_slice)
        {
            match e.as_str().and_then(parse_endpoint) {
                Some(ep) => stable_endpoints.push(ep),
                None => {
                    return fail(format_args!(
                        "stable endpoint {e} of root {i} in {path} is not ip/port"
                    ));
                }
            }
        }
        stable_endpoints.sort_by(endpoint_order);
        roots.push(Root {
            identity: identity.to_public(),
            stable_endpoints,
        });
    }
    if roots.is_empty() {
        return fail(format_args!("{path} lists no roots"));
    }
    roots.sort_by_key(|r| r.identity.address());
    let timestamp = match def.get("timestamp") {
        None => now_ms(),
        Some(t) => match t.as_u64() {
            Some(t) => t,
            None => return fail(format_args!("timestamp in {path} is not a number of ms")),
        },
    };
    let world = match World::create(world_type, id, timestamp, next_key, roots, &secret) {
        Ok(w) => w,
        Err(e) => {
            return fail(format_args!(
                "{path}: {e} (at most {} roots of {} stable endpoints each)",
                flatwire_vl1::world::MAX_ROOTS,
                flatwire_vl1::world::MAX_STABLE_ENDPOINTS
            ));
        }
    };
    let ext = if world_type == WorldType::Moon {
        "moon"
    } else {
        "planet"
    };
    let out_path = a
        .get(2)
        .cloned()
        .unwrap_or_else(|| format!("{id:016x}.{ext}"));
    if let Err(e) = write_file(&out_path, &world.serialize(false), false) {
        return fail(format_args!("Error writing to {out_path}: {e}"));
    }
    println!("wrote {out_path} (signed world with timestamp {timestamp})");
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_decoders_match_zerotier_idtool() {
        assert_eq!(hex_to_u64("8cc5f30f43"), 0x8cc5f30f43);
        assert_eq!(hex_to_u64("12zz"), 0x12);
        assert_eq!(unhex_lenient("0aFf1"), vec![0x0a, 0xff]);
        assert_eq!(unhex_lenient("zz"), vec![0]);
    }

    #[test]
    fn endpoints_parse_and_sort() {
        let a = parse_endpoint("172.31.254.1/9993").unwrap();
        assert_eq!(format_endpoint(&a), "172.31.254.1/9993");
        assert_eq!(parse_endpoint("[::1]:9993").unwrap().port(), 9993);
        assert!(parse_endpoint("nonsense").is_none());
        let v6 = parse_endpoint("::1/1").unwrap();
        assert_eq!(endpoint_order(&a, &v6), CmpOrdering::Less);
    }
}

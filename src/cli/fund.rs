//! `automaton fund`: how to send this agent money. Without `--sats`: its Lightning address and LNURL (derived from
//! the config, so this works while the agent is stopped; paying needs it running) with a QR code; with `--sats N`:
//! a BOLT 11 invoice for N sats from the running agent's node. `--png FILE` writes the QR code as an image.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use qrcode::render::unicode::Dense1x2;
use qrcode::{Color, EcLevel, QrCode};
use serde_json::{json, Map, Value};

use super::ExitError;
use crate::config::{env_overrides, Config, ConfigError, Override};
use crate::control::{Client, ControlError};
use crate::home::Home;
use crate::http::Advertised;

/// How long `--sats` waits for the running agent.
const AGENT_WAIT: Duration = Duration::from_secs(60);
/// Pixels per QR module in `--png`, and the quiet zone around it (in modules).
const PNG_SCALE: usize = 8;
const QUIET_ZONE: usize = 4;

#[derive(Debug, Args)]
pub struct FundArgs {
    /// Ask for exactly N sats with a BOLT 11 invoice (needs the agent running)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    sats: Option<u64>,
    /// Print {lightning_address, lnurl[, bolt11]} on stdout (the QR code goes to stderr)
    #[arg(long)]
    json: bool,
    /// Also write the QR code to FILE as a PNG image
    #[arg(long, value_name = "FILE")]
    png: Option<PathBuf>,
}

pub fn execute(home: &Home, overrides: &[Override], args: FundArgs) -> anyhow::Result<()> {
    super::init_stderr_tracing();
    let config = match Config::load_with(home, &env_overrides(), overrides) {
        Ok(config) => config,
        Err(ConfigError::NotFound { .. }) => return Err(super::not_set_up(home)),
        Err(e) => return Err(e.into()),
    };
    let advertised = Advertised::from_config(&config, None);
    let mut out = Map::new();
    out.insert(
        "lightning_address".into(),
        json!(advertised.lightning_address),
    );
    out.insert("lnurl".into(), json!(advertised.lnurl));
    let qr_payload = match args.sats {
        Some(sats) => {
            let invoice = invoice(home, &config, sats)?;
            let bolt11 = invoice["bolt11"].as_str().unwrap_or_default().to_string();
            out.insert("bolt11".into(), json!(bolt11));
            out.insert("payment_hash".into(), invoice["payment_hash"].clone());
            out.insert("expires_at".into(), invoice["expires_at"].clone());
            out.insert("amount_sats".into(), json!(sats));
            format!("lightning:{bolt11}").to_uppercase()
        }
        None => match &advertised.lnurl {
            Some(lnurl) => format!("lightning:{lnurl}").to_uppercase(),
            None => {
                return Err(ExitError {
                    code: 1,
                    message: format!(
                        "{} (or ask for an invoice: `automaton fund --sats N`)",
                        advertised
                            .lnurl_unavailable
                            .clone()
                            .unwrap_or_else(|| "no Lightning address".into())
                    ),
                }
                .into())
            }
        },
    };
    let code = QrCode::with_error_correction_level(qr_payload.as_bytes(), EcLevel::L)
        .context("cannot make a QR code of it")?;
    let terminal = code
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build();
    if let Some(path) = &args.png {
        write_png(&code, path)?;
    }
    let value = Value::Object(out);
    if args.json {
        eprintln!("{terminal}");
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("{terminal}");
    if let Some(address) = &advertised.lightning_address {
        println!("Lightning address  {address}");
    }
    if let Some(lnurl) = &advertised.lnurl {
        println!("LNURL              {lnurl}");
    }
    if let Some(bolt11) = value.get("bolt11").and_then(Value::as_str) {
        println!("Invoice ({} sats)  {bolt11}", args.sats.unwrap_or_default());
    }
    if let Some(path) = &args.png {
        println!("QR code written to {}", path.display());
    }
    if args.sats.is_none() {
        eprintln!(
            "Any amount from {} to {} sats; the agent must be running (`automaton run`) to be paid.",
            config.http.lnurl.min_sats, config.http.lnurl.max_sats
        );
    }
    Ok(())
}

fn invoice(home: &Home, config: &Config, sats: u64) -> anyhow::Result<Value> {
    let params = json!({
        "amount_sats": sats,
        "memo": format!("Fund {}", config.name.trim()),
        "purpose": "funding",
    });
    (|| -> Result<Value, ControlError> {
        let mut client = Client::connect(home, AGENT_WAIT)?;
        client.request("wallet.invoice", params)
    })()
    .map_err(|e| {
        ExitError {
            code: e.code,
            message: e.message,
        }
        .into()
    })
}

/// The QR code as a black-on-white grayscale PNG with a quiet zone, `PNG_SCALE` pixels per module.
fn write_png(code: &QrCode, path: &Path) -> anyhow::Result<()> {
    let width = code.width();
    let colors = code.to_colors();
    let side = (width + 2 * QUIET_ZONE) * PNG_SCALE;
    let mut pixels = vec![255u8; side * side];
    for (i, color) in colors.iter().enumerate() {
        if *color != Color::Dark {
            continue;
        }
        let (x, y) = (i % width + QUIET_ZONE, i / width + QUIET_ZONE);
        for dy in 0..PNG_SCALE {
            let row = (y * PNG_SCALE + dy) * side;
            pixels[row + x * PNG_SCALE..row + (x + 1) * PNG_SCALE].fill(0);
        }
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), side as u32, side as u32);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder
        .write_header()
        .with_context(|| format!("cannot write {}", path.display()))?;
    writer
        .write_image_data(&pixels)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writer
        .finish()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

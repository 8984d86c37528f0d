//! `ekey-host status`: ask the running daemon.

use std::path::Path;

use crate::daemon::control;
use crate::status;

pub(crate) async fn status_command(json: bool, path: &Path) -> Result<(), String> {
    let answer = control::request(path, "status")
        .await
        .map_err(|e| e.to_string())?;
    let doc: serde_json::Value = serde_json::from_str(&answer)
        .map_err(|e| format!("the daemon's answer is not a status document: {e}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or(answer));
    } else {
        print!("{}", status::render(&doc));
    }
    Ok(())
}

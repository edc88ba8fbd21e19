//! The estimate as one JSON object: keys are a contract for scripts (`estimate --json`,
//! `probe --json`).

/// The estimate as one JSON object; the keys are a contract for scripts.
pub(crate) fn estimate_json(e: &shared::Estimate) -> serde_json::Value {
    let bytes_map = |entries: &[(&'static str, shared::Bytes)]| -> serde_json::Map<String, serde_json::Value> {
        entries.iter().map(|(k, v)| ((*k).to_owned(), v.get().into())).collect()
    };
    let phases: serde_json::Map<String, serde_json::Value> =
        e.phase_peaks.iter().map(|(p, v)| (p.key().to_owned(), v.get().into())).collect();
    let mut out = serde_json::json!({
        "runtime": e.runtime.word(),
        "params": e.params,
        "peak_bytes": e.peak_bytes.get(),
        "peak_bytes_low": e.peak_bytes_low.get(),
        "peak_bytes_high": e.peak_bytes_high.get(),
        "peak_phase": e.peak_phase.key(),
        "breakdown": bytes_map(&e.breakdown.entries()),
        "category_peaks": bytes_map(&e.category_peaks.entries()),
        "steady_bytes": e.steady_bytes.get(),
        "phase_peaks": phases,
        "host_peak_bytes": e.host_peak_bytes.get(),
        "host_breakdown": bytes_map(&e.host.entries()),
    });
    if let (Some(d), Some(map)) = (&e.device, out.as_object_mut()) {
        map.insert("gpu".into(), d.gpu.clone().into());
        map.insert("reserved_peak_bytes".into(), d.reserved_peak_bytes.get().into());
        map.insert("device_peak_bytes".into(), d.device_peak_bytes.get().into());
        map.insert("device_peak_bytes_low".into(), d.device_peak_bytes_low.get().into());
        map.insert("device_peak_bytes_high".into(), d.device_peak_bytes_high.get().into());
        map.insert("context_bytes".into(), d.context_bytes.get().into());
        map.insert("cublas_workspace_bytes".into(), d.cublas_workspace_bytes.get().into());
        map.insert("capacity_bytes".into(), d.capacity_bytes.get().into());
        map.insert("headroom_bytes".into(), d.headroom_bytes.into());
        map.insert("fits".into(), d.fits.into());
    }
    out
}

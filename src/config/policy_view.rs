//! An environment's policy as people read it: the `policy` object of `/config` and
//! the policy lines of `specter check --explain`, from one description so both agree.
//!
//! Request header values set by the policy are never shown: they are often the
//! upstream's credentials. Response header values are (HSTS, CSP: public by nature).

use serde_json::{json, Map, Value};

use super::{HeaderRules, PolicyConfig};

pub fn to_json(p: &PolicyConfig) -> Value {
    let methods: Value = match &p.methods {
        Some(m) => m.iter().map(|m| m.as_str()).collect::<Vec<_>>().into(),
        None => "any".into(),
    };
    let allow_ips: Value = match &p.allow_ips {
        Some(nets) => nets
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .into(),
        None => "any".into(),
    };
    json!({
        "methods": methods,
        "allow_paths": p.allow_paths,
        "deny_paths": p.deny_paths,
        "allow_ips": allow_ips,
        "max_body": p.max_body.map(|b| bytesize::ByteSize(b).to_string()),
        "request_headers": rules(&p.request_headers, false),
        "response_headers": rules(&p.response_headers, true),
    })
}

fn rules(r: &HeaderRules, show_values: bool) -> Value {
    let set: Map<String, Value> = r
        .set
        .iter()
        .map(|(name, value)| {
            let shown = match (show_values, value.to_str()) {
                (true, Ok(v)) => v.to_owned(),
                _ => "(set; value not shown)".to_owned(),
            };
            (name.as_str().to_owned(), Value::String(shown))
        })
        .collect();
    let remove: Vec<&str> = r.remove.iter().map(|n| n.as_str()).collect();
    json!({"set": set, "remove": remove})
}

/// `  label : value` lines for `check --explain`.
pub fn explain_lines(p: &PolicyConfig) -> Vec<String> {
    let v = to_json(p);
    let list = |v: &Value| match v {
        Value::Array(items) if items.is_empty() => "none".to_owned(),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
            .join(", "),
        Value::String(s) => s.clone(),
        Value::Null => "none".to_owned(),
        other => other.to_string(),
    };
    let headers = |v: &Value| {
        let set: Vec<String> = v["set"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        let set = if set.is_empty() {
            "none".to_owned()
        } else {
            set.join("; ")
        };
        format!("set {set}; remove {}", list(&v["remove"]))
    };
    vec![
        format!("  methods   : {}", list(&v["methods"])),
        format!("  allow     : {}", list(&v["allow_paths"])),
        format!("  deny      : {}", list(&v["deny_paths"])),
        format!("  client IPs: {}", list(&v["allow_ips"])),
        format!(
            "  max body  : {}",
            v["max_body"].as_str().unwrap_or("no limit")
        ),
        format!("  request headers : {}", headers(&v["request_headers"])),
        format!("  response headers: {}", headers(&v["response_headers"])),
    ]
}

//! `[tracing]`: the sampling ratio and the OTLP collector URL.

use toml::Spanned;

use super::Validator;
use crate::config::file::RawTracing;
use crate::config::TracingConfig;

impl Validator<'_> {
    pub(super) fn tracing(&mut self, raw: Option<&Spanned<RawTracing>>) -> Option<TracingConfig> {
        let Some(raw) = raw else {
            return Some(TracingConfig::default());
        };
        let t = raw.get_ref();
        let sample_ratio = match &t.sample_ratio {
            None => Some(0.0),
            Some(v) => self.ratio(v),
        };
        let otlp = match &t.otlp {
            None => Some(None),
            Some(url) => self.otlp_url(url).map(Some),
        };
        Some(TracingConfig {
            sample_ratio: sample_ratio?,
            otlp: otlp?,
        })
    }

    fn ratio(&mut self, v: &Spanned<toml::Value>) -> Option<f64> {
        let ratio = match v.get_ref() {
            toml::Value::Float(f) => Some(*f),
            toml::Value::Integer(i) => Some(*i as f64),
            _ => None,
        };
        match ratio {
            Some(r) if (0.0..=1.0).contains(&r) => Some(r),
            _ => self.fail(
                v.span(),
                format!(
                    "tracing.sample_ratio: \"{}\" is not a ratio; write a number from 0.0 (sample none) to 1.0 (sample all), e.g. 0.01",
                    v.get_ref()
                ),
            ),
        }
    }

    fn otlp_url(&mut self, url: &Spanned<String>) -> Option<http::Uri> {
        let text = url.get_ref();
        let parsed = text.parse::<http::Uri>().ok().filter(|u| {
            u.scheme_str() == Some("http")
                && u.host().is_some_and(|h| !h.is_empty())
                && u.query().is_none()
        });
        match parsed {
            Some(u) => Some(u),
            None => self.fail(
                url.span(),
                format!("tracing.otlp: \"{text}\" is not an OTLP/HTTP collector URL; write e.g. \"http://127.0.0.1:4318\" (plain http, no query)"),
            ),
        }
    }
}

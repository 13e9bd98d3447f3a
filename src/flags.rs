//! Parsers of flag values, shared by every subcommand (no subcommand depends on the
//! command line module for them).

fn number(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_nan() {
        Err("must be a number".into())
    } else {
        Ok(v)
    }
}

fn finite(s: &str) -> Result<f64, String> {
    number(s).and_then(|v| if v.is_finite() { Ok(v) } else { Err("must be finite".into()) })
}

/// A finite number >= 0.
pub(crate) fn non_negative(s: &str) -> Result<f64, String> {
    finite(s).and_then(|v| if v >= 0.0 { Ok(v) } else { Err("must be >= 0".into()) })
}

/// A finite number > 0 (seconds, rates).
pub(crate) fn positive(s: &str) -> Result<f64, String> {
    finite(s).and_then(|v| if v > 0.0 { Ok(v) } else { Err("must be > 0".into()) })
}

/// A number > 0, or inf.
pub(crate) fn positive_or_inf(s: &str) -> Result<f64, String> {
    number(s).and_then(|v| if v > 0.0 { Ok(v) } else { Err("must be > 0 (or inf)".into()) })
}

/// A fraction in [0, 1].
pub(crate) fn fraction(s: &str) -> Result<f64, String> {
    finite(s).and_then(|v| if (0.0..=1.0).contains(&v) { Ok(v) } else { Err("must be between 0 and 1".into()) })
}

/// A ratio in [0, 1).
pub(crate) fn below_one(s: &str) -> Result<f64, String> {
    finite(s).and_then(|v| if (0.0..1.0).contains(&v) { Ok(v) } else { Err("must be in [0, 1)".into()) })
}

/// A finite number >= 1.
pub(crate) fn at_least_one(s: &str) -> Result<f64, String> {
    finite(s).and_then(|v| if v >= 1.0 { Ok(v) } else { Err("must be >= 1".into()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked() {
        assert!(positive("0").is_err() && positive("inf").is_err() && positive("0.5").is_ok());
        assert!(positive_or_inf("inf").is_ok() && positive_or_inf("-1").is_err() && positive_or_inf("nan").is_err());
        assert!(fraction("1").is_ok() && fraction("1.01").is_err());
        assert!(below_one("1").is_err() && below_one("0").is_ok());
        assert!(non_negative("-0.1").is_err() && at_least_one("0.9").is_err());
    }
}

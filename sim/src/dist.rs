//! Integer distributions for the load generator's workload flags
//! (`--max-tokens`, `--prompt-tokens`).
//!
//! Syntax: `none`, `fixed:N`, `lognormal:MEDIAN:SIGMA[:MAX]`, `uniform:MIN:MAX`.

use std::fmt;
use std::str::FromStr;

use crate::rng::Rng;

#[derive(Debug, Clone, PartialEq)]
pub enum Dist {
    /// No value: for `--max-tokens`, omit the field and let the server draw.
    None,
    Fixed(u64),
    LogNormal {
        median: f64,
        sigma: f64,
        max: Option<u64>,
    },
    Uniform {
        min: u64,
        max: u64,
    },
}

impl Dist {
    /// Draws a value, always at least 1; `None` for [`Dist::None`].
    pub fn sample(&self, rng: &mut Rng) -> Option<u64> {
        match *self {
            Dist::None => None,
            Dist::Fixed(n) => Some(n.max(1)),
            Dist::LogNormal { median, sigma, max } => {
                let x = rng.lognormal(median, sigma).round();
                let cap = max.unwrap_or(u32::MAX as u64).max(1);
                let v = if x.is_nan() || x < 1.0 {
                    1
                } else if x >= cap as f64 {
                    cap
                } else {
                    x as u64
                };
                Some(v)
            }
            Dist::Uniform { min, max } => Some(rng.range_inclusive(min, max).max(1)),
        }
    }

    pub fn is_none(&self) -> bool {
        matches!(self, Dist::None)
    }
}

impl fmt::Display for Dist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dist::None => write!(f, "none"),
            Dist::Fixed(n) => write!(f, "fixed:{n}"),
            Dist::LogNormal {
                median,
                sigma,
                max: None,
            } => write!(f, "lognormal:{median}:{sigma}"),
            Dist::LogNormal {
                median,
                sigma,
                max: Some(m),
            } => write!(f, "lognormal:{median}:{sigma}:{m}"),
            Dist::Uniform { min, max } => write!(f, "uniform:{min}:{max}"),
        }
    }
}

fn int(part: &str, what: &str) -> Result<u64, String> {
    let v: u64 = part
        .trim()
        .parse()
        .map_err(|_| format!("{what} must be a positive integer, got '{part}'"))?;
    if v == 0 {
        return Err(format!("{what} must be at least 1"));
    }
    Ok(v)
}

fn float(part: &str, what: &str) -> Result<f64, String> {
    let v: f64 = part
        .trim()
        .parse()
        .map_err(|_| format!("{what} must be a number, got '{part}'"))?;
    if !v.is_finite() {
        return Err(format!("{what} must be finite"));
    }
    Ok(v)
}

impl FromStr for Dist {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        let usage = "expected none, fixed:N, lognormal:MEDIAN:SIGMA[:MAX] or uniform:MIN:MAX";
        match parts.as_slice() {
            ["none"] => Ok(Dist::None),
            ["fixed", n] => Ok(Dist::Fixed(int(n, "fixed N")?)),
            ["lognormal", median, sigma] | ["lognormal", median, sigma, _] => {
                let median = float(median, "lognormal MEDIAN")?;
                let sigma = float(sigma, "lognormal SIGMA")?;
                if median <= 0.0 {
                    return Err("lognormal MEDIAN must be > 0".into());
                }
                if sigma < 0.0 {
                    return Err("lognormal SIGMA must be >= 0".into());
                }
                let max = match parts.get(3) {
                    Some(m) => Some(int(m, "lognormal MAX")?),
                    None => None,
                };
                Ok(Dist::LogNormal { median, sigma, max })
            }
            ["uniform", min, max] => {
                let min = int(min, "uniform MIN")?;
                let max = int(max, "uniform MAX")?;
                if max < min {
                    return Err(format!("uniform MAX ({max}) must be >= MIN ({min})"));
                }
                Ok(Dist::Uniform { min, max })
            }
            _ => Err(format!("invalid distribution '{s}': {usage}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_all_forms() {
        assert_eq!("none".parse::<Dist>().unwrap(), Dist::None);
        assert_eq!("fixed:64".parse::<Dist>().unwrap(), Dist::Fixed(64));
        assert_eq!(
            "lognormal:120:0.8".parse::<Dist>().unwrap(),
            Dist::LogNormal {
                median: 120.0,
                sigma: 0.8,
                max: None
            }
        );
        assert_eq!(
            "lognormal:120:0.8:1000".parse::<Dist>().unwrap(),
            Dist::LogNormal {
                median: 120.0,
                sigma: 0.8,
                max: Some(1000)
            }
        );
        assert_eq!(
            "uniform:3:9".parse::<Dist>().unwrap(),
            Dist::Uniform { min: 3, max: 9 }
        );
    }

    #[test]
    fn parse_errors() {
        for bad in [
            "",
            "fixed",
            "fixed:0",
            "fixed:-1",
            "fixed:x",
            "uniform:9:3",
            "uniform:1",
            "lognormal:0:1",
            "lognormal:10:-1",
            "lognormal:10",
            "zipf:1",
            "lognormal:1:1:1:1",
        ] {
            assert!(bad.parse::<Dist>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "none",
            "fixed:5",
            "lognormal:120:0.8",
            "lognormal:120:0.8:900",
            "uniform:1:10",
        ] {
            assert_eq!(s.parse::<Dist>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn samples_in_bounds() {
        let mut r = Rng::new(0);
        assert_eq!(Dist::None.sample(&mut r), None);
        assert_eq!(Dist::Fixed(7).sample(&mut r), Some(7));
        let u = Dist::Uniform { min: 2, max: 4 };
        let l = Dist::LogNormal {
            median: 100.0,
            sigma: 2.0,
            max: Some(150),
        };
        for _ in 0..1000 {
            let v = u.sample(&mut r).unwrap();
            assert!((2..=4).contains(&v));
            let v = l.sample(&mut r).unwrap();
            assert!((1..=150).contains(&v));
        }
    }
}

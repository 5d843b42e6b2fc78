//! The balloon's configuration: what `ebb --balloon` takes, what the VMM builds the
//! device from, and what `GET /balloon` reports (with the live target and interval).

use std::fmt;
use std::str::FromStr;

use crate::options::{parse_switch, split_options, switch_arg, ParseError};
use crate::units::{parse_size, size_arg, PAGE_SIZE};

/// Balloon device configuration (`--balloon size=...,deflate_on_oom=...,...`).
///
/// [`FromStr`] reads the `--balloon` syntax (a bare first item is the size); [`Display`]
/// prints every option back in that syntax, e.g.
/// `size=64M,deflate_on_oom=off,free_page_reporting=on,stats_interval=2`.
///
/// [`Display`]: fmt::Display
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Balloon target in bytes (a multiple of 4 KiB): the initial target on the command
    /// line, the current one in `GET /balloon`.
    pub size: u64,
    /// Let the guest take pages back from the balloon under memory pressure.
    pub deflate_on_oom: bool,
    /// Offer free page reporting.
    pub free_page_reporting: bool,
    /// Seconds between statistics requests; 0 disables the statistics queue.
    pub stats_interval_s: u32,
    /// Offer free page hinting (the host asks the guest for its free memory).
    pub free_page_hinting: bool,
    /// Back pages on the host before a guest that is short of memory gets them back
    /// from the balloon (default on; `deflate_prefault=off` leaves them to fault in).
    pub deflate_prefault: bool,
    /// The automatic balloon policy.
    pub policy: PolicyConfig,
}

/// The automatic balloon policy's options (`policy=auto|off`, `policy_headroom=SIZE`,
/// `policy_min=SIZE`, `policy_max=SIZE`, `policy_step=SIZE`, `policy_fault_rate=N` major
/// faults per second, `policy_cooldown=SECS`, `policy_trim=on|off`); a knob left out
/// takes the default for the guest's size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    /// The policy sets the balloon target (it can also be turned on at run time).
    pub auto: bool,
    /// Memory the guest keeps available beyond the balloon, bytes.
    pub headroom: Option<u64>,
    /// Smallest balloon the policy sets, bytes.
    pub min: Option<u64>,
    /// Largest balloon the policy sets, bytes.
    pub max: Option<u64>,
    /// Largest inflate per decision, bytes.
    pub step: Option<u64>,
    /// Major faults per second above which the guest counts as short of memory.
    pub fault_rate: Option<u64>,
    /// Seconds inflating waits after a deflate.
    pub cooldown_s: Option<u64>,
    /// Whether the policy trims a quiet guest's cache (default on).
    pub trim: Option<bool>,
}

/// The longest cooldown accepted: longer would leave a guest's balloon unmanaged.
pub const MAX_POLICY_COOLDOWN_S: u64 = 3600;

impl PolicyConfig {
    fn knobs(&self) -> [(&'static str, Option<u64>); 4] {
        [
            ("policy_headroom", self.headroom),
            ("policy_min", self.min),
            ("policy_max", self.max),
            ("policy_step", self.step),
        ]
    }
}

impl Default for BalloonConfig {
    fn default() -> Self {
        Self {
            size: 0,
            deflate_on_oom: false,
            free_page_reporting: true,
            stats_interval_s: 0,
            free_page_hinting: false,
            deflate_prefault: true,
            policy: PolicyConfig::default(),
        }
    }
}

impl FromStr for BalloonConfig {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, ParseError> {
        let (positional, pairs) = split_options(text)?;
        let mut cfg = BalloonConfig::default();
        if let Some(p) = positional {
            cfg.size = parse_size(p)?;
        }
        for (key, value) in pairs {
            match key {
                "size" => cfg.size = parse_size(value)?,
                "deflate_on_oom" => cfg.deflate_on_oom = parse_switch(key, value)?,
                "free_page_reporting" => cfg.free_page_reporting = parse_switch(key, value)?,
                "free_page_hinting" => cfg.free_page_hinting = parse_switch(key, value)?,
                "deflate_prefault" => cfg.deflate_prefault = parse_switch(key, value)?,
                "policy" => {
                    cfg.policy.auto = match value {
                        "auto" => true,
                        "off" => false,
                        _ => {
                            return Err(ParseError(format!(
                                "invalid policy '{value}': expected auto or off"
                            )))
                        }
                    }
                }
                "policy_headroom" => cfg.policy.headroom = Some(parse_size(value)?),
                "policy_trim" => cfg.policy.trim = Some(parse_switch(key, value)?),
                "policy_min" => cfg.policy.min = Some(parse_size(value)?),
                "policy_max" => cfg.policy.max = Some(parse_size(value)?),
                "policy_step" => cfg.policy.step = Some(parse_size(value)?),
                "policy_fault_rate" => {
                    cfg.policy.fault_rate = Some(value.parse().map_err(|_| {
                        ParseError(format!(
                            "invalid policy_fault_rate '{value}': expected major faults per \
                             second (a whole number)"
                        ))
                    })?)
                }
                "policy_cooldown" => {
                    let secs: u64 = value.parse().map_err(|_| {
                        ParseError(format!(
                            "invalid policy_cooldown '{value}': expected whole seconds"
                        ))
                    })?;
                    if secs > MAX_POLICY_COOLDOWN_S {
                        return Err(ParseError(format!(
                            "policy_cooldown {secs} s is above {MAX_POLICY_COOLDOWN_S} s"
                        )));
                    }
                    cfg.policy.cooldown_s = Some(secs);
                }
                "stats_interval" => {
                    cfg.stats_interval_s = value.parse().map_err(|_| {
                        ParseError(format!(
                            "invalid stats_interval '{value}': expected whole seconds"
                        ))
                    })?
                }
                _ => {
                    return Err(ParseError(format!(
                        "unknown balloon option '{key}' (known: size, deflate_on_oom, \
                         free_page_reporting, stats_interval, free_page_hinting, \
                         deflate_prefault, policy, policy_headroom, policy_min, policy_max, \
                         policy_step, policy_fault_rate, policy_cooldown, policy_trim)"
                    )))
                }
            }
        }
        if cfg.size % PAGE_SIZE != 0 {
            return Err(ParseError(format!(
                "balloon size {} bytes is not a multiple of 4 KiB",
                cfg.size
            )));
        }
        if cfg.policy.auto && cfg.stats_interval_s == 0 {
            return Err(ParseError(
                "policy=auto decides from the guest's statistics: add stats_interval=SECS \
                 (1 or 2 is usual)"
                    .into(),
            ));
        }
        if let (Some(min), Some(max)) = (cfg.policy.min, cfg.policy.max) {
            if min > max {
                return Err(ParseError(format!(
                    "policy_min {} is above policy_max {}",
                    size_arg(min),
                    size_arg(max)
                )));
            }
        }
        Ok(cfg)
    }
}

impl fmt::Display for BalloonConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "size={},deflate_on_oom={},free_page_reporting={},stats_interval={},\
             free_page_hinting={}",
            size_arg(self.size),
            switch_arg(self.deflate_on_oom),
            switch_arg(self.free_page_reporting),
            self.stats_interval_s,
            switch_arg(self.free_page_hinting)
        )?;
        if !self.deflate_prefault {
            write!(f, ",deflate_prefault=off")?;
        }
        if self.policy.auto {
            write!(f, ",policy=auto")?;
        }
        for (name, value) in self.policy.knobs() {
            if let Some(v) = value {
                write!(f, ",{name}={}", size_arg(v))?;
            }
        }
        if let Some(rate) = self.policy.fault_rate {
            write!(f, ",policy_fault_rate={rate}")?;
        }
        if let Some(secs) = self.policy.cooldown_s {
            write!(f, ",policy_cooldown={secs}")?;
        }
        if let Some(trim) = self.policy.trim {
            write!(f, ",policy_trim={}", switch_arg(trim))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::{GIB, MIB};

    #[test]
    fn parses_the_command_line_syntax() {
        let b: BalloonConfig =
            "size=256M,deflate_on_oom=on,free_page_reporting=off,stats_interval=2,\
             free_page_hinting=on"
                .parse()
                .unwrap();
        assert_eq!(
            b,
            BalloonConfig {
                size: 256 * MIB,
                deflate_on_oom: true,
                free_page_reporting: false,
                stats_interval_s: 2,
                free_page_hinting: true,
                deflate_prefault: true,
                policy: PolicyConfig::default(),
            }
        );
        let off: BalloonConfig = "size=0,deflate_prefault=off".parse().unwrap();
        assert!(!off.deflate_prefault);
        assert!(off.to_string().ends_with(",deflate_prefault=off"), "{off}");
        assert_eq!(off.to_string().parse::<BalloonConfig>().unwrap(), off);
        let d: BalloonConfig = "size=0".parse().unwrap();
        assert!(d.free_page_reporting, "reporting defaults on");
        assert!(!d.free_page_hinting, "hinting defaults off");
        assert_eq!(d, BalloonConfig::default());
        assert_eq!("1G".parse::<BalloonConfig>().unwrap().size, GIB);
        assert!("size=1G,".parse::<BalloonConfig>().is_err());
        assert!("size=1G,deflate_on_oom".parse::<BalloonConfig>().is_err());
    }

    #[test]
    fn errors_name_the_offending_text() {
        for (bad, message) in [
            (
                "size=1G,bogus=1",
                "unknown balloon option 'bogus' (known: size, deflate_on_oom, \
                 free_page_reporting, stats_interval, free_page_hinting, deflate_prefault, \
                 policy, policy_headroom, policy_min, policy_max, policy_step, \
                 policy_fault_rate, policy_cooldown, policy_trim)",
            ),
            (
                "stats_interval=-1",
                "invalid stats_interval '-1': expected whole seconds",
            ),
            (
                "deflate_on_oom=maybe",
                "invalid value 'maybe' for deflate_on_oom: expected on or off",
            ),
            (
                "size=1000",
                "balloon size 1000 bytes is not a multiple of 4 KiB",
            ),
            (
                "size=lots",
                "invalid size 'lots': unknown unit 'lots' (use K, M, G or T)",
            ),
            (
                "policy=auto",
                "policy=auto decides from the guest's statistics: add stats_interval=SECS \
                 (1 or 2 is usual)",
            ),
            ("policy=on", "invalid policy 'on': expected auto or off"),
            (
                "stats_interval=1,policy_min=2G,policy_max=1G",
                "policy_min 2G is above policy_max 1G",
            ),
            (
                "policy_fault_rate=many",
                "invalid policy_fault_rate 'many': expected major faults per second (a whole \
                 number)",
            ),
            (
                "policy_cooldown=1.5",
                "invalid policy_cooldown '1.5': expected whole seconds",
            ),
            (
                "policy_cooldown=3601",
                "policy_cooldown 3601 s is above 3600 s",
            ),
        ] {
            assert_eq!(
                bad.parse::<BalloonConfig>().unwrap_err().to_string(),
                message
            );
        }
    }

    #[test]
    fn display_is_the_command_line_syntax_and_reads_back() {
        let b = BalloonConfig {
            size: 64 * MIB,
            deflate_on_oom: false,
            free_page_reporting: true,
            stats_interval_s: 2,
            free_page_hinting: false,
            deflate_prefault: true,
            policy: PolicyConfig::default(),
        };
        assert_eq!(
            b.to_string(),
            "size=64M,deflate_on_oom=off,free_page_reporting=on,stats_interval=2,\
             free_page_hinting=off"
        );
        for cfg in [
            b,
            BalloonConfig::default(),
            BalloonConfig {
                size: 3 * GIB / 2,
                deflate_on_oom: true,
                free_page_reporting: false,
                stats_interval_s: 0,
                free_page_hinting: true,
                deflate_prefault: false,
                policy: PolicyConfig::default(),
            },
            "stats_interval=1,policy=auto,policy_headroom=512M,policy_step=64M"
                .parse()
                .unwrap(),
            "stats_interval=1,policy=auto,policy_fault_rate=50,policy_cooldown=5"
                .parse()
                .unwrap(),
            "stats_interval=1,policy=auto,policy_trim=off"
                .parse()
                .unwrap(),
        ] {
            assert_eq!(cfg.to_string().parse::<BalloonConfig>().unwrap(), cfg);
        }
    }
}

//! The PC CMOS: an MC146818-style real-time clock plus battery-backed RAM at ports
//! 0x70 (index) and 0x71 (data).
//!
//! Without it, Linux's rtc-cmos driver reads 0xff from an empty port, sees "update in
//! progress" forever and spins for tens of seconds at boot. The clock reads the host's
//! UTC time; a guest setting the clock changes an offset, not the host.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

/// Index port.
pub const CMOS_PORT: u16 = 0x70;
/// Ports used (index and data).
pub const CMOS_PORT_LEN: u16 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Register A: 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) always clear.
const REG_A_DEFAULT: u8 = 0x26;
/// Register B: 24-hour mode, BCD (DM bit clear).
const REG_B_24H: u8 = 0x02;
const REG_B_BINARY: u8 = 0x04;
const REG_B_SET: u8 = 0x80;
/// Register D: valid RAM and time (battery good).
const REG_D_VRT: u8 = 0x80;

/// The CMOS device.
#[derive(Debug)]
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    /// Seconds added to host time (the guest set its clock).
    offset_s: i64,
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

/// A calendar date and time in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    weekday: u32, // 1 = Sunday
}

/// Days since 1970-01-01 to a civil date (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A civil date to days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn datetime(unix: i64) -> DateTime {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400) as u32;
    let (year, month, day) = civil_from_days(days);
    DateTime {
        year,
        month,
        day,
        hour: secs / 3600,
        minute: secs / 60 % 60,
        second: secs % 60,
        weekday: ((days + 4).rem_euclid(7) + 1) as u32, // 1970-01-01 was a Thursday
    }
}

fn to_bcd(v: u32) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

fn from_bcd(v: u8) -> u32 {
    u32::from(v >> 4) * 10 + u32::from(v & 0xf)
}

impl Cmos {
    /// A CMOS with the clock at host time.
    pub fn new() -> Self {
        let mut ram = [0u8; 128];
        ram[usize::from(REG_A)] = REG_A_DEFAULT;
        ram[usize::from(REG_B)] = REG_B_24H;
        ram[usize::from(REG_D)] = REG_D_VRT;
        Self {
            index: 0,
            ram,
            offset_s: 0,
        }
    }

    fn now(&self) -> i64 {
        let host = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        host + self.offset_s
    }

    fn encode(&self, v: u32) -> u8 {
        if self.ram[usize::from(REG_B)] & REG_B_BINARY != 0 {
            v as u8
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.ram[usize::from(REG_B)] & REG_B_BINARY != 0 {
            u32::from(v)
        } else {
            from_bcd(v)
        }
    }

    fn read_register(&mut self, reg: u8) -> u8 {
        let t = datetime(self.now());
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode(t.hour),
            REG_WEEKDAY => self.encode(t.weekday),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode(t.year.rem_euclid(100) as u32),
            REG_CENTURY => self.encode(t.year.div_euclid(100).clamp(0, 99) as u32),
            REG_A => self.ram[usize::from(REG_A)] & 0x7f,
            // Reading C clears pending interrupt flags; none are ever raised.
            REG_C => 0,
            REG_D => REG_D_VRT,
            r => self.ram[usize::from(r & 0x7f)],
        }
    }

    /// The time the guest wrote into the clock registers, as a Unix time.
    fn written_time(&self) -> Option<i64> {
        let r = |reg: u8| self.decode(self.ram[usize::from(reg)]);
        let year = i64::from(r(REG_CENTURY)) * 100 + i64::from(r(REG_YEAR));
        let (month, day) = (r(REG_MONTH), r(REG_DAY));
        let (hour, minute, second) = (r(REG_HOURS), r(REG_MINUTES), r(REG_SECONDS));
        if !(1..=12).contains(&month)
            || !(1..=31).contains(&day)
            || hour > 23
            || minute > 59
            || second > 59
        {
            return None;
        }
        Some(
            days_from_civil(year, month, day) * 86_400
                + i64::from(hour) * 3600
                + i64::from(minute) * 60
                + i64::from(second),
        )
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        match reg {
            REG_A => self.ram[usize::from(REG_A)] = value & 0x7f,
            REG_B => {
                let was_set = self.ram[usize::from(REG_B)] & REG_B_SET != 0;
                if value & REG_B_SET != 0 && !was_set {
                    // Entering SET mode: freeze the current time into the registers so a
                    // partial update keeps the other fields.
                    let t = datetime(self.now());
                    let fields = [
                        (REG_SECONDS, t.second),
                        (REG_MINUTES, t.minute),
                        (REG_HOURS, t.hour),
                        (REG_DAY, t.day),
                        (REG_MONTH, t.month),
                        (REG_YEAR, t.year.rem_euclid(100) as u32),
                        (REG_CENTURY, t.year.div_euclid(100).clamp(0, 99) as u32),
                    ];
                    self.ram[usize::from(REG_B)] = value;
                    for (reg, v) in fields {
                        self.ram[usize::from(reg)] = self.encode(v);
                    }
                } else {
                    self.ram[usize::from(REG_B)] = value;
                }
                if was_set && value & REG_B_SET == 0 {
                    if let Some(t) = self.written_time() {
                        let host = self.now() - self.offset_s;
                        self.offset_s = t - host;
                    }
                }
            }
            REG_C | REG_D => {}
            r => self.ram[usize::from(r & 0x7f)] = value,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = match offset {
            0 => self.index,
            _ => {
                // Time registers read while SET is held return what the guest wrote.
                let set = self.ram[usize::from(REG_B)] & REG_B_SET != 0;
                if set && (self.index <= REG_YEAR || self.index == REG_CENTURY) {
                    self.ram[usize::from(self.index)]
                } else {
                    self.read_register(self.index)
                }
            }
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask on real hardware.
            0 => self.index = value & 0x7f,
            _ => self.write_register(self.index, value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg | 0x80]);
        let mut d = [0u8];
        c.read(1, &mut d);
        d[0]
    }

    fn write(c: &mut Cmos, reg: u8, v: u8) {
        c.write(0, &[reg]);
        c.write(1, &[v]);
    }

    #[test]
    fn calendar_conversions() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        for d in [-1000, 0, 365, 10_957, 20_000, 60_000] {
            let (y, m, day) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, day), d);
        }
        let t = datetime(1_795_434_856); // 2026-11-23T11:54:16Z, a Monday
        assert_eq!((t.year, t.month, t.day), (2026, 11, 23));
        assert_eq!((t.hour, t.minute, t.second), (11, 54, 16));
        assert_eq!(t.weekday, 2);
    }

    #[test]
    fn status_registers_say_the_clock_is_usable() {
        let mut c = Cmos::new();
        assert_eq!(read(&mut c, REG_A) & 0x80, 0, "never update-in-progress");
        assert_eq!(read(&mut c, REG_D), REG_D_VRT);
        assert_eq!(read(&mut c, REG_B), REG_B_24H);
    }

    #[test]
    fn time_reads_match_the_host_in_bcd_and_binary() {
        let mut c = Cmos::new();
        let year = from_bcd(read(&mut c, REG_YEAR));
        let century = from_bcd(read(&mut c, REG_CENTURY));
        let host = datetime(c.now());
        assert_eq!(i64::from(century * 100 + year), host.year);
        write(&mut c, REG_B, REG_B_24H | REG_B_BINARY);
        assert_eq!(
            i64::from(read(&mut c, REG_CENTURY)) * 100 + i64::from(read(&mut c, REG_YEAR)),
            host.year
        );
        assert!(u32::from(read(&mut c, REG_MONTH)) == host.month);
    }

    #[test]
    fn setting_the_clock_moves_an_offset() {
        let mut c = Cmos::new();
        write(&mut c, REG_B, REG_B_24H | REG_B_SET);
        write(&mut c, REG_YEAR, to_bcd(99));
        write(&mut c, REG_CENTURY, to_bcd(19));
        write(&mut c, REG_MONTH, to_bcd(12));
        write(&mut c, REG_DAY, to_bcd(31));
        write(&mut c, REG_B, REG_B_24H);
        assert_eq!(from_bcd(read(&mut c, REG_YEAR)), 99);
        assert_eq!(from_bcd(read(&mut c, REG_CENTURY)), 19);
        assert_eq!(from_bcd(read(&mut c, REG_MONTH)), 12);
    }

    #[test]
    fn nvram_bytes_are_kept() {
        let mut c = Cmos::new();
        write(&mut c, 0x40, 0x5a);
        assert_eq!(read(&mut c, 0x40), 0x5a);
        write(&mut c, REG_C, 0xff);
        assert_eq!(read(&mut c, REG_C), 0);
    }
}

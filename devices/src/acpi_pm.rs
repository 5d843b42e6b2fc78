//! ACPI power management for a hardware-reduced platform: the FADT's sleep control,
//! sleep status and reset registers, all in one small port I/O block.
//!
//! Linux powers off by writing `SLP_TYP << 2 | SLP_EN` to the sleep control register
//! (with SLP_TYP taken from the DSDT's `_S5_` package) and resets by writing the FADT's
//! reset value to the reset register.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitSignal, VmExit};

/// First I/O port of the block.
pub const PM_PORT_BASE: u16 = 0x600;
/// Ports in the block.
pub const PM_PORT_LEN: u16 = 3;
/// Offset of the sleep control register (write-only).
pub const SLEEP_CONTROL_OFFSET: u16 = 0;
/// Offset of the sleep status register (read-only).
pub const SLEEP_STATUS_OFFSET: u16 = 1;
/// Offset of the reset register.
pub const RESET_OFFSET: u16 = 2;
/// The value the FADT tells the guest to write to the reset register.
pub const RESET_VALUE: u8 = 0x01;
/// The SLP_TYP value the DSDT's `_S5_` package advertises for soft-off.
pub const S5_SLEEP_TYPE: u8 = 5;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;
/// WAK_STS: reported set so a guest polling for wake-up after a sleep request moves on.
const WAK_STS: u8 = 1 << 7;

/// The power management register block.
#[derive(Debug)]
pub struct AcpiPm {
    exit: Arc<ExitSignal>,
}

impl AcpiPm {
    /// A register block that reports power-off and reset through `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == u64::from(SLEEP_STATUS_OFFSET) {
            data[0] = WAK_STS;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        tracing::debug!("ACPI PM register {offset} <- {value:#x}");
        match offset {
            o if o == u64::from(SLEEP_CONTROL_OFFSET) => {
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if value & SLP_EN != 0 {
                    if sleep_type == S5_SLEEP_TYPE {
                        self.exit.request(VmExit::PowerOff);
                    } else {
                        crate::faults::record(crate::faults::GuestFault::SleepType, || {
                            format!("ACPI: unsupported sleep type {sleep_type}")
                        });
                    }
                }
            }
            o if o == u64::from(RESET_OFFSET) && value == RESET_VALUE => {
                self.exit.request(VmExit::Reset);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_slp_en_powers_off() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut pm = AcpiPm::new(exit.clone());
        // SLP_TYP without SLP_EN does nothing.
        pm.write(0, &[S5_SLEEP_TYPE << 2]);
        assert!(!exit.is_requested());
        // Another sleep state is refused.
        pm.write(0, &[(3 << 2) | SLP_EN]);
        assert!(!exit.is_requested());
        pm.write(0, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(exit.reason(), Some(VmExit::PowerOff));
    }

    /// A guest writing an unsupported sleep type in a loop is counted every time but
    /// logged only a few times.
    #[test]
    fn a_flood_of_bad_sleep_requests_is_counted_not_logged_each_time() {
        use crate::faults::{self, GuestFault, LOGGED_AT_ONCE};
        use std::io::Write;
        use std::sync::Mutex;

        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Lines::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::WARN)
            .finish();
        let total = |k| {
            faults::totals()
                .into_iter()
                .find(|&(kind, _)| kind == k)
                .unwrap()
                .1
        };
        let before = total(GuestFault::SleepType);
        tracing::subscriber::with_default(subscriber, || {
            let exit = Arc::new(ExitSignal::new().unwrap());
            let mut pm = AcpiPm::new(exit.clone());
            for _ in 0..1000 {
                pm.write(0, &[(3 << 2) | SLP_EN]);
            }
            assert!(!exit.is_requested());
        });
        assert!(total(GuestFault::SleepType) >= before + 1000);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines = text.lines().filter(|l| l.contains("sleep type")).count();
        assert!(
            (1..=LOGGED_AT_ONCE as usize).contains(&lines),
            "{lines} lines:\n{text}"
        );
    }

    #[test]
    fn reset_register_resets_only_with_its_value() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut pm = AcpiPm::new(exit.clone());
        pm.write(2, &[0x06]);
        assert!(!exit.is_requested());
        pm.write(2, &[RESET_VALUE]);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
    }

    #[test]
    fn status_reads_wake_and_empty_writes_are_ignored() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut pm = AcpiPm::new(exit.clone());
        let mut data = [0xffu8; 1];
        pm.read(1, &mut data);
        assert_eq!(data[0], WAK_STS);
        pm.read(0, &mut data);
        assert_eq!(data[0], 0);
        pm.write(0, &[]);
        assert!(!exit.is_requested());
    }
}

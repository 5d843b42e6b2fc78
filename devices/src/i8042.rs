//! The i8042 controller, present only so that the classic "pulse the CPU reset line"
//! reboot (port 0x64, command 0xfe) ends the VM.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::exit::{ExitSignal, VmExit};

/// Data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// Command/status port.
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// Turns the controller's reset trigger into a VM reset request.
#[derive(Debug)]
pub struct ResetTrigger(Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(VmExit::Reset);
        Ok(())
    }
}

/// An i8042 at one port: the bus maps 0x60 and 0x64 to two instances so offsets match
/// vm-superio's convention (0 = data, 4 = command).
#[derive(Debug)]
pub struct I8042 {
    inner: I8042Device<ResetTrigger>,
    register_offset: u8,
}

impl I8042 {
    /// A controller for `port` (0x60 or 0x64).
    pub fn new(exit: Arc<ExitSignal>, port: u16) -> Self {
        Self {
            inner: I8042Device::new(ResetTrigger(exit)),
            register_offset: (port - I8042_DATA_PORT) as u8,
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.inner.read(self.register_offset);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            tracing::debug!("i8042 register {} <- {value:#x}", self.register_offset);
            let Ok(()) = self.inner.write(self.register_offset, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_on_command_port_resets() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut data_port = I8042::new(exit.clone(), I8042_DATA_PORT);
        data_port.write(0, &[0xfe]);
        assert!(!exit.is_requested());
        let mut cmd_port = I8042::new(exit.clone(), I8042_COMMAND_PORT);
        cmd_port.write(0, &[0xfe]);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
    }
}

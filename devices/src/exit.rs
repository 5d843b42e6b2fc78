//! How devices and vCPUs ask the VMM to stop the VM.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Why the VM stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, i8042, KVM system event).
    Reset,
    /// A vCPU hit something it cannot continue from (triple fault, entry failure...).
    Crash(String),
    /// The host asked Ebb to stop (signal, API stop request).
    Stopped(String),
}

/// A one-shot "stop the VM" request shared by vCPU threads, devices and the event loop.
/// The first request wins; later ones are ignored so the reported reason is the cause,
/// not a consequence.
#[derive(Debug)]
pub struct ExitSignal {
    reason: Mutex<Option<VmExit>>,
    event: EventFd,
}

impl ExitSignal {
    /// Creates the signal with its eventfd (readable once a request is made).
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            event: crate::new_eventfd()?,
        })
    }

    /// Requests the VM to stop; returns false if a request was already made.
    pub fn request(&self, exit: VmExit) -> bool {
        let mut reason = crate::bus::lock(&self.reason);
        if reason.is_some() {
            return false;
        }
        *reason = Some(exit);
        // An eventfd write fails only if the counter would overflow, which a single
        // write per VM lifetime cannot do.
        let _ = self.event.write(1);
        true
    }

    /// The first request made, if any.
    pub fn reason(&self) -> Option<VmExit> {
        crate::bus::lock(&self.reason).clone()
    }

    /// True once a stop was requested.
    pub fn is_requested(&self) -> bool {
        crate::bus::lock(&self.reason).is_some()
    }

    /// The eventfd to poll for requests.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins() {
        let s = ExitSignal::new().unwrap();
        assert!(!s.is_requested());
        assert!(s.request(VmExit::PowerOff));
        assert!(!s.request(VmExit::Crash("late".into())));
        assert_eq!(s.reason(), Some(VmExit::PowerOff));
        assert_eq!(s.event().read().unwrap(), 1);
    }
}

//! Ebb: a virtual machine monitor built on the rust-vmm crates that boots stock Linux
//! guests and gives their free memory back to the host.
//!
//! Module map: [`config`] and [`cli`] say what to run; [`host`] checks the KVM;
//! [`memory`] and [`layout`] place guest RAM; [`boot`], [`acpi`] and [`cpu`] prepare the
//! guest's first instruction; [`vm`] wires devices and runs the vCPUs ([`vcpu`]) and the
//! event loop ([`console`], [`signals`]); [`api`] serves the REST API on a Unix socket;
//! [`pressure`] reads the host's memory pressure for the balloon policy.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod cli;
pub mod config;
pub mod console;
pub mod cpu;
pub mod host;
pub mod layout;
pub mod memory;
pub mod pressure;
pub mod seccomp;
pub mod signals;
pub mod vcpu;
pub mod vm;

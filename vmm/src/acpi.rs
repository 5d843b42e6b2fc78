//! ACPI tables for a hardware-reduced x86 platform: RSDP -> XSDT -> FADT (-> DSDT) and MADT.
//!
//! The DSDT describes each virtio-mmio device as `LNRO0005`, which is how a stock distro
//! kernel (built without `VIRTIO_MMIO_CMDLINE_DEVICES`) finds them, and carries the `_S5_`
//! package that makes ACPI power-off work through the FADT's sleep control register.
//! With a Generic Event Device (`ACPI0013`) it also describes a power button (`PNP0C0C`)
//! the host can press: the GED's `_EVT` method notifies the button with 0x80.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{sdt::Sdt, Aml};
use ebb_devices::{acpi_pm, cmos, ged, serial};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

const OEM_ID: [u8; 6] = *b"EBBVMM";
const OEM_TABLE_ID: [u8; 8] = *b"EBB     ";
const OEM_REVISION: u32 = 1;

/// A virtio-mmio device as the guest should see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Guest physical base of the register window.
    pub base: u64,
    /// Window size.
    pub size: u64,
    /// GSI (IOAPIC pin).
    pub irq: u32,
}

/// The Generic Event Device as the guest should see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GedInfo {
    /// Guest physical address of the event register.
    pub base: u64,
    /// GSI (IOAPIC pin).
    pub irq: u32,
}

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit the reserved area.
    #[error("ACPI tables need {needed} bytes but only {available} are reserved")]
    TooLarge {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// Guest memory write failed.
    #[error("writing ACPI tables: {0}")]
    Write(String),
}

/// The DSDT body: `_S5_`, the legacy devices, one `LNRO0005` device per virtio-mmio
/// window, and the GED with its power button when there is one.
pub fn dsdt(devices: &[MmioDeviceInfo], ged: Option<GedInfo>) -> Vec<u8> {
    let mut table = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    // SLP_TYPa, SLP_TYPb, reserved, reserved.
    let s5_type = acpi_pm::S5_SLEEP_TYPE;
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&s5_type, &s5_type, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);

    let mut device_aml = Vec::new();
    legacy_devices_aml(&mut device_aml);
    for (i, dev) in devices.iter().enumerate() {
        let name = format!("V{i:03X}");
        let hid: &'static str = "LNRO0005";
        let uid = i as u32;
        let window = aml::Memory32Fixed::new(true, dev.base as u32, dev.size as u32);
        // Edge-triggered, active high, exclusive: an irqfd injects an edge per event.
        let irq = aml::Interrupt::new(true, true, false, false, dev.irq);
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &hid),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![&window, &irq]),
                ),
            ],
        )
        .to_aml_bytes(&mut device_aml);
    }
    if let Some(ged) = ged {
        ged_aml(ged, &mut device_aml);
    }
    let children = RawAml(device_aml);
    aml::Scope::new("\\_SB_".into(), vec![&children]).to_aml_bytes(&mut body);
    table.append_slice(&body);
    table.as_slice().to_vec()
}

/// COM1 and the CMOS clock as ACPI devices.
///
/// A hardware-reduced ACPI platform has no legacy PIC as far as Linux is concerned, so
/// ISA interrupts are not mapped by number: a device only gets its interrupt when ACPI
/// describes it (PNP0501 makes the 8250 driver route IRQ 4 through the IOAPIC).
fn legacy_devices_aml(sink: &mut Vec<u8>) {
    let com1_io = aml::IO::new(
        serial::COM1_PORT,
        serial::COM1_PORT,
        1,
        serial::COM1_PORT_LEN as u8,
    );
    let com1_irq = aml::Interrupt::new(true, true, false, false, serial::COM1_IRQ);
    aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]),
            ),
        ],
    )
    .to_aml_bytes(sink);
    // The CMOS clock raises no interrupts, so it is described without one.
    let rtc_io = aml::IO::new(
        cmos::CMOS_PORT,
        cmos::CMOS_PORT,
        1,
        cmos::CMOS_PORT_LEN as u8,
    );
    aml::Device::new(
        "RTC_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00")),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&rtc_io])),
        ],
    )
    .to_aml_bytes(sink);
}

/// The Generic Event Device and the power button it notifies.
///
/// `_EVT` reads the event register (which clears it) and sends `Notify (PWRB, 0x80)`
/// ("button pressed") when the power button bit is set.
fn ged_aml(info: GedInfo, sink: &mut Vec<u8>) {
    let irq = aml::Interrupt::new(true, true, false, false, info.irq);
    let base = info.base as u32;
    let len = ged::GED_REGISTER_LEN as u32;
    let power_button = ged::GED_EVENT_POWER_BUTTON;
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let events = aml::Path::new("GDAT");
    aml::Device::new(
        "GED0".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq])),
            &aml::OpRegion::new("GDST".into(), aml::OpRegionSpace::SystemMemory, &base, &len),
            &aml::Field::new(
                "GDST".into(),
                aml::FieldAccessType::DWord,
                aml::FieldLockRule::NoLock,
                aml::FieldUpdateRule::WriteAsZeroes,
                vec![aml::FieldEntry::Named(*b"GDAT", 32)],
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &aml::Store::new(&aml::Local(0), &events),
                    &aml::If::new(
                        &aml::And::new(&aml::ZERO, &aml::Local(0), &power_button),
                        vec![&aml::Notify::new(&pwrb, &0x80u8)],
                    ),
                ],
            ),
        ],
    )
    .to_aml_bytes(sink);
    aml::Device::new(
        "PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(sink);
}

/// Pre-encoded AML to nest inside a builder.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let pm = |offset: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(acpi_pm::PM_PORT_BASE + offset),
        )
    };
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // Power button, if any, is a control-method device, not a fixed feature.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    builder.sleep_control_reg = pm(acpi_pm::SLEEP_CONTROL_OFFSET);
    builder.sleep_status_reg = pm(acpi_pm::SLEEP_STATUS_OFFSET);
    builder.reset_reg = pm(acpi_pm::RESET_OFFSET);
    builder.reset_value = acpi_pm::RESET_VALUE;
    let mut bytes = Vec::new();
    builder.finalize().to_aml_bytes(&mut bytes);
    bytes
}

fn madt(cpus: u32) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_START as u32),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(
            id as u8,
            id as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_START as u32, 0));
    let mut bytes = Vec::new();
    madt.to_aml_bytes(&mut bytes);
    bytes
}

fn align16(v: u64) -> u64 {
    (v + 15) & !15
}

/// Writes all tables into the reserved ACPI area and returns the RSDP's address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    cpus: u32,
    devices: &[MmioDeviceInfo],
    ged: Option<GedInfo>,
) -> Result<u64, AcpiError> {
    let rsdp_addr = layout::ACPI_START;
    let mut cursor = align16(rsdp_addr + Rsdp::len() as u64);
    let mut place = |bytes: &[u8]| -> Result<u64, AcpiError> {
        let addr = cursor;
        let end = addr + bytes.len() as u64;
        if end > layout::RESET_VECTOR {
            return Err(AcpiError::TooLarge {
                needed: end - layout::ACPI_START,
                available: layout::RESET_VECTOR - layout::ACPI_START,
            });
        }
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| AcpiError::Write(e.to_string()))?;
        cursor = align16(end);
        Ok(addr)
    };

    let dsdt_addr = place(&dsdt(devices, ged))?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(&madt(cpus))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = place(&xsdt_bytes)?;

    let mut rsdp_bytes = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp_bytes);
    mem.write_slice(&rsdp_bytes, GuestAddress(rsdp_addr))
        .map_err(|e| AcpiError::Write(e.to_string()))?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn table_at(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut buf = vec![0u8; len as usize];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn devices() -> Vec<MmioDeviceInfo> {
        vec![
            MmioDeviceInfo {
                base: 0xd000_0000,
                size: 0x1000,
                irq: 5,
            },
            MmioDeviceInfo {
                base: 0xd000_1000,
                size: 0x1000,
                irq: 6,
            },
        ]
    }

    #[test]
    fn tables_chain_and_checksum() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let rsdp = write_tables(&mem, 2, &devices(), Some(ged())).unwrap();
        assert_eq!(rsdp, layout::ACPI_START);
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&r), 0, "RSDP extended checksum");
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let xsdt = table_at(&mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(&xsdt), 0);
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries.len(), 2);
        let fadt = table_at(&mem, entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(sum(&fadt), 0);
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // X_DSDT at offset 140.
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&mem, dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(sum(&dsdt), 0);
        // Sleep control register: system I/O at the PM block.
        assert_eq!(fadt[244], 1, "sleep control in I/O space");
        assert_eq!(
            u64::from_le_bytes(fadt[248..256].try_into().unwrap()),
            0x600
        );
        let madt = table_at(&mem, entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(sum(&madt), 0);
        // Header (44) + 2 local APICs (8 each) + 1 IOAPIC (12).
        assert_eq!(madt.len(), 44 + 16 + 12);
        assert!(mem.last_addr().0 > layout::ACPI_END);
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    fn ged() -> GedInfo {
        GedInfo {
            base: layout::GED_MMIO_START,
            irq: 7,
        }
    }

    #[test]
    fn dsdt_describes_the_ged_and_power_button() {
        let d = dsdt(&devices(), Some(ged()));
        assert!(find(&d, b"ACPI0013").is_some());
        assert!(find(&d, b"GED0").is_some() && find(&d, b"_EVT").is_some());
        // PNP0C0C as a compressed EISA id.
        assert!(find(&d, &[0x0c, 0x41, 0xd0, 0x0c, 0x0c]).is_some());
        // The GED's interrupt: GSI 7, edge, active high.
        let irq = [0x89, 0x06, 0x00, 0x03, 0x01, 0x07, 0x00, 0x00, 0x00];
        assert!(find(&d, &irq).is_some());
        assert!(find(&dsdt(&devices(), None), b"ACPI0013").is_none());
    }

    #[test]
    fn dsdt_describes_virtio_mmio_devices() {
        let d = dsdt(&devices(), None);
        // Two devices with the virtio-mmio HID.
        assert_eq!(d.windows(8).filter(|w| w == b"LNRO0005").count(), 2);
        assert!(find(&d, b"V000").is_some() && find(&d, b"V001").is_some());
        assert!(find(&d, b"_S5_").is_some());
        // Memory32Fixed descriptor: tag 0x86, length 9, RW, base, size.
        let mut mem32 = vec![0x86, 0x09, 0x00, 0x01];
        mem32.extend_from_slice(&0xd000_1000u32.to_le_bytes());
        mem32.extend_from_slice(&0x1000u32.to_le_bytes());
        assert!(find(&d, &mem32).is_some(), "memory window of device 1");
        // Extended interrupt descriptor: tag 0x89, length 6, consumer+edge, one IRQ: 6.
        let irq = [0x89, 0x06, 0x00, 0x03, 0x01, 0x06, 0x00, 0x00, 0x00];
        assert!(find(&d, &irq).is_some(), "interrupt of device 1");
        // No virtio devices: still COM1, the clock and _S5_.
        let empty = dsdt(&[], None);
        assert!(find(&empty, b"LNRO").is_none());
        assert!(find(&empty, b"_S5_").is_some());
        assert!(find(&empty, b"COM1").is_some());
        // IO descriptor for COM1: tag 0x47, 16-bit decode, 0x3f8..0x3f8, align 1, 8 ports.
        assert!(find(&empty, &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]).is_some());
    }

    #[test]
    fn iasl_decodes_the_dsdt() {
        let Ok(out) = std::process::Command::new("iasl").arg("-v").output() else {
            panic!("iasl not found: install acpica-tools (ci/setup.sh does) to check the AML");
        };
        assert!(out.status.success() || !out.stdout.is_empty());
        let dir = std::env::temp_dir().join(format!("ebb-iasl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dat = dir.join("dsdt.dat");
        std::fs::write(&dat, dsdt(&devices(), Some(ged()))).unwrap();
        let status = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&dat)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
        assert!(dsl.contains("Name (_HID, \"LNRO0005\")"), "{dsl}");
        assert!(dsl.contains("0xD0000000"), "{dsl}");
        assert!(
            dsl.contains("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )"),
            "{dsl}"
        );
        assert!(dsl.contains("_S5_"), "{dsl}");
        assert!(dsl.contains("EisaId (\"PNP0501\")"), "{dsl}");
        assert!(
            dsl.contains("IO (Decode16,") && dsl.contains("0x03F8"),
            "{dsl}"
        );
        assert!(dsl.contains("EisaId (\"PNP0B00\")"), "{dsl}");
        // The GED, its event register and the power button it notifies.
        assert!(dsl.contains("Name (_HID, \"ACPI0013\""), "{dsl}");
        assert!(
            dsl.contains("OperationRegion (GDST, SystemMemory, 0xCFFFF000, 0x04)"),
            "{dsl}"
        );
        assert!(dsl.contains("Method (_EVT, 1, Serialized)"), "{dsl}");
        assert!(dsl.contains("Notify (\\_SB.PWRB, 0x80)"), "{dsl}");
        assert!(dsl.contains("EisaId (\"PNP0C0C\")"), "{dsl}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

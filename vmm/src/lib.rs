//! rqemu-vmm library: the x86-64 machine model shared by the KVM and TCG accelerators.
//!
//! * [`accel`] — the accelerator seam ([`accel::Accelerator`], [`accel::Vcpu`]) and KVM;
//! * [`memory`] — memfd-backed guest RAM around the 32-bit MMIO hole ([`layout`]);
//! * [`boot`] — bzImage / ELF (64-bit entry or PVH) loading, boot_params, page tables;
//! * [`acpi`] — RSDP, XSDT, FADT, MADT, DSDT;
//! * [`bus`] + [`devices`] — PIO/MMIO range-map buses, the in-VMM default COM1/RTC (over
//!   `rqemu-emulated-backend`) and the machine's reset/power-off controls;
//! * [`vm`] — assembling the machine and running vCPU threads until the guest exits;
//! * [`virtio`] — virtio-mmio transport and the vhost-user frontend;
//! * [`forwarded`] — emulated devices in daemons over the rqemu forwarding protocol;
//! * [`api`] — the management API (`--api-socket`: HTTP/1.1 + JSON over a UNIX socket);
//! * [`sandbox`] — the confinement entered once the machine is built, per-thread allow-lists;
//! * [`cli`] — the command line of the `rqemu-vmm` binary.

pub mod accel;
pub mod acpi;
pub mod api;
pub mod boot;
pub mod bus;
pub mod cli;
pub mod devices;
pub mod exit;
pub mod forwarded;
pub mod layout;
pub mod memory;
pub mod sandbox;
pub mod virtio;
pub mod vm;

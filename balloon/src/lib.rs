//! Ebb virtio-balloon device.

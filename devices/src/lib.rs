//! Ebb virtio devices.

//! The control queue: `{class, command}` + data in readable descriptors, a one-byte ack in
//! the first writable descriptor.

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_net::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemory};

use super::{DeviceError, NetDevice};

/// Longest command accepted (class, command, data); longer ones are answered with ERR.
const MAX_CTRL: usize = 512;

impl NetDevice {
    /// Handles every available control command. Returns whether buffers were used.
    pub fn process_ctrl<M: GuestMemory>(
        &self,
        q: &mut Queue,
        mem: &M,
    ) -> Result<bool, DeviceError> {
        let mut used = false;
        let mut cmd = [0u8; MAX_CTRL];
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut len = 0usize;
            let mut ack = None;
            let mut ok = true;
            for d in chain {
                if d.is_write_only() {
                    if ack.is_none() && d.len() >= 1 {
                        ack = Some(d.addr());
                    }
                    continue;
                }
                let n = d.len() as usize;
                // Readable after writable, or too long: a malformed command.
                let dst = if ack.is_some() {
                    None
                } else {
                    cmd.get_mut(len..len.saturating_add(n))
                };
                let read = match dst {
                    Some(dst) => mem.read_slice(dst, d.addr()).is_ok(),
                    None => false,
                };
                if read {
                    len += n;
                } else {
                    ok = false;
                }
            }
            let status = if ok {
                self.ctrl_command(cmd.get(..len).unwrap_or_default())
            } else {
                false
            };
            self.stats.ctrl_command();
            let written = match ack {
                Some(a) => {
                    let v = if status {
                        VIRTIO_NET_OK
                    } else {
                        VIRTIO_NET_ERR
                    } as u8;
                    u32::from(mem.write_obj(v, a).is_ok())
                }
                None => {
                    self.stats.bad_chain();
                    0
                }
            };
            q.add_used(mem, head, written)?;
            used = true;
        }
        Ok(used)
    }

    /// Executes one command; `true` is `VIRTIO_NET_OK`.
    fn ctrl_command(&self, cmd: &[u8]) -> bool {
        let [class, command, data @ ..] = cmd else {
            return false;
        };
        let (class, command) = (u32::from(*class), u32::from(*command));
        let ok = match (class, command) {
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => match data {
                [lo, hi] => {
                    let pairs = u16::from_le_bytes([*lo, *hi]);
                    let mq = self.negotiated().features & (1u64 << VIRTIO_NET_F_MQ) != 0;
                    let valid = mq && pairs >= 1 && pairs <= self.params.queue_pairs;
                    if valid {
                        self.active_pairs.store(pairs, Ordering::Relaxed);
                    }
                    valid
                }
                _ => false,
            },
            // The tap sees everything: promiscuous/all-multicast modes and MAC filter tables
            // are satisfied as they are.
            (VIRTIO_NET_CTRL_RX, 0..=5) => data.len() == 1,
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) => true,
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET) => data.len() == 6,
            (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) => true,
            _ => false,
        };
        tracing::debug!(
            "ctrl: class {class} command {command} ({} data bytes): {}",
            data.len(),
            if ok { "OK" } else { "ERR" }
        );
        ok
    }
}

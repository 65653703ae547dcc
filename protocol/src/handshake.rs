//! The fixed-layout handshake: the daemon's `HELLO` (what it is and what it claims), the VMM's
//! `GRANT` (what it got) or `REFUSE` (why not). Layouts are in `protocol/README.md`; every field
//! is little-endian and every decoded value is validated before use.

/// Magic at the start of every handshake message.
pub const MAGIC: [u8; 8] = *b"RQEMUFWD";
/// Protocol version spoken by this crate.
pub const VERSION: u16 = 1;
/// Most windows one device may claim.
pub const MAX_WINDOWS: usize = 8;
/// Most interrupt lines one device may request.
pub const MAX_IRQS: usize = 8;
/// Longest device name.
pub const NAME_LEN: usize = 32;
/// Longest refusal reason.
pub const REASON_LEN: usize = 112;
/// Size of a `HELLO`.
pub const HELLO_LEN: usize = 320;
/// Size of a `GRANT`.
pub const GRANT_LEN: usize = 256;
/// Size of a `REFUSE`.
pub const REFUSE_LEN: usize = 128;
/// End of the x86 port I/O space.
pub const PIO_END: u64 = 0x1_0000;

/// Feature: the daemon serves per-vCPU shared-memory rings.
pub const FEATURE_RING: u64 = 1 << 0;
/// Feature: the daemon accepts posted writes (on windows flagged [`WINDOW_POSTED`]).
pub const FEATURE_POSTED: u64 = 1 << 1;
/// Feature: the daemon implements snapshot/restore.
pub const FEATURE_SNAPSHOT: u64 = 1 << 2;
/// Window flag: writes have no side effect the vCPU must wait for; they may be posted.
pub const WINDOW_POSTED: u8 = 1 << 0;

const T_HELLO: u16 = 1;
const T_GRANT: u16 = 2;
const T_REFUSE: u16 = 3;

/// Handshake decoding errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Wrong message size for its type.
    #[error("handshake message is {got} bytes, expected {want}")]
    Length {
        /// Received.
        got: usize,
        /// Expected.
        want: usize,
    },
    /// Not an rqemu forwarding message.
    #[error("bad magic: not an rqemu device daemon")]
    Magic,
    /// Version not spoken here.
    #[error("unsupported protocol version {0} (this end speaks {VERSION})")]
    Version(u16),
    /// Unknown or unexpected message type.
    #[error("unexpected handshake message type {0}")]
    Type(u16),
    /// A count field out of range.
    #[error("{what} count {n} exceeds {max}")]
    Count {
        /// Which list.
        what: &'static str,
        /// Announced.
        n: usize,
        /// Limit.
        max: usize,
    },
    /// A window is empty, wraps or lies outside its address space.
    #[error("window {0} is invalid")]
    Window(usize),
    /// Two windows of one device overlap.
    #[error("windows {0} and {1} overlap")]
    Overlap(usize, usize),
    /// Unknown enum value.
    #[error("invalid {what} value {value}")]
    Enum {
        /// Field.
        what: &'static str,
        /// Value.
        value: u32,
    },
    /// Bad name or reason text.
    #[error("text field is not NUL-padded UTF-8 or too long")]
    Text,
    /// Reserved bytes not zero.
    #[error("reserved bytes are not zero")]
    Reserved,
}

/// Address space of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Space {
    /// x86 port I/O.
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

impl Space {
    /// Wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            Space::Pio => 0,
            Space::Mmio => 1,
        }
    }

    /// From the wire.
    pub fn from_u8(v: u8) -> Result<Self, HandshakeError> {
        match v {
            0 => Ok(Space::Pio),
            1 => Ok(Space::Mmio),
            v => Err(HandshakeError::Enum {
                what: "space",
                value: v.into(),
            }),
        }
    }
}

/// Interrupt trigger mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Trigger {
    /// Edge: one eventfd write per interrupt.
    Edge,
    /// Level: asserted until lowered; re-raised on resample (EOI) while still asserted.
    Level,
}

/// Kind of emulated device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceClass {
    /// 16550 UART.
    Serial,
    /// MC146818 CMOS RTC.
    Rtc,
    /// Anything else (wire value).
    Other(u16),
}

impl DeviceClass {
    /// Wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            DeviceClass::Serial => 1,
            DeviceClass::Rtc => 2,
            DeviceClass::Other(v) => v,
        }
    }

    /// From the wire (0 is invalid).
    pub fn from_u16(v: u16) -> Result<Self, HandshakeError> {
        match v {
            0 => Err(HandshakeError::Enum {
                what: "device class",
                value: 0,
            }),
            1 => Ok(DeviceClass::Serial),
            2 => Ok(DeviceClass::Rtc),
            v => Ok(DeviceClass::Other(v)),
        }
    }
}

/// A register window in PIO or MMIO space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Address space.
    pub space: Space,
    /// First address.
    pub base: u64,
    /// Length in bytes (> 0).
    pub size: u64,
    /// [`WINDOW_POSTED`] or 0.
    pub flags: u8,
}

impl Window {
    /// Exclusive end, or `None` if it wraps.
    pub fn end(&self) -> Option<u64> {
        self.base.checked_add(self.size)
    }

    /// Whether the window is non-empty, does not wrap and fits its space.
    pub fn is_valid(&self) -> bool {
        match self.end() {
            None => false,
            Some(end) => self.size > 0 && (self.space == Space::Mmio || end <= PIO_END),
        }
    }

    /// Whether `[addr, addr+len)` lies inside; returns the offset.
    pub fn offset_of(&self, space: Space, addr: u64, len: u64) -> Option<u64> {
        if space != self.space || addr < self.base {
            return None;
        }
        let off = addr - self.base;
        (off.checked_add(len)? <= self.size).then_some(off)
    }

    /// Whether two windows of the same space overlap.
    pub fn overlaps(&self, o: &Window) -> bool {
        self.space == o.space
            && self.base < o.base.saturating_add(o.size)
            && o.base < self.base.saturating_add(self.size)
    }

    fn put(&self, b: &mut [u8]) {
        b[0] = self.space.to_u8();
        b[1] = self.flags;
        b[8..16].copy_from_slice(&self.base.to_le_bytes());
        b[16..24].copy_from_slice(&self.size.to_le_bytes());
    }

    fn get(b: &[u8], i: usize) -> Result<Self, HandshakeError> {
        if b[2..8].iter().any(|&x| x != 0) {
            return Err(HandshakeError::Reserved);
        }
        if b[1] & !WINDOW_POSTED != 0 {
            return Err(HandshakeError::Enum {
                what: "window flags",
                value: b[1].into(),
            });
        }
        let w = Window {
            space: Space::from_u8(b[0])?,
            flags: b[1],
            base: le64(&b[8..16]),
            size: le64(&b[16..24]),
        };
        if !w.is_valid() {
            return Err(HandshakeError::Window(i));
        }
        Ok(w)
    }
}

/// An interrupt line a device asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqRequest {
    /// Trigger mode.
    pub trigger: Trigger,
    /// Preferred GSI (e.g. 4 for COM1), or `None` for any.
    pub gsi_hint: Option<u32>,
}

/// The daemon's `HELLO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// What it is.
    pub class: DeviceClass,
    /// Daemon name (≤ 32 bytes UTF-8).
    pub name: String,
    /// [`FEATURE_RING`] etc.
    pub features: u64,
    /// Claimed windows.
    pub windows: Vec<Window>,
    /// Requested interrupt lines.
    pub irqs: Vec<IrqRequest>,
}

/// The VMM's `GRANT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Granted features (a subset of the daemon's).
    pub features: u64,
    /// Number of per-vCPU rings the VMM will set up (0 without [`FEATURE_RING`]).
    pub vcpus: u16,
    /// Granted windows, one per claimed window, same order, same space and size.
    pub windows: Vec<Window>,
    /// GSI of each requested line, same order.
    pub gsis: Vec<u32>,
}

/// A decoded VMM answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Accepted.
    Grant(Grant),
    /// Refused, with a reason.
    Refuse(String),
}

fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}
fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn header(b: &mut [u8], ty: u16) {
    b[0..8].copy_from_slice(&MAGIC);
    b[8..10].copy_from_slice(&VERSION.to_le_bytes());
    b[10..12].copy_from_slice(&ty.to_le_bytes());
    let len = b.len() as u32;
    b[12..16].copy_from_slice(&len.to_le_bytes());
}

/// Checks magic, version and length; returns the message type.
fn check_header(b: &[u8]) -> Result<u16, HandshakeError> {
    if b.len() < 16 {
        return Err(HandshakeError::Length {
            got: b.len(),
            want: 16,
        });
    }
    if b[0..8] != MAGIC {
        return Err(HandshakeError::Magic);
    }
    let v = le16(&b[8..10]);
    if v != VERSION {
        return Err(HandshakeError::Version(v));
    }
    let ty = le16(&b[10..12]);
    let want = match ty {
        T_HELLO => HELLO_LEN,
        T_GRANT => GRANT_LEN,
        T_REFUSE => REFUSE_LEN,
        t => return Err(HandshakeError::Type(t)),
    };
    if b.len() != want || le32(&b[12..16]) as usize != want {
        return Err(HandshakeError::Length { got: b.len(), want });
    }
    Ok(ty)
}

fn put_text(b: &mut [u8], s: &str) -> Result<(), HandshakeError> {
    if s.len() > b.len() || s.as_bytes().contains(&0) {
        return Err(HandshakeError::Text);
    }
    b[..s.len()].copy_from_slice(s.as_bytes());
    Ok(())
}

fn get_text(b: &[u8]) -> Result<String, HandshakeError> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    if b[end..].iter().any(|&c| c != 0) {
        return Err(HandshakeError::Text);
    }
    std::str::from_utf8(&b[..end])
        .map(str::to_string)
        .map_err(|_| HandshakeError::Text)
}

fn check_overlaps(ws: &[Window]) -> Result<(), HandshakeError> {
    for (i, a) in ws.iter().enumerate() {
        for (j, b) in ws.iter().enumerate().skip(i + 1) {
            if a.overlaps(b) {
                return Err(HandshakeError::Overlap(i, j));
            }
        }
    }
    Ok(())
}

fn count(what: &'static str, n: usize, max: usize) -> Result<usize, HandshakeError> {
    if n > max {
        Err(HandshakeError::Count { what, n, max })
    } else {
        Ok(n)
    }
}

impl Hello {
    /// Encodes the 320-byte `HELLO` (validating it first).
    pub fn encode(&self) -> Result<[u8; HELLO_LEN], HandshakeError> {
        count("window", self.windows.len(), MAX_WINDOWS)?;
        count("irq", self.irqs.len(), MAX_IRQS)?;
        for (i, w) in self.windows.iter().enumerate() {
            if !w.is_valid() {
                return Err(HandshakeError::Window(i));
            }
        }
        check_overlaps(&self.windows)?;
        let mut b = [0u8; HELLO_LEN];
        header(&mut b, T_HELLO);
        b[16..18].copy_from_slice(&self.class.to_u16().to_le_bytes());
        b[18] = self.windows.len() as u8;
        b[19] = self.irqs.len() as u8;
        b[24..32].copy_from_slice(&self.features.to_le_bytes());
        put_text(&mut b[32..64], &self.name)?;
        for (i, w) in self.windows.iter().enumerate() {
            w.put(&mut b[64 + i * 24..88 + i * 24]);
        }
        for (i, q) in self.irqs.iter().enumerate() {
            let o = 256 + i * 8;
            b[o] = match q.trigger {
                Trigger::Edge => 0,
                Trigger::Level => 1,
            };
            b[o + 4..o + 8].copy_from_slice(&q.gsi_hint.unwrap_or(u32::MAX).to_le_bytes());
        }
        Ok(b)
    }

    /// Decodes and validates a `HELLO`.
    pub fn decode(b: &[u8]) -> Result<Self, HandshakeError> {
        let ty = check_header(b)?;
        if ty != T_HELLO {
            return Err(HandshakeError::Type(ty));
        }
        if b[20..24].iter().any(|&x| x != 0) {
            return Err(HandshakeError::Reserved);
        }
        let nw = count("window", b[18].into(), MAX_WINDOWS)?;
        let ni = count("irq", b[19].into(), MAX_IRQS)?;
        let windows = (0..nw)
            .map(|i| Window::get(&b[64 + i * 24..88 + i * 24], i))
            .collect::<Result<Vec<_>, _>>()?;
        check_overlaps(&windows)?;
        let mut irqs = Vec::with_capacity(ni);
        for i in 0..ni {
            let o = 256 + i * 8;
            let trigger = match b[o] {
                0 => Trigger::Edge,
                1 => Trigger::Level,
                v => {
                    return Err(HandshakeError::Enum {
                        what: "trigger",
                        value: v.into(),
                    })
                }
            };
            let hint = le32(&b[o + 4..o + 8]);
            irqs.push(IrqRequest {
                trigger,
                gsi_hint: (hint != u32::MAX).then_some(hint),
            });
        }
        Ok(Hello {
            class: DeviceClass::from_u16(le16(&b[16..18]))?,
            name: get_text(&b[32..64])?,
            features: le64(&b[24..32]),
            windows,
            irqs,
        })
    }
}

impl Grant {
    /// Encodes the 256-byte `GRANT`.
    pub fn encode(&self) -> Result<[u8; GRANT_LEN], HandshakeError> {
        count("window", self.windows.len(), MAX_WINDOWS)?;
        count("irq", self.gsis.len(), MAX_IRQS)?;
        let mut b = [0u8; GRANT_LEN];
        header(&mut b, T_GRANT);
        b[16] = self.windows.len() as u8;
        b[17] = self.gsis.len() as u8;
        b[18..20].copy_from_slice(&self.vcpus.to_le_bytes());
        b[24..32].copy_from_slice(&self.features.to_le_bytes());
        for (i, w) in self.windows.iter().enumerate() {
            w.put(&mut b[32 + i * 24..56 + i * 24]);
        }
        for (i, g) in self.gsis.iter().enumerate() {
            b[224 + i * 4..228 + i * 4].copy_from_slice(&g.to_le_bytes());
        }
        Ok(b)
    }

    /// Checks that this grant answers `hello`: same window count, spaces and sizes, one GSI
    /// per line, no feature the daemon did not offer.
    pub fn matches(&self, hello: &Hello) -> bool {
        self.windows.len() == hello.windows.len()
            && self.gsis.len() == hello.irqs.len()
            && self.features & !hello.features == 0
            && self
                .windows
                .iter()
                .zip(&hello.windows)
                .all(|(g, c)| g.space == c.space && g.size == c.size)
    }
}

/// Encodes a `REFUSE` (the reason is truncated at a char boundary to fit).
pub fn encode_refuse(reason: &str) -> [u8; REFUSE_LEN] {
    let mut b = [0u8; REFUSE_LEN];
    header(&mut b, T_REFUSE);
    let mut end = reason.len().min(REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let text = reason[..end].replace('\0', " ");
    b[16..16 + text.len()].copy_from_slice(text.as_bytes());
    b
}

impl Answer {
    /// Decodes a `GRANT` or a `REFUSE`.
    pub fn decode(b: &[u8]) -> Result<Self, HandshakeError> {
        match check_header(b)? {
            T_GRANT => {
                if b[20..24].iter().any(|&x| x != 0) {
                    return Err(HandshakeError::Reserved);
                }
                let nw = count("window", b[16].into(), MAX_WINDOWS)?;
                let ni = count("irq", b[17].into(), MAX_IRQS)?;
                let windows = (0..nw)
                    .map(|i| Window::get(&b[32 + i * 24..56 + i * 24], i))
                    .collect::<Result<Vec<_>, _>>()?;
                check_overlaps(&windows)?;
                Ok(Answer::Grant(Grant {
                    features: le64(&b[24..32]),
                    vcpus: le16(&b[18..20]),
                    windows,
                    gsis: (0..ni)
                        .map(|i| le32(&b[224 + i * 4..228 + i * 4]))
                        .collect(),
                }))
            }
            T_REFUSE => Ok(Answer::Refuse(get_text(&b[16..16 + REASON_LEN])?)),
            t => Err(HandshakeError::Type(t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            class: DeviceClass::Serial,
            name: "rqemu-serial".into(),
            features: FEATURE_RING | FEATURE_POSTED,
            windows: vec![Window {
                space: Space::Pio,
                base: 0x3f8,
                size: 8,
                flags: 0,
            }],
            irqs: vec![IrqRequest {
                trigger: Trigger::Edge,
                gsi_hint: Some(4),
            }],
        }
    }

    #[test]
    fn hello_and_grant_round_trip() {
        let h = hello();
        assert_eq!(Hello::decode(&h.encode().unwrap()).unwrap(), h);
        let g = Grant {
            features: FEATURE_RING,
            vcpus: 2,
            windows: h.windows.clone(),
            gsis: vec![4],
        };
        assert!(g.matches(&h));
        assert_eq!(
            Answer::decode(&g.encode().unwrap()).unwrap(),
            Answer::Grant(g)
        );
        let r = encode_refuse("no room at 0x3f8");
        assert_eq!(
            Answer::decode(&r).unwrap(),
            Answer::Refuse("no room at 0x3f8".into())
        );
        let long = "é".repeat(100);
        assert!(
            matches!(Answer::decode(&encode_refuse(&long)).unwrap(), Answer::Refuse(s) if s.len() <= REASON_LEN)
        );
    }

    #[test]
    fn rejects_malformed_hellos() {
        let good = hello().encode().unwrap();
        assert!(matches!(
            Hello::decode(&good[..100]),
            Err(HandshakeError::Length { .. })
        ));
        assert!(matches!(
            Hello::decode(&[0u8; 8]),
            Err(HandshakeError::Length { .. })
        ));
        let mut b = good;
        b[0] = b'X';
        assert_eq!(Hello::decode(&b), Err(HandshakeError::Magic));
        let mut b = good;
        b[8] = 9;
        assert_eq!(Hello::decode(&b), Err(HandshakeError::Version(9)));
        let mut b = good;
        b[10] = 77;
        assert_eq!(Hello::decode(&b), Err(HandshakeError::Type(77)));
        let mut b = good;
        b[12] = 0;
        assert!(matches!(
            Hello::decode(&b),
            Err(HandshakeError::Length { .. })
        ));
        let mut b = good;
        b[18] = 9;
        assert!(matches!(
            Hello::decode(&b),
            Err(HandshakeError::Count { .. })
        ));
        let mut b = good;
        b[64] = 5; // unknown space
        assert!(matches!(
            Hello::decode(&b),
            Err(HandshakeError::Enum { .. })
        ));
        let mut b = good;
        b[64 + 8..64 + 16].copy_from_slice(&0xfffcu64.to_le_bytes()); // PIO past 64 KiB
        assert_eq!(Hello::decode(&b), Err(HandshakeError::Window(0)));
        let mut b = good;
        b[256] = 3; // unknown trigger
        assert!(matches!(
            Hello::decode(&b),
            Err(HandshakeError::Enum { .. })
        ));
        let mut b = good;
        b[33] = 0;
        b[34] = b'x'; // text after NUL
        assert_eq!(Hello::decode(&b), Err(HandshakeError::Text));
        let mut b = good;
        b[16] = 0;
        assert!(matches!(
            Hello::decode(&b),
            Err(HandshakeError::Enum { .. })
        ));
        let mut b = good;
        b[20] = 1;
        assert_eq!(Hello::decode(&b), Err(HandshakeError::Reserved));
    }

    #[test]
    fn rejects_overlapping_and_bad_windows() {
        let mut h = hello();
        h.windows.push(Window {
            space: Space::Pio,
            base: 0x3fc,
            size: 8,
            flags: 0,
        });
        assert_eq!(h.encode(), Err(HandshakeError::Overlap(0, 1)));
        // Same addresses in the other space do not overlap.
        h.windows[1].space = Space::Mmio;
        Hello::decode(&h.encode().unwrap()).unwrap();
        h.windows[1] = Window {
            space: Space::Mmio,
            base: u64::MAX,
            size: 2,
            flags: 0,
        };
        assert_eq!(h.encode(), Err(HandshakeError::Window(1)));
        h.windows[1].size = 0;
        h.windows[1].base = 0;
        assert_eq!(h.encode(), Err(HandshakeError::Window(1)));
        // A crafted overlapping HELLO is refused on decode too.
        let mut b = hello().encode().unwrap();
        b[18] = 2;
        b.copy_within(64..88, 88);
        assert_eq!(Hello::decode(&b), Err(HandshakeError::Overlap(0, 1)));
    }

    #[test]
    fn window_offsets() {
        let w = Window {
            space: Space::Pio,
            base: 0x70,
            size: 2,
            flags: 0,
        };
        assert_eq!(w.offset_of(Space::Pio, 0x71, 1), Some(1));
        assert_eq!(w.offset_of(Space::Pio, 0x71, 2), None);
        assert_eq!(w.offset_of(Space::Mmio, 0x70, 1), None);
        assert_eq!(w.offset_of(Space::Pio, 0x6f, 1), None);
        assert_eq!(w.offset_of(Space::Pio, u64::MAX, 8), None);
    }
}
